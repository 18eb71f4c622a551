"""Tollgate: app factory and the `python main.py` entry point."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import Receive, Scope, Send
from uvicorn.supervisors import Multiprocess

from core.alerts import Alerts
from core.auth_throttle import AuthThrottle
from core.billing import BillingMeter
from core.config import Config, load_config
from core.config.check import check_config
from core.config.reload import ConfigStore, log_warnings
from core.config.yamlsource import ConfigError
from core.errors import GatewayError
from core.ledger.database import Database, open_ledger, parse_database
from core.ledger.postgres import PgLedger
from core.ledger.sqlite import LedgerUnavailable, check_ledger_file
from core.ledger.sqlite_lock import LedgerLock, LedgerLockError
from core.process_limits import DEFAULT_BACKLOG, configured_streams, listen_queue, open_files_warning, raise_open_file_limit
from core.providers.messages import anthropic_error_body
from core.proxy import Gateway
from core.routing import Scheduler
from core.stored_responses import StoredResponses
from core.telemetry import Telemetry
from core.telemetry.request_log import LOG_FORMATS, configure_logging
from core.telemetry.tracing import Tracing
from core.upstream import create_http_session
from core.vendors.months import VendorMonths
from routes import accounts, admin, api_keys, audit, billing_admin, metrics, providers, proxy, responses, self_service, web, web_prices, web_usage_keys
from routes._http import error_response, http_error, internal_error
from routes._pages import compile_templates
from routes._session import SessionSigner
from routes._web_auth import LoginRequired

log = logging.getLogger("tollgate")

EXAMPLE_ADMIN_KEY = "sk-admin-change-me"  # api.yaml.example's: public, so never a real admin key


GC_THRESHOLDS = (20_000, 50, 50)


def create_app(config_path: str | Path, db_path: str | Path = "data/tollgate.db", *, watch: bool = True, clock: Callable[[], float] = time.time) -> Starlette:
    """Build the app on a config file; raises ConfigError if the file cannot be loaded.

    `db_path`: the SQLite ledger's file, or any `--database` value (a postgresql:// URL).
    `clock` is the time every limit, budget period and ledger row uses (tests move it)."""
    database = parse_database(db_path)
    store = ConfigStore(config_path, load_config(config_path))
    log_warnings(store.current)
    telemetry = Telemetry(store)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        ledger = await open_ledger(database, clock)
        app.state.auth_throttle = AuthThrottle(clock)
        if isinstance(ledger, PgLedger):  # fleet mode: tell the fleet what this instance serves
            ledger.config_source = lambda: (store.current.source_hash, store.last_error.message if store.last_error else None)
            ledger.watch_key_records(store.apply_records)
            app.state.auth_throttle = AuthThrottle(clock, shares=lambda: ledger.live_instances)
        store.apply_records(await ledger.key_records(), await ledger.account_records())  # keys and accounts made and changed through the API
        app.state.session_signer = SessionSigner(await ledger.setting("session_secret", lambda: secrets.token_hex(32)))
        http = create_http_session()
        app.state.ledger = ledger
        app.state.clock = clock
        meter = BillingMeter(ledger, clock)
        app.state.stored_responses = StoredResponses(ledger, clock)
        vendors = meter.vendors = app.state.vendors = VendorMonths(ledger, clock)
        app.state.gateway = Gateway(http, Scheduler(), meter, app.state.stored_responses, vendors)
        alerts = meter.alerts = vendors.alerts = app.state.alerts = Alerts(ledger, meter.limiter, clock, lambda: http)
        # Made here, in the process that serves (each of --workers N): the exporter's thread with it.
        telemetry.tracing = Tracing.from_environment()
        metrics = telemetry.metrics
        gate = app.state.gateway.gate

        def reloaded(ok: bool) -> None:
            metrics.config_reloaded(ok)
            if ok:
                gate.reconfigure(store.current.providers)  # a raised limit lets the waiting in now

        ledger.on_commit, store.on_reload, alerts.on_fired = metrics.ledger_committed, reloaded, metrics.alert_fired
        await alerts.load()
        alert_sender = asyncio.create_task(alerts.deliver_forever())
        vendor_refresh = asyncio.create_task(vendors.refresh_forever()) if ledger.shared else None  # other instances' vendor cost
        compile_templates()  # off the first page's time
        gc.freeze()  # the loaded config is long-lived: keep full collections from re-scanning it
        # Each request leaves a little cyclic garbage (futures, tracebacks); at Python's default
        # (700, 10, 10) that ran a collection every few requests: 158 collections and 4% of the
        # event loop's time under bench/run.py JSON load (gc.callbacks), and the gateway did 11%
        # more requests/s with these thresholds. The garbage waiting is a few MB at most.
        gc.set_threshold(*GC_THRESHOLDS)
        stop = asyncio.Event()
        watcher = asyncio.create_task(store.watch(stop)) if watch else None
        # Every key's balance is rebuilt from the ledger before the first request is accepted:
        # in the background, the first page load after a start waited for it anyway (360-450 ms
        # instead of ~120 ms on 10,000 keys and 1,000,000 rows, bench/pages_bench.py).
        await ledger.accounts([(key.id, key.billing) for key in store.current.keys])
        try:
            yield
        finally:
            alert_sender.cancel()
            if vendor_refresh is not None:
                vendor_refresh.cancel()
            stop.set()
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            await http.close()
            await ledger.close()  # flushes every queued ledger row
            telemetry.close()

    app = GatewayApp(
        routes=[
            *proxy.routes,
            *responses.routes,
            *admin.routes,
            *metrics.routes,
            *api_keys.routes,
            *accounts.routes,
            *billing_admin.routes,
            *providers.routes,
            *self_service.routes,
            *audit.routes,
            *web_usage_keys.routes,
            *web_prices.routes,
            *web.routes,
        ],
        lifespan=lifespan,
        exception_handlers={GatewayError: on_error, HTTPException: on_error, LoginRequired: to_login, Exception: on_unexpected_error},
    )
    app.state.store = store  # loaded now: the entry point checks it before starting
    app.state.telemetry = telemetry
    app.state.database = database
    return app


def worker_app() -> Starlette:
    """The app in each of `--workers N` processes (uvicorn imports this factory in each): the
    parent checked the config and the database, and passes them in the environment."""
    configure_logging(os.environ.get("TOLLGATE_LOG_LEVEL", "info"), os.environ.get("TOLLGATE_LOG_FORMAT", "text"))
    _stop_with_supervisor()
    return create_app(os.environ["TOLLGATE_CONFIG"], os.environ["TOLLGATE_DATABASE"])


def _stop_with_supervisor() -> None:
    """A worker whose supervisor is killed (`kill -9`, the OOM killer) would go on serving with
    nobody to stop it: Linux sends it SIGTERM then (a graceful stop: requests in flight end)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the supervisor was gone before the call
        os.kill(os.getpid(), signal.SIGTERM)


