"""The one shared upstream HTTP client.

aiohttp rather than httpx here: on this project's benchmark a bare pass-through did
~5,900 requests/s through an aiohttp session and ~470 through httpx's default transport,
whose connection pool was the bottleneck. Everything vendor-specific lives in providers/.
"""

from __future__ import annotations

import aiohttp

USER_AGENT = "tollgate"


def create_http_session() -> aiohttp.ClientSession:
    """One pooled session for the life of the process (created inside the running loop).

    No limit on connections (limit=0): aiohttp's queue for a free connection is invisible,
    and with streams lasting minutes, a request past the limit waited a whole stream's length
    unseen. Limits are the operator's, per provider (`max_connections`, core/upstream_gate.py),
    which wait in the open and answer 503 upstream_busy; the process's open-file limit (raised
    at start, core/process_limits.py) is the last bound."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=30)
    return aiohttp.ClientSession(
        connector=connector,
        headers={"User-Agent": USER_AGENT},
        timeout=aiohttp.ClientTimeout(total=None),
        auto_decompress=True,
        # One session serves every client: cookies a vendor sets for one request (Cloudflare's
        # __cf_bm, say) must not ride along on another key's requests.
        cookie_jar=aiohttp.DummyCookieJar(),
    )
