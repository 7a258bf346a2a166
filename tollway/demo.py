"""`tollway demo`: the gateway in front of two instances of the example user service, working.

It starts two user-service processes (examples/user_service.py) on one SQLite file, puts an upstream
over both (with its service, route and plugins) in a SQLite config store, starts `tollway run` on that
store with the admin API on, sends a few requests itself and shows which instance answered each, adds a
route through the admin API (tollway.demo_admin) — then leaves everything running for you to curl until
Ctrl-C, SIGTERM or SIGHUP, each of which stops every process the demo started. Everything runs on
127.0.0.1 and needs no external service.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from tollway.demo_admin import STORE_FILE, add_route_live, print_admin_curls, seed_store, split_for_store
from tollway.demo_tls import https_status, self_signed
from tollway.errors import TollwayError

_LISTENING = re.compile(r"listening on http://([\d.]+):(\d+)")
_STATUS = re.compile(r"status http://([\d.]+):(\d+)")
_HTTPS = re.compile(r"https://([\d.]+):(\d+)")
_ADMIN = re.compile(r"admin API on http://([\d.]+):(\d+)")
INSTANCES = ("users-a", "users-b")
CLIENT_LIMIT = 5  # requests a minute per client: the seed's example
RATE_LIMIT = {
    "name": "rate-limiting",
    "config": {"minute": CLIENT_LIMIT, "key": "ip", "algorithm": "gcra"},
}
# GET /users/<id> is cached for a minute (the user service sends no Cache-Control); a PUT invalidates it.
CACHE = {"name": "proxy-cache", "config": {"default_ttl": "1m"}}
# The scripted clients: distinct loopback addresses (all of 127/8 reaches this host on Linux), so each
# has its own limit — and yours, from 127.0.0.1, is untouched by the demo's traffic.
CLIENTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6")


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[str]
    port: int
    tls_port: int = 0  # the gateway's HTTPS listener
    admin_port: int = 0  # the gateway's admin API (tollway.demo_admin)


class DemoStopped(Exception):
    """SIGTERM or SIGHUP reached the demo: stop everything it started, as Ctrl-C does."""


def _stop_on_signal(signum: int, frame: object) -> None:
    raise DemoStopped(signal.Signals(signum).name)


def run_demo(port: int, scripted_requests: int, exit_after: bool, console: Console) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="tollway-demo-"))
    processes: list[Process] = []
    previous = {sig: signal.signal(sig, _stop_on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        services = [_start_service(name, workdir) for name in INSTANCES]
        processes += services
        gateway_port = port if port == 0 or _port_free(port) else 0
        if gateway_port != port:
            console.print(f"[yellow]port {port} is busy; using a free port instead[/yellow]")
        config_path = workdir / "demo.yaml"
        config = demo_config(services, gateway_port, workdir / "access.log")
        cert_path = _add_https(config, workdir)
        config, entities = split_for_store(config, workdir)
        try:
            seed_store(entities, workdir)
        except TollwayError as exc:
            raise DemoError(f"writing the config store failed: {exc}") from exc
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        gateway, status_port = _start_gateway(config_path, workdir)
        processes.append(gateway)
        _print_setup(console, services, gateway, status_port, config_path, workdir)
        _scripted_traffic(console, gateway.port, scripted_requests)
        _add_route_live(console, gateway)
        _print_try_it(console, gateway.port, status_port)
        print_admin_curls(console, gateway.admin_port, gateway.port)
        _show_https(console, gateway.tls_port, cert_path)
        if not exit_after:
            _wait_for_interrupt(console, processes)
        return 0
    except DemoError as exc:
        console.print(f"[red]demo failed: {exc}[/red]")
        return 1
    except DemoStopped as exc:
        console.print(f"\n{exc} received: stopping…")
        return 0
    finally:
        for sig in previous:  # a second signal must not interrupt the stopping itself
            signal.signal(sig, signal.SIG_IGN)
        _stop_all(processes)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if processes:
            console.print(f"[dim]demo stopped; its config, database and logs stay in {workdir}[/dim]")


def demo_config(services: list[Process], gateway_port: int, access_log: Path) -> dict[str, Any]:
    """The demo's gateway config: one upstream over both instances, one route to it."""
    return {
        "gateway": {
            "listen": [f"127.0.0.1:{gateway_port}"],
            "status_listen": "127.0.0.1:0",
            "workers": 2,
            # shorter than the 15 s the demo waits for it when stopping: no worker outlives the demo
            "drain_timeout": "5s",
            "access_log": {"path": str(access_log)},
        },
        "upstreams": [
            {
                "name": "users",
                "targets": [{"target": f"127.0.0.1:{s.port}"} for s in services],
            }
        ],
        "services": [{"name": "users", "upstream": "users", "read_timeout": "10s"}],
        "routes": [
            {
                "name": "users",
                "service": "users",
                "paths": ["/users"],
                "methods": ["GET", "PUT"],
                "plugins": [RATE_LIMIT, CACHE],
            }
        ],
    }