class GatewayApp(Starlette):
    """Starlette, with the proxy endpoints dispatched ahead of its router and middleware.

    Those endpoints handle their own errors (routes/proxy.py), so the layers they skip add
    nothing for them but cost on every call; everything else takes Starlette's usual way.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = proxy.PROXY_ENDPOINTS.get(scope["path"])
            if endpoint is not None:
                scope["app"] = self
                await endpoint(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


_API_PATHS = ("/v1/", "/health", "/metrics", "/dashboard/", *proxy.UNPREFIXED_API_PATHS)


def _is_page(request: Request) -> bool:
    return not request.url.path.startswith(_API_PATHS)


async def on_error(request: Request, exc: Exception) -> Response:
    """One error type, rendered once: OpenAI-shaped JSON for the API, a page for browsers."""
    if isinstance(exc, HTTPException):
        exc = http_error(exc)
    assert isinstance(exc, GatewayError)
    if request.url.path in proxy.ANTHROPIC_PATHS:  # Anthropic's clients expect Anthropic's error shape
        return JSONResponse(anthropic_error_body(exc), status_code=exc.status, headers=exc.headers)
    return web.render_error(request, exc) if _is_page(request) else error_response(exc)


async def on_unexpected_error(request: Request, exc: Exception) -> Response:
    """A bug: a logged 500 as JSON, Anthropic-shaped on its paths (a page is not rendered:
    rendering may be what failed)."""
    error = internal_error(request, exc)
    if request.url.path in proxy.ANTHROPIC_PATHS:
        return JSONResponse(anthropic_error_body(error), status_code=error.status)
    return error_response(error)


async def to_login(request: Request, exc: Exception) -> Response:
    return RedirectResponse("/login", status_code=303)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tollgate", description="Metering and billing gateway for LLM APIs.")
    parser.add_argument("--config", default=os.environ.get("TOLLGATE_CONFIG", "./api.yaml"), help="config file (env TOLLGATE_CONFIG, default ./api.yaml)")
    parser.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"), help="listen address (env HOST, default 0.0.0.0)")
    parser.add_argument("--port", default=os.environ.get("PORT", "8000"), help="listen port (env PORT, default 8000)")  # checked by _whole_number
    parser.add_argument("--db", default=os.environ.get("TOLLGATE_DB", "./data/tollgate.db"), help="SQLite ledger (env TOLLGATE_DB, default ./data/tollgate.db)")
    parser.add_argument(
        "--database",
        default=os.environ.get("TOLLGATE_DATABASE"),
        help="the ledger: postgresql://user:password@host:5432/db for a fleet, or sqlite:///path / a file path (env TOLLGATE_DATABASE; default: --db)",
    )
    parser.add_argument(
        "--workers",
        default=os.environ.get("TOLLGATE_WORKERS", "1"),
        help="worker processes on the port (env TOLLGATE_WORKERS, default 1; above 1 needs PostgreSQL)",
    )
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "info"), choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--log-format",
        default=os.environ.get("TOLLGATE_LOG_FORMAT", "text"),
        choices=LOG_FORMATS,
        help="text, or json: one JSON object per line (env TOLLGATE_LOG_FORMAT, default text)",
    )
    parser.add_argument(
        "--backlog",
        default=os.environ.get("TOLLGATE_BACKLOG", str(DEFAULT_BACKLOG)),
        help=f"listen queue for bursts of new connections (env TOLLGATE_BACKLOG, default {DEFAULT_BACKLOG}; the kernel caps it at net.core.somaxconn)",
    )
    parser.add_argument("--check-config", metavar="FILE", help="load FILE, print its warnings and error, exit (1 if it does not load); no server")
    return parser.parse_args(argv)


class StartRefused(Exception):
    """A reason not to start, told in one line on stderr with exit code 2."""


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.check_config is not None:
        return check_config(args.check_config, sys.stdout, sys.stderr)
    configure_logging(args.log_level, args.log_format)
    with contextlib.ExitStack() as held:  # the ledger's lock and the socket, until the server ends
        try:
            app, listener = _prepare(args, held)
        except (StartRefused, LedgerLockError, LedgerUnavailable) as exc:
            print(f"tollgate: {exc}", file=sys.stderr)
            code = 2
        else:
            code = _serve(app, listener, args)
    return code


def _prepare(args: argparse.Namespace, held: contextlib.ExitStack) -> tuple[Starlette, socket.socket]:
    """Everything that can refuse the start, done before the ledger is opened and migrated (in
    the lifespan), so that a mistake is told at once rather than after a long migration."""
    args.port = _whole_number(args.port, "--port (or PORT)", 0, MAX_PORT)
    args.workers = _whole_number(args.workers, "--workers (or TOLLGATE_WORKERS)", 1, MAX_WORKERS)
    args.backlog = _whole_number(args.backlog, "--backlog (or TOLLGATE_BACKLOG)", 1, MAX_BACKLOG)
    database = _database(args)
    args.database_target = database.target
    config_path = Path(args.config)
    if not config_path.exists():
        raise StartRefused(f"config file {config_path} not found; start from the example: cp api.yaml.example {config_path}")
    try:
        app = create_app(config_path, database.target)
    except ConfigError as exc:
        raise StartRefused(f"invalid config: {exc}") from exc
    if database.shared:
        check_shared_ledger(database)
    else:
        if args.workers > 1:
            raise StartRefused(
                f"--workers {args.workers} needs PostgreSQL: the SQLite ledger keeps balances and limits in one process's memory."
                " Use --database postgresql://user:password@host:5432/tollgate, or --workers 1"
            )
        held.enter_context(LedgerLock.acquire(database.target))  # until the process ends: balances live in its memory
        check_ledger_file(database.target)
    listener = held.enter_context(_listen(args.host, args.port))
    _warn_about_example_admin_keys(app.state.store.current, args.host, args.port, config_path)
    _hold_many_connections(app.state.store.current, args.backlog)
    return app, listener


MAX_BACKLOG = 2**31 - 1


def _hold_many_connections(config: Config, backlog: int) -> None:
    """Raise the open-file limit (workers inherit it) and say how many streams it holds; warn
    when that is fewer than the config's providers may open (core/process_limits.py)."""
    files = raise_open_file_limit()
    raised = f", raised from {files.raised_from:,}" if files.raised_from is not None else ""
    log.info(
        "room for about %s concurrent streams (open-file limit %s%s); listen queue %s",
        f"{files.streams:,}",
        f"{files.limit:,}",
        raised,
        f"{listen_queue(backlog):,}",
    )
    warning = open_files_warning(files, configured_streams(config))
    if warning is not None:
        log.warning("%s", warning)


