"""JSON responses written by orjson, so money goes out as exact decimal numbers.

Money values are `core.money_format.usd_json` fragments (`0.000017`, not the float `1.7e-05`);
the standard library's encoder cannot write those, orjson writes them verbatim.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse

INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1  # what orjson writes; it refuses other integers


class ExactJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content)
        except TypeError:  # an integer past 64 bits: written as its digits, never a 500
            return orjson.dumps(_big_ints_written(content))


def _big_ints_written(value: Any) -> Any:
    """`value` with every integer orjson refuses replaced by a fragment of its digits."""
    if isinstance(value, dict):
        return {key: _big_ints_written(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_big_ints_written(item) for item in value]
    if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= UINT64_MAX:
        return orjson.Fragment(str(value).encode())
    return value