class DemoError(Exception):
    pass


# -- processes -----------------------------------------------------------------------------------------
def _start_service(name: str, workdir: Path) -> Process:
    cmd = [
        sys.executable,
        "-m",
        "tollway.examples.user_service",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--db",
        str(workdir / "users.db"),
        "--name",
        name,
    ]
    popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = _read_line(popen, _LISTENING, 15.0)
    if line is None:
        raise DemoError(f"user service {name} did not start")
    return Process(name, popen, int(line.group(2)))


def _start_gateway(config_path: Path, workdir: Path) -> tuple[Process, int]:
    log = open(workdir / "gateway.log", "w")  # noqa: SIM115 - handed to the child process
    cmd = [sys.executable, "-m", "tollway", "run", "-c", str(config_path)]
    env = dict(os.environ, TOLLWAY_CACHE_DIR=str(workdir / "cache"))  # the cache's node store, with the rest
    popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    line = _read_line(popen, _LISTENING, 30.0)
    if line is None:
        raise DemoError(f"the gateway did not start; see {workdir / 'gateway.log'}")
    status = _STATUS.search(line.string)
    https = _HTTPS.search(line.string)
    gateway = Process("gateway", popen, int(line.group(2)), int(https.group(2)) if https else 0)
    admin = _read_line(popen, _ADMIN, 10.0)  # printed right after the listening line
    if admin is None:
        raise DemoError(f"the gateway's admin API did not start; see {workdir / 'gateway.log'}")
    gateway.admin_port = int(admin.group(2))
    return gateway, int(status.group(2)) if status else 0


def _read_line(
    popen: subprocess.Popen[str], pattern: re.Pattern[str], timeout: float
) -> re.Match[str] | None:
    """The first stdout line matching `pattern`, read in a thread so a silent child cannot hang us."""
    found: list[re.Match[str]] = []

    def read() -> None:
        assert popen.stdout is not None
        for text in popen.stdout:
            match = pattern.search(text)
            if match:
                found.append(match)
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    return found[0] if found else None


def _stop_all(processes: list[Process]) -> None:
    for proc in reversed(processes):
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
    for proc in reversed(processes):
        try:
            proc.popen.wait(15)
        except subprocess.TimeoutExpired:
            proc.popen.kill()


def _wait_for_interrupt(console: Console, processes: list[Process]) -> None:
    console.print(
        f"[dim]Press Ctrl-C (or kill -TERM {os.getpid()}) to stop the demo and everything it started.[/dim]"
    )
    try:
        while all(p.popen.poll() is None for p in processes):
            time.sleep(0.5)
        console.print("[red]a demo process exited[/red]")
    except KeyboardInterrupt:
        console.print("\nstopping…")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# -- traffic ---------------------------------------------------------------------------------------------