def _database(args: argparse.Namespace) -> Database:
    """--database (or TOLLGATE_DATABASE) if given, else the SQLite file --db names."""
    try:
        return parse_database(args.database if args.database is not None else args.db)
    except ValueError as exc:
        raise StartRefused(f"--database (or TOLLGATE_DATABASE): {exc}") from exc


MAX_WORKERS = 256


def check_shared_ledger(database: Database) -> None:
    """Connect and migrate before serving: an unreachable or newer database is told in one
    line at once (concurrent starts of several instances take turns on the migration)."""

    async def check() -> None:
        import asyncpg

        from core.ledger.pg_errors import DATABASE_ERRORS
        from core.ledger.postgres import CONNECT_TIMEOUT
        from core.ledger.postgres_schema import SchemaError, migrate

        try:
            conn = await asyncpg.connect(database.target, timeout=CONNECT_TIMEOUT)
        except (*DATABASE_ERRORS, ValueError) as exc:
            raise LedgerUnavailable(f"cannot connect to the PostgreSQL ledger at {database.shown()}: {str(exc) or type(exc).__name__}") from exc
        try:
            await migrate(conn)
        except (SchemaError, *DATABASE_ERRORS) as exc:
            raise LedgerUnavailable(f"cannot use the PostgreSQL ledger at {database.shown()}: {exc}") from exc
        finally:
            await conn.close()

    asyncio.run(check())


