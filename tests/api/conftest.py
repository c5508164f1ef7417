"""The API tests run twice: on in-process mongomock and on a MongoDB-wire server over TCP."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["mongomock", "mongo-wire"])
def mongo_uri_template(request: pytest.FixtureRequest) -> str:
    if request.param == "mongomock":
        return "mongomock://localhost/{db}"
    return request.getfixturevalue("mongo_server").url.rstrip("/") + "/{db}"