def _scripted_traffic(console: Console, port: int, count: int) -> None:
    plan = _request_plan(count)
    table = Table(title="Requests through the gateway", show_edge=False, pad_edge=False)
    for column in ("#", "client", "request", "status", "served by", "limit left", "ms", "cache"):
        table.add_column(column, justify="right" if column in ("#", "ms", "limit left") else "left")
    served: Counter[str] = Counter()
    limited: Counter[str] = Counter()
    retry_after = ""
    hits, put_path, after_put = 0, "", ""
    for number, (client, method, path, body) in enumerate(plan, 1):
        answer = _send(port, client, method, path, body)
        if answer.cache == "HIT":
            hits += 1  # never reached an instance (the copy's X-Instance names the one that made it)
        else:
            served[answer.instance] += 1
        if method == "PUT":
            put_path = path
        elif put_path == path and not after_put:
            after_put = answer.cache
        if answer.status == 429:
            limited[client] += 1
            retry_after = answer.retry_after
        status = f"[red]{answer.status}[/red]" if answer.status == 429 else str(answer.status)
        row = (str(number), client, f"{method} {path}", status, answer.instance, answer.remaining)
        table.add_row(*row, f"{answer.elapsed * 1000:.1f}", answer.cache)
    console.print(table)
    spread = " · ".join(f"{name} {served[name]}" for name in INSTANCES)
    console.print(f"Round-robin spread over both instances: [bold]{spread}[/bold]")
    console.print(f"Cache: [bold]{hits} × HIT[/bold] answered by the gateway from its copy (X-Cache-Status)")
    if after_put:
        console.print(
            f"The PUT invalidated {put_path}: the next GET of it was a {after_put}, with the new value"
        )
    for client, denied in limited.items():
        console.print(
            f"Rate limit: client {client} sent more than {CLIENT_LIMIT} requests in a minute and got "
            f"[bold]{denied} × 429[/bold] (Retry-After: {retry_after} s), answered by the gateway"
        )
    console.print()


def _request_plan(count: int) -> list[tuple[str, str, str, bytes | None]]:
    """(client, method, path, body): the first client asks for two more than its limit (the last two
    get 429); the others share the rest within their limits: reads, one PUT, reads that see it."""
    first = min(count, CLIENT_LIMIT + 2)
    plan: list[tuple[str, str, str, bytes | None]] = [
        (CLIENTS[0], "GET", f"/users/{(i % 2) + 1}", None) for i in range(first)
    ]
    carol = json.dumps({"name": "carol", "email": "carol@example.com"}).encode()
    others = CLIENTS[1:]
    for i in range(count - first):
        client = others[i % len(others)]
        if i == 0:
            plan.append((client, "PUT", "/users/3", carol))
        else:
            plan.append((client, "GET", f"/users/{(i % 3) + 1}", None))
    return plan


@dataclass
class Answer:
    status: int
    instance: str  # the X-Instance header: which user service answered ("gateway": none did)
    remaining: str  # r= of the RateLimit header: requests this client has left
    retry_after: str
    elapsed: float
    cache: str = ""  # X-Cache-Status: HIT, MISS, ...


def _send(port: int, client: str, method: str, path: str, body: bytes | None) -> Answer:
    headers = {"Content-Type": "application/json"} if body else {}
    start = time.perf_counter()
    conn = _connect(port, client)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
    except OSError as exc:
        raise DemoError(f"{method} {path} failed: {exc}") from exc
    finally:
        conn.close()
    remaining = re.search(r";r=(\d+)", resp.getheader("RateLimit", ""))
    return Answer(
        resp.status,
        resp.getheader("X-Instance", "gateway"),
        remaining.group(1) if remaining else "",
        resp.getheader("Retry-After", ""),
        time.perf_counter() - start,
        resp.getheader("X-Cache-Status", ""),
    )


