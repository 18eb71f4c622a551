"""Throughput and latency benchmark: the gateway with full billing against a bare
pass-through, both in front of the same nginx fake upstream, one worker each.

    python bench/run.py [--duration 15] [--repeats 3]

Exits non-zero if any request failed (CI runs a short smoke version: test/test_bench.py).

Needs nginx and wrk (apt-get install nginx-light wrk). Prints a table (requests/s, p50,
p99, errors, CPU of each process, gateway / bare ratio) and the median over the repeats.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("sk-bench-token-000001", "sk-bench-count-000002", "sk-bench-limited-0003")
CHAT = '{"id":"chatcmpl-bench","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there, this is a canned answer."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21}}'


def sse_body() -> str:
    words = ["Hello", " there,", " this", " is", " a", " canned", " streamed", " answer", "."]
    chunk = '{{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{{"index":0,"delta":{{"content":"{w}"}},"finish_reason":null}}]}}'
    events = [f"data: {chunk.format(w=w)}\n\n" for w in words]
    events.append('data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n')
    events.append(
        'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21}}\n\n'
    )
    events.append("data: [DONE]\n\n")
    return "".join(events)  # real newlines: nginx keeps them inside a quoted string


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def nginx_config(work: Path, port: int) -> Path:
    path = work / "nginx.conf"
    path.write_text(f"""
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
daemon off;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {work};
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port};
    location /json/ {{ default_type application/json; return 200 '{CHAT}'; }}
    location /sse/ {{ default_type text/event-stream; return 200 '{sse_body()}'; }}
  }}
}}
""")
    return path


def gateway_config(work: Path, upstream: str) -> Path:
    path = work / "api.yaml"
    path.write_text(f"""
providers:
  - provider: json
    base_url: {upstream}/json/v1
    api: k
    model: [bench-json]
  - provider: sse
    base_url: {upstream}/sse/v1
    api: k
    model: [bench-sse]
api_keys:
  - api: {KEYS[0]}
    name: token-key
    preferences: {{billing_mode: token, credits: 1000000}}
  - api: {KEYS[1]}
    name: count-key
    preferences: {{billing_mode: count, count_credits: 1000000000}}
  - api: {KEYS[2]}
    name: limited-key
    preferences: {{billing_mode: token, credits: 1000000, rate_limit: '10000000/min', concurrency_limit: 1000}}
  - api: sk-bench-admin-0123456789abcdef
    name: ops
    role: admin
preferences:
  model_price: {{default: '1,2'}}
  count_billing: {{default_count_price: 0.001}}
""")
    return path


def wrk_script(work: Path, stream: bool, keys: tuple[str, ...] = KEYS) -> Path:
    """The request body and the keys, taken in turn (each kind of billing in every load)."""
    model = "bench-sse" if stream else "bench-json"
    stream_flag = ',"stream":true' if stream else ""
    body = f'{{"model":"{model}","messages":[{{"role":"user","content":"Say hello in a few words."}}],"max_tokens":64{stream_flag}}}'
    path = work / f"post-{'sse' if stream else 'json'}.lua"
    names = ", ".join(f'"{k}"' for k in keys)
    path.write_text(f"""
