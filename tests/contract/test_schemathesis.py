"""Schemathesis against a real stack (gunicorn, a worker, MongoDB-wire, redis): every check schemathesis has passes,
as in `make contract`, on fewer examples so the run stays well under two minutes."""

from __future__ import annotations

import pytest

from devtools import contract
from devtools.servers import ManagedProcess

pytestmark = pytest.mark.contract


@pytest.mark.timeout(400)
def test_every_response_conforms_to_the_spec(
    mongo_server: ManagedProcess, redis_server: ManagedProcess, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # A fixed seed keeps CI reproducible; `make contract` draws a new one each run, with 60 examples.
    options = contract.Options(max_examples=20, seed=20251123, report_dir=tmp_path_factory.mktemp("schemathesis"))
    assert options.checks == ("all",)
    status = contract.run_self_started(options, mongo_url=mongo_server.url, redis_url=redis_server.url)
    assert status == 0, "schemathesis found responses that do not match openapi.yaml (its report is above)"