def _whole_number(raw: str, option: str, low: int, high: int) -> int:
    """A flag's (or its environment variable's) whole number in [low, high]; a one-line refusal otherwise."""
    text = str(raw).strip()
    if not (text.isascii() and text.isdigit() and low <= int(text) <= high):
        raise StartRefused(f"{option} must be a whole number from {low} to {high}, got '{raw}'")
    return int(text)


MAX_PORT = 65535


def _listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound here; uvicorn only starts listening on it."""
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:  # an IPv6 address on a machine without IPv6
        raise StartRefused(f"cannot listen on {_address(host, port)}: {exc.strerror or exc}; is IPv6 available? Try --host 0.0.0.0") from exc
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart need not wait out TIME_WAIT
    try:
        sock.bind((host, port))
    except (OSError, ValueError) as exc:  # ValueError: a host name the IDNA codec refuses
        sock.close()
        raise StartRefused(f"cannot listen on {_address(host, port)}: {_bind_failure(exc)}") from exc
    sock.set_inheritable(True)
    return sock


def _bind_failure(exc: OSError | ValueError) -> str:
    if not isinstance(exc, OSError) or not exc.strerror:
        return str(exc)
    if exc.errno == errno.EADDRINUSE:
        return f"{exc.strerror}; is Tollgate or another server already running there? Stop it or choose another --port"
    return exc.strerror


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_loopback(host: str) -> bool:
    """Only this machine can connect (a host name other than localhost may resolve to anything)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _warn_about_example_admin_keys(config: Config, host: str, port: int, config_path: Path) -> None:
    """The example's admin key is public: beyond loopback, anyone who can reach the port could
    top up any key and read every key's usage."""
    if _is_loopback(host):
        return
    for key in config.keys:
        if key.is_admin and key.secret == EXAMPLE_ADMIN_KEY:
            log.warning(
                "SECURITY: admin key %r is still the example's %s and Tollgate listens on %s: anyone who can reach port %d can use it."
                " Set TOLLGATE_ADMIN_KEY (the example config reads it) or change the key in %s",
                key.name,
                EXAMPLE_ADMIN_KEY,
                host,
                port,
                config_path,
            )