local keys = {{{names}}}
local body = '{body}'
local i = 0
request = function()
  i = i + 1
  return wrk.format("POST", "/v1/chat/completions", {{["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. keys[(i % #keys) + 1]}}, body)
end
""")
    return path


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_pct: float
    upstream_cpu_pct: float


def wrk_command(url: str, script: Path, connections: int, seconds: int) -> list[str]:
    return ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url]


@dataclass
class WrkOutput:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int


def parse_wrk(out: str) -> WrkOutput:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = sum(int(n) for n in re.findall(r"(?:Non-2xx or 3xx responses|connect|read|write|timeout)[: ]+(\d+)", out))
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return WrkOutput(rps, _latency(out, "50%"), _latency(out, "99%"), errors, requests)


def run_wrk(url: str, script: Path, connections: int, seconds: int, server_pid: int, nginx_pid: int) -> Result:
    before, nginx_before, started = cpu_seconds(server_pid), cpu_seconds(nginx_pid), time.monotonic()
    out = subprocess.run(wrk_command(url, script, connections, seconds), capture_output=True, text=True, check=True).stdout
    elapsed = time.monotonic() - started
    wrk = parse_wrk(out)
    return Result(
        wrk.rps,
        wrk.p50_ms,
        wrk.p99_ms,
        wrk.errors,
        (cpu_seconds(server_pid) - before) / elapsed * 100,
        (cpu_seconds(nginx_pid) - nginx_before) / elapsed * 100,
    )


def _latency(out: str, percentile: str) -> float:
    match = re.search(rf"{re.escape(percentile)}\s+([\d.]+)(us|ms|s)", out)
    if not match:
        return float("nan")
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def wait_http(url: str, timeout: float = 30) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def start_server(kind: str, work: Path, upstream: str, port: int, ledger: list[str] | None = None, log_level: str = "warning") -> subprocess.Popen[bytes]:
    """`ledger`: the gateway's ledger arguments (default: an SQLite file, `--db`). `log_level`
    info writes the gateway's request log, to work/gateway.log."""
    env = {**os.environ, "UPSTREAM": upstream}
    if kind == "bare":
        # The bare pass-through forwards to the same nginx paths as the gateway's providers.
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.bare_passthrough:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
    else:
        command = [
            sys.executable,
            "main.py",
            "--config",
            str(work / "api.yaml"),
            # The default layout (./api.yaml, ./data/tollgate.db): with the ledger beside api.yaml,
            # the config watcher would also wake on every ledger write.
            *(ledger if ledger is not None else ["--db", str(work / "data" / "ledger.db")]),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            log_level,
        ]
    if kind != "bare" and log_level in ("info", "debug"):
        with open(work / "gateway.log", "ab") as log:
            process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=log)
    else:
        process = subprocess.Popen(command, cwd=ROOT, env=env)
    wait_http(f"http://127.0.0.1:{port}/v1/chat/completions")
    return process


def require_tools() -> None:
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            sys.exit(f"{tool} is not installed: apt-get install nginx-light wrk")


def start_nginx(work: Path) -> tuple[subprocess.Popen[bytes], str, int]:
    """The fake upstream: the process, its URL and its worker's pid (the one that serves)."""
    nginx_port = free_port()
    nginx = subprocess.Popen([shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(nginx_config(work, nginx_port))])
    time.sleep(0.5)
    try:
        nginx_worker = int(subprocess.run(["pgrep", "-P", str(nginx.pid)], capture_output=True, text=True).stdout.split()[0])
    except (IndexError, ValueError):
        nginx.terminate()
        nginx.wait(timeout=10)
        raise RuntimeError(f"nginx did not start: see {work / 'nginx-error.log'}") from None
    return nginx, f"http://127.0.0.1:{nginx_port}", nginx_worker


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--log-level", default="warning", help="the gateway's; info adds its request log (written to a file)")
    args = parser.parse_args()
    require_tools()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        nginx, upstream, nginx_worker = start_nginx(work)
        gateway_config(work, upstream)
        scripts = {False: wrk_script(work, False), True: wrk_script(work, True)}
        results: dict[tuple[str, str], list[Result]] = {}
        try:
            for repeat in range(args.repeats):
                # Both servers run at once (the idle one costs nothing) and each load runs on one
                # and then the other straight away, which goes first alternating between repeats:
                # this VM's speed drifts over minutes, and the ratio should compare like with like.
                order = ("bare", "gateway") if repeat % 2 == 0 else ("gateway", "bare")
                ports = {kind: free_port() for kind in order}
                servers = {kind: start_server(kind, work, upstream, port, log_level=args.log_level) for kind, port in ports.items()}
                urls = {kind: f"http://127.0.0.1:{port}/v1/chat/completions" for kind, port in ports.items()}
                try:
                    for stream in (False, True):
                        mode = "stream" if stream else "json"
                        for connections, seconds in ((args.connections, args.duration), (1, max(min(5, args.duration), args.duration // 2))):
                            for kind, server in servers.items():
                                if connections == args.connections:
                                    run_wrk(urls[kind], scripts[stream], connections, args.warmup, server.pid, nginx_worker)
                                results.setdefault((kind, f"{mode} x{connections}"), []).append(
                                    run_wrk(urls[kind], scripts[stream], connections, seconds, server.pid, nginx_worker)
                                )
                finally:
                    for server in servers.values():
                        server.send_signal(signal.SIGTERM)
                        server.wait(timeout=60)
        finally:
            nginx.terminate()
            nginx.wait(timeout=10)
        report(results, args)
    errors = sum(r.errors for runs in results.values() for r in runs)
    if errors:
        sys.exit(f"{errors} requests failed")


def report(results: dict[tuple[str, str], list[Result]], args: argparse.Namespace) -> None:
    print(f"\nmedian of {args.repeats} runs, {args.duration} s each, 1 worker per process, {os.cpu_count()} cores")
    print(f"{'load':12} {'server':8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'cpu %':>6} {'nginx cpu %':>12} {'vs bare':>8}")
    loads = sorted({load for _, load in results}, key=lambda load: (load.split()[0], -int(load.split("x")[1])))
    for load in loads:
        # The ratio is the median of each repeat's gateway / bare, the two measured back to back.
        ratios = [g.rps / b.rps for g, b in zip(results[("gateway", load)], results[("bare", load)], strict=True)]
        for kind in ("bare", "gateway"):
            runs = results[(kind, load)]
            rps = statistics.median(r.rps for r in runs)
            ratio = statistics.median(ratios) if kind == "gateway" else 1.0
            print(f"{load:12} {kind:8} {rps:8.0f} {statistics.median(r.p50_ms for r in runs):8.2f} {statistics.median(r.p99_ms for r in runs):8.2f} "
                  f"{sum(r.errors for r in runs):7d} {statistics.median(r.cpu_pct for r in runs):6.0f} {statistics.median(r.upstream_cpu_pct for r in runs):12.0f} {ratio:8.0%}")  # fmt: skip
        if len(ratios) > 1:
            print(f"{'':12} {'':8} gateway / bare per repeat: {', '.join(f'{r:.0%}' for r in ratios)}")


if __name__ == "__main__":
    main()
