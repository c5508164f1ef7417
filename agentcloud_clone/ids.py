"""Ids as clients spell them: MongoDB ObjectIds written as 24 lowercase hexadecimal characters."""

from __future__ import annotations

import re
from typing import Any

from bson import ObjectId

OBJECT_ID_RE = re.compile(r"[a-f0-9]{24}")


def parse_object_id(value: Any) -> ObjectId | None:
    """The ObjectId spelled by `value` (exactly 24 lowercase hex characters, nothing before or after), or None."""
    if isinstance(value, str) and OBJECT_ID_RE.fullmatch(value):
        return ObjectId(value)
    return None