def _connect(port: int, client: str) -> http.client.HTTPConnection:
    """A connection from `client`'s address; from the default one where the system has no such
    loopback address (then the scripted clients share one limit)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(client, 0))
    try:
        conn.connect()
    except OSError:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    return conn


def _add_route_live(console: Console, gateway: Process) -> None:
    try:
        add_route_live(console, gateway.admin_port, gateway.port)
    except (OSError, ValueError) as exc:
        raise DemoError(f"adding a route through the admin API failed: {exc}") from exc


# -- HTTPS (tollway.demo_tls) ------------------------------------------------------------------------------
def _add_https(config: dict[str, Any], workdir: Path) -> str:
    """An HTTPS listener beside the clear one, with a self-signed certificate made now."""
    cert, key = self_signed(workdir)
    config["gateway"]["listen"].append("127.0.0.1:0 tls")
    config["certificates"] = [{"name": "demo", "cert": cert, "key": key, "snis": ["localhost"]}]
    return cert


def _show_https(console: Console, port: int, cert_path: str) -> None:
    if not port:
        return
    try:
        status, version = https_status(port, cert_path, "/users/1")
    except OSError as exc:
        raise DemoError(f"the HTTPS request failed: {exc}") from exc
    console.print(
        f"\n[bold]HTTPS[/bold] on https://127.0.0.1:{port} with a self-signed certificate made at start "
        f"(GET /users/1 over {version}: {status}). Trust it explicitly:"
    )
    console.print(f"  curl --cacert {cert_path} https://localhost:{port}/users/1", markup=False)


# -- output ----------------------------------------------------------------------------------------------
def _print_setup(
    console: Console, services: list[Process], gateway: Process, status_port: int, config: Path, workdir: Path
) -> None:
    console.print("[bold]Tollway demo[/bold]")
    for service in services:
        console.print(f"  user service [cyan]{service.name}[/cyan] on http://127.0.0.1:{service.port}")
    console.print(f"  both on one SQLite database: {workdir / 'users.db'}")
    console.print(
        f"  gateway on [bold]http://127.0.0.1:{gateway.port}[/bold] (2 workers) → upstream "
        f'"users", round-robin over both instances'
    )
    console.print(
        f"  rate limit: {CLIENT_LIMIT} requests a minute per client address (rate-limiting plugin, "
        "local policy: one exact count shared by both workers)"
    )
    console.print(f"  config: {config}   status: http://127.0.0.1:{status_port}/status")
    console.print(
        f"  its upstream, service, route and plugins ({workdir / 'entities.yaml'}) are in the SQLite "
        f"config store {workdir / STORE_FILE}, changed live through the admin API "
        f"http://127.0.0.1:{gateway.admin_port}"
    )
    console.print(f"  access log (one JSON line per request): {workdir / 'access.log'}")
    console.print(
        f"  gateway pid [bold]{gateway.popen.pid}[/bold]: edit the config's gateway settings, "
        f"then kill -HUP {gateway.popen.pid} to reload them without dropping a connection\n"
    )


def _print_try_it(console: Console, port: int, status_port: int) -> None:
    base = f"http://127.0.0.1:{port}"
    console.print("[bold]Try it yourself[/bold] (the X-Instance header says which instance answered):")
    console.print(f"  curl -i {base}/users/1", markup=False)
    console.print(
        f"  curl -X PUT {base}/users/4 -H 'Content-Type: application/json' "
        '-d \'{"name": "dave", "email": "dave@example.com"}\'',
        markup=False,
    )
    console.print(
        f"  curl -i {base}/nothing-here        # 404 from the gateway, JSON with a request id", markup=False
    )
    console.print(
        f"  for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{{http_code}} ' {base}/users/1; done"
        f"   # 5 x 200, then 429",
        markup=False,
    )
    console.print(f"  curl http://127.0.0.1:{status_port}/status", markup=False)
    console.print(f"  curl http://127.0.0.1:{status_port}/metrics   # Prometheus", markup=False)
