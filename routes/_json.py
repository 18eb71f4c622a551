"""JSON responses written by orjson, so money goes out as exact decimal numbers.

Money values are `core.money_format.usd_json` fragments (`0.000017`, not the float `1.7e-05`);
the standard library's encoder cannot write those, orjson writes them verbatim.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse


class ExactJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)