def _pages_url(host: str, port: int) -> str:
    """Where a browser on this machine finds the pages (listening everywhere includes here)."""
    shown = "localhost" if host in ("0.0.0.0", "::") else host
    return f"http://{_address(shown, port)}/"


class _Server(uvicorn.Server):
    """uvicorn's server, saying where the pages are once it accepts connections."""

    def __init__(self, config: uvicorn.Config, pages_url: str):
        super().__init__(config)
        self.pages_url = pages_url

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        log.info("Tollgate pages: %s (listening on %s; CTRL+C to stop)", self.pages_url, _address(self.config.host, self.config.port))


def _serve(app: Starlette, listener: socket.socket, args: argparse.Namespace) -> int:
    """Run until stopped: 0, or 3 when the app failed to start (uvicorn has logged why)."""
    # proxy_headers off: X-Forwarded-For is honoured only from `preferences.trusted_proxies`, by us.
    # No `server: uvicorn` header: it tells a scanner what to look for, and costs a header per response.
    options: dict[str, Any] = {
        "host": args.host,
        "port": listener.getsockname()[1],
        "log_level": args.log_level,
        "access_log": False,
        "timeout_graceful_shutdown": 30,
        "proxy_headers": False,
        "server_header": False,
        "backlog": args.backlog,
    }
    if args.log_format == "json":  # uvicorn's own lines through our JSON formatter too
        options["log_config"] = None
    if args.workers > 1:
        return _serve_workers(listener, args, options)
    config = uvicorn.Config(app, **options)
    server = _Server(config, _pages_url(args.host, listener.getsockname()[1]))
    with contextlib.suppress(KeyboardInterrupt):  # SIGINT, re-raised by uvicorn after a clean shutdown
        server.run(sockets=[listener])
    return 0 if server.started else 3


def _serve_workers(listener: socket.socket, args: argparse.Namespace, options: dict[str, Any]) -> int:
    """`--workers N`: N processes accept on the one socket, each with its own event loop, config
    reload and connection pool; uvicorn's supervisor restarts a worker that dies."""
    os.environ["TOLLGATE_CONFIG"] = str(Path(args.config).resolve())
    os.environ["TOLLGATE_DATABASE"] = args.database_target
    os.environ["TOLLGATE_LOG_LEVEL"] = args.log_level
    os.environ["TOLLGATE_LOG_FORMAT"] = args.log_format
    config = uvicorn.Config("main:worker_app", factory=True, workers=args.workers, **options)
    log.info(
        "Tollgate pages: %s (%d workers on %s; CTRL+C to stop)", _pages_url(args.host, options["port"]), args.workers, _address(args.host, options["port"])
    )
    with _metrics_shared_by_workers(), contextlib.suppress(KeyboardInterrupt):
        Multiprocess(config, sockets=[listener]).run()
    return 0


@contextlib.contextmanager
def _metrics_shared_by_workers() -> Iterator[None]:
    """prometheus_client's multiprocess mode: each worker writes its metrics to files in one
    directory, and a scrape of any worker reads them all. The directory must start empty: an
    operator's own PROMETHEUS_MULTIPROC_DIR is emptied of old files, else one is made here
    for this run and removed after it."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        Path(given).mkdir(parents=True, exist_ok=True)
        for old in Path(given).glob("*.db"):
            old.unlink()
        yield
        return
    made = tempfile.mkdtemp(prefix="tollgate-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = made
    try:
        yield
    finally:
        shutil.rmtree(made, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
