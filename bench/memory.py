"""Resident memory of a real gateway with a large config: the supervisor and each worker.

Starts `tollway run` (2 workers by default) with the chain benchmark's config grown to `--routes` routes
and 10,000 key-auth consumers (bench/gen_chain.py), waits until every worker has applied it (/ready),
and prints each process's RSS. Then it reloads the same file with one route changed (SIGHUP) and prints
how long the apply took (from the signal to the supervisor's "config version 2 applied", and to every
worker having applied it: /ready answers 200 again) and the RSS after it.

    python bench/memory.py [--routes 10000] [--workers 2] [--rate-limit local]

RSS is not timing: the figures hold on a loaded machine. The apply time does move with load.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_chain import chain_config

_BANNER = re.compile(r"status http://127\.0\.0\.1:(\d+)")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    return sorted(int(p) for p in out.split())


def write_config(path: Path, routes: int, rate_limit: str | None, marker: str) -> None:
    config = chain_config(access_log=str(path.with_suffix(".log")), rate_limit=rate_limit, routes=routes)
    config["gateway"].update(listen=["127.0.0.1:0"], status_listen="127.0.0.1:0", watch_interval=0)
    config["routes"][0]["paths"] = [f"/{marker}/"]
    text = yaml.dump(config, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def ready(status_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{status_port}/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def report(label: str, supervisor: int) -> None:
    print(f"{label}:")
    print(f"  supervisor pid {supervisor}: {rss_mb(supervisor):6.1f} MB")
    for pid in children(supervisor):
        print(f"  worker     pid {pid}: {rss_mb(pid):6.1f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routes", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rate-limit", choices=["local", "batched", "none"], default="local")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds to wait after ready")
    parser.add_argument("--log", action="store_true", help="print the gateway's output at the end")
    args = parser.parse_args()
    rate_limit = None if args.rate_limit == "none" else args.rate_limit
    with tempfile.TemporaryDirectory(prefix="tollway-mem-") as tmp:
        path = Path(tmp) / "gateway.yaml"
        write_config(path, args.routes, rate_limit, "first")
        print(f"{args.routes} routes, 10,000 key-auth consumers, {args.workers} workers: {path}")
        lines: list[str] = []
        cmd = [sys.executable, "-m", "tollway", "run", "-c", str(path), "--workers", str(args.workers)]
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp)
        assert proc.stdout is not None
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
        reader.start()
        try:
            status_port = _wait_status_port(lines, proc)
            while not ready(status_port):
                time.sleep(0.1)
            print(f"ready after {time.monotonic() - started:.1f} s")
            time.sleep(args.settle)
            report("after the first config", proc.pid)
            write_config(path, args.routes, rate_limit, "second")
            signalled = time.monotonic()
            proc.send_signal(signal.SIGHUP)
            _wait_line(lines, proc, "config version 2 applied")
            applied = time.monotonic() - signalled
            while not ready(status_port):  # every worker on version 2
                time.sleep(0.01)
            print(
                f"reload: supervisor sent version 2 {applied:.2f} s after SIGHUP, "
                f"every worker applied it after {time.monotonic() - signalled:.2f} s"
            )
            time.sleep(args.settle)
            report("after a reload", proc.pid)
            if args.log:
                print("".join(lines), end="")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _wait_status_port(lines: list[str], proc: subprocess.Popen[str], timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(lines):
            m = _BANNER.search(line)
            if m:
                return int(m.group(1))
        if proc.poll() is not None:
            raise SystemExit("gateway exited:\n" + "".join(lines))
        time.sleep(0.1)
    raise SystemExit("gateway did not start:\n" + "".join(lines))


def _wait_line(lines: list[str], proc: subprocess.Popen[str], text: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in line for line in list(lines)):
            return
        if proc.poll() is not None:
            raise SystemExit("gateway exited:\n" + "".join(lines))
        time.sleep(0.01)
    raise SystemExit(f"no {text!r} in the output:\n" + "".join(lines[-20:]))


if __name__ == "__main__":
    main()
