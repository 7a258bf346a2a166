"""Runs Tollway's benchmark scenarios through bench/run.sh and records the figures.

Scenarios (each a gateway config; the harness's backend is nginx on 127.0.0.1:9001):
  passthrough  one route, one backend                   beside nginx, haproxy, caddy, aiohttp; and the
               instructions per request of the hot path (bench/instructions.sh, callgrind)
  routes       10 vs 10,000 prefix routes (/svcN/)       the router's cost must not grow with routes
  leastconn4   least-connections over four targets with   vs one-target pass-through (upstream layer)
               active health checks (bench/leastconn4.yaml)
  chain        1,000 routes + key-auth (10,000 consumers) + correlation-id + access log, beside nginx-chain:
               without a rate limit, with a local one, with a batched Redis one (+ Redis commands/request)
  limit-cost   the chain with a local limit ÷ without one, Tollway alone, alternated (issue 17's ≤ 1.15×)
  observability  pass-through with metrics + access log file, and + tracing at 1% to a dead collector,
               vs plain pass-through (bench/passthrough-observed.yaml, passthrough-traced.yaml)
  idle-rss     resident memory of an idle worker
  cache        proxy-cache hits (node store, Redis store) beside nginx proxy_cache and tollway's own
               pass-through on /cached/user/1 (bench/cache_scenario.py)

    python bench/bench.py [--seconds 8] [--connections 64] [--rounds 3] [--scenario passthrough ...]
                          [--record bench/RESULTS.md]

Each figure is the median over rounds; ratios compare figures from the same round. Wall-clock figures
move with machine load: record ratios, not absolutes. Needs bench/setup.sh run once.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cache_scenario  # bench/ is on sys.path when this script runs
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HARNESS = Path(os.environ.get("TOLLWAY_BENCH_HARNESS", ROOT / "bench" / "run.sh"))
TOLLWAY = [sys.executable, "-m", "tollway"]
_LINE = re.compile(r"^(\S+)\s+status=(\d+)\s+rps=(\S+)\s+cpu_us/req=(\S+)\s+p50=(\S+)\s+p99=(\S+)\s*(.*)$")


def run_harness(
    targets: list[str],
    seconds: int,
    conns: int,
    config: Path | None = None,
    path: str = "/user/1",
    header: str = "",
) -> dict[str, dict[str, str]]:
    env = dict(os.environ, BENCH_PATH=path, BENCH_HEADER=header)
    if config is not None:
        env["GW_CMD"] = " ".join([*TOLLWAY, "run", "-c", str(config), "--workers", "1"])
        env["GW_PORT"] = "8000"
    out = subprocess.run(
        ["bash", str(HARNESS), str(seconds), str(conns), *targets],
        env=env,
        capture_output=True,
        text=True,
        timeout=seconds * len(targets) * 4 + 120,
        check=False,
    ).stdout
    results = {}
    for line in out.splitlines():
        m = _LINE.match(line.strip())
        if m:
            results[m.group(1)] = {
                "status": m.group(2),
                "rps": m.group(3),
                "cpu_us": m.group(4),
                "p50": m.group(5),
                "p99": m.group(6),
                "errors": m.group(7).strip(),
            }
    return results


def routes_config(count: int, directory: Path) -> Path:
    """`count` prefix routes /svc0/ … to the backend, plus a catch-all, one worker, no access log."""
    config = {
        "gateway": {
            "listen": ["127.0.0.1:8000"],
            "status_listen": None,
            "workers": 1,
            "access_log": {"enabled": False},
        },
        "services": [{"name": "backend", "url": "http://127.0.0.1:9001"}],
        "routes": [{"name": f"svc{i}", "service": "backend", "paths": [f"/svc{i}/"]} for i in range(count)]
        + [{"name": "catch-all", "service": "backend", "paths": ["/"]}],
    }
    path = directory / f"routes{count}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _ms(text: str) -> float:
    value = float(re.sub(r"[a-z]+$", "", text))
    return (
        value / 1000
        if text.endswith("us")
        else value * 1000
        if text.endswith("s") and not text.endswith("ms")
        else value
    )


def passthrough(args: argparse.Namespace) -> list[str]:
    rounds = [
        run_harness(
            ["nginx", "haproxy", "caddy", "aiohttp", "gateway"],
            args.seconds,
            args.connections,
            HERE / "passthrough.yaml",
        )
        for _ in range(args.rounds)
    ]
    lines = [
        "### Pass-through (one route, one backend; one worker each)",
        "",
        "| target | req/s | CPU µs/req | p50 | p99 | errors |",
        "|---|---|---|---|---|---|",
    ]
    for target in ("nginx", "haproxy", "caddy", "aiohttp", "gateway"):
        cpu = _median(rounds, target, "cpu_us")
        rps = _median(rounds, target, "rps")
        p50 = _median(rounds, target, "p50", _ms)
        p99 = _median(rounds, target, "p99", _ms)
        errors = (
            "; ".join(r[target]["errors"] for r in rounds if target in r and r[target]["errors"]) or "none"
        )
        name = "tollway" if target == "gateway" else target
        lines.append(f"| {name} | {rps:,.0f} | {cpu:.1f} | {p50:.2f} ms | {p99:.2f} ms | {errors} |")
    ratios = [
        (
            float(r["gateway"]["cpu_us"]) / float(r["nginx"]["cpu_us"]),
            float(r["gateway"]["cpu_us"]) / float(r["aiohttp"]["cpu_us"]),
            _ms(r["gateway"]["p99"]) / _ms(r["nginx"]["p99"]),
        )
        for r in rounds
        if "gateway" in r and "nginx" in r and "aiohttp" in r
    ]
    if ratios:
        lines += [
            "",
            "Per-round ratios (tollway ÷ reference, same round): CPU vs nginx "
            + ", ".join(f"{a:.2f}" for a, _, _ in ratios)
            + "; CPU vs aiohttp "
            + ", ".join(f"{b:.2f}" for _, b, _ in ratios)
            + "; p99 vs nginx "
            + ", ".join(f"{c:.2f}" for _, _, c in ratios)
            + ".",
            f"Bar: CPU ≤ 1.2× nginx (median {statistics.median(a for a, _, _ in ratios):.2f}), "
            f"≤ 0.25× aiohttp (median {statistics.median(b for _, b, _ in ratios):.2f}), "
            f"p99 ≤ 2× nginx (median {statistics.median(c for _, _, c in ratios):.2f}).",
        ]
    return [*lines, "", instructions_line()]


_INSTRUCTIONS = re.compile(r"hot path: (\d+) instructions/request")
INSTRUCTIONS_BAR = 30_000


def instructions_line() -> str:
    """Instructions per pass-through request, counted by callgrind (bench/instructions.sh): the figure
    that does not move with machine load, so it compares across machines and runs."""
    if subprocess.run(["sh", "-c", "command -v valgrind"], capture_output=True).returncode != 0:
        return "Instructions per request: not measured (valgrind is not installed)."
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(
        ["bash", str(HERE / "instructions.sh")], capture_output=True, text=True, env=env, timeout=1800
    )
    found = _INSTRUCTIONS.search(out.stdout)
    if found is None:
        return f"Instructions per request: bench/instructions.sh failed: {(out.stderr or out.stdout)[-300:]}"
    count = int(found.group(1))
    verdict = "within" if count <= INSTRUCTIONS_BAR else "over"
    return (
        f"Instructions per request (pass-through hot path, callgrind, `bash bench/instructions.sh`): "
        f"{count:,} — {verdict} the bar of {INSTRUCTIONS_BAR:,}."
    )


def _gateway_pairs(
    args: argparse.Namespace, a: Path, b: Path, a_path: str = "/user/1", b_path: str = "/user/1"
) -> list[tuple[float, float]]:
    """The gateway's CPU µs/req under config `a` and under config `b`, one pair per round (a round
    missing either figure is left out)."""
    pairs = []
    for _ in range(args.rounds):  # alternate, so drift hits both alike
        ra = run_harness(["gateway"], args.seconds, args.connections, a, path=a_path)
        rb = run_harness(["gateway"], args.seconds, args.connections, b, path=b_path)
        if "gateway" in ra and "gateway" in rb:
            pairs.append((float(ra["gateway"]["cpu_us"]), float(rb["gateway"]["cpu_us"])))
    return pairs


def _pairs_table(
    heading: str, a_label: str, b_label: str, bar: str, pairs: list[tuple[float, float]]
) -> list[str]:
    """A markdown section: one row per round with the b/a ratio, then the bar with the median ratio."""
    lines = [
        f"### {heading}",
        "",
        f"| round | {a_label} CPU µs/req | {b_label} CPU µs/req | ratio |",
        "|---|---|---|---|",
    ]
    for i, (a, b) in enumerate(pairs, 1):
        lines.append(f"| {i} | {a:.1f} | {b:.1f} | {b / a:.2f} |")
    if pairs:
        lines += ["", f"Bar: {bar} (median ratio {statistics.median(b / a for a, b in pairs):.2f})."]
    return lines


def routes(args: argparse.Namespace) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        small, large = routes_config(10, Path(tmp)), routes_config(10_000, Path(tmp))
        pairs = _gateway_pairs(args, small, large, a_path="/svc5/user/1", b_path="/svc5000/user/1")
    return _pairs_table(
        "Routes: 10 vs 10,000 prefix routes (request hits /svc5/ or /svc5000/)",
        "10 routes",
        "10,000 routes",
        "10,000 routes ≤ 1.1× the CPU of 10 routes",
        pairs,
    )


def leastconn4(args: argparse.Namespace) -> list[str]:
    pairs = _gateway_pairs(args, HERE / "passthrough.yaml", HERE / "leastconn4.yaml")
    return _pairs_table(
        "Upstreams: least-connections over four targets with health checks vs one-target pass-through",
        "pass-through",
        "least-connections ×4",
        "≤ 1.1× the CPU of the pass-through",
        pairs,
    )


CHAIN_VARIANTS = (
    # (name, rate_limit, bar): issue 4's chain without a limit (2×); issue 17's with a never-tripping
    # local limit (1.5×) and batched Redis one (1.6×, and no answer but 2xx)
    ("no rate limit", None, 2.0),
    ("local rate limit", "local", 1.5),
    ("batched redis rate limit", "batched", 1.6),
)


def chain(args: argparse.Namespace) -> list[str]:
    """The common chain (bench/gen_chain.py) beside nginx-chain: key-auth over 10,000 consumers, 1,000
    routes, correlation-id, a JSON access log to a file — without a rate limit, with a local one and
    with a batched Redis one (each never trips, like nginx-chain's limit_req). For the batched variant,
    Redis commands per request: EVALSHA/EVAL calls (INFO commandstats) over access log lines."""
    from gen_chain import chain_config  # bench/ is on sys.path when this script runs

    lines = [
        "### Chain: 1,000 routes, key-auth over 10,000 consumers, correlation-id, JSON access log, "
        "rate limit",
        "",
        "| round | variant | nginx-chain CPU µs/req | tollway CPU µs/req | ratio | Redis cmds/req | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    ratios: dict[str, list[float]] = {name: [] for name, _, _ in CHAIN_VARIANTS}
    cpu: dict[str, list[float]] = {name: [] for name, _, _ in CHAIN_VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(1, args.rounds + 1):
            for name, rate_limit, _ in CHAIN_VARIANTS:
                log = Path(tmp) / "access.log"
                log.unlink(missing_ok=True)
                config = Path(tmp) / "chain.yaml"
                config.write_text(yaml.safe_dump(chain_config(str(log), rate_limit), sort_keys=False))
                before = _redis_script_calls()
                r = run_harness(
                    ["nginx-chain", "gateway"],
                    args.seconds,
                    args.connections,
                    config,
                    path="/svc500/user/1",
                    header="apikey: key-42",
                )
                per_request = "—"
                if rate_limit == "batched":
                    requests = sum(1 for _ in log.open()) if log.exists() else 0
                    per_request = f"{(_redis_script_calls() - before) / max(requests, 1):.4f}"
                if "gateway" in r and "nginx-chain" in r:
                    a, b = float(r["nginx-chain"]["cpu_us"]), float(r["gateway"]["cpu_us"])
                    ratios[name].append(b / a)
                    cpu[name].append(b)
                    errors = r["gateway"]["errors"] or "none"
                    row = f"| {i} | {name} | {a:.1f} | {b:.1f} | {b / a:.2f} | {per_request} | {errors} |"
                    lines.append(row)
    lines.append("")
    for name, _, bar in CHAIN_VARIANTS:
        if ratios[name]:
            median = statistics.median(ratios[name])
            lines.append(f"- {name}: median ratio {median:.2f} (bar ≤ {bar:g}× nginx-chain)")
    pairs = list(zip(cpu["no rate limit"], cpu["local rate limit"], strict=False))
    if pairs:  # issue 17's target for the local limit's own cost, Tollway against itself, same round
        own = [b / a for a, b in pairs]
        lines.append(
            "- local rate limit ÷ no rate limit (Tollway CPU, same round): "
            + ", ".join(f"{r:.2f}" for r in own)
            + f"; median {statistics.median(own):.2f} (target ≤ 1.15)"
        )
    return lines


def limit_cost(args: argparse.Namespace) -> list[str]:
    """The local limit's own cost (issue 17's ≤ 1.15× target): the chain without a limit and with a local
    one, Tollway alone, alternated `2 × rounds` times so both see the same machine; the median of the
    pairs' ratios. The chain scenario's same-round ratio has nginx runs in between and moves more."""
    from gen_chain import chain_config  # bench/ is on sys.path when this script runs

    cpu: dict[str, list[float]] = {"none": [], "local": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(2 * args.rounds):
            for variant in cpu:
                log = Path(tmp) / "access.log"
                log.unlink(missing_ok=True)
                config = Path(tmp) / "chain.yaml"
                limit = None if variant == "none" else variant
                config.write_text(yaml.safe_dump(chain_config(str(log), limit), sort_keys=False))
                r = run_harness(
                    ["gateway"], args.seconds, args.connections, config, "/svc500/user/1", "apikey: key-42"
                )
                if "gateway" in r:
                    cpu[variant].append(float(r["gateway"]["cpu_us"]))
    pairs = [b / a for a, b in zip(cpu["none"], cpu["local"], strict=False)]
    if not pairs:
        return ["### Local limit's own cost", "", "(no figures: the gateway did not run)"]
    return [
        "### Local limit's own cost: the chain with a local limit ÷ without one (Tollway alone, alternated)",
        "",
        "Tollway CPU µs/req without: "
        + ", ".join(f"{v:.1f}" for v in cpu["none"])
        + "; with: "
        + ", ".join(f"{v:.1f}" for v in cpu["local"])
        + ".",
        "",
        "Ratios " + ", ".join(f"{r:.2f}" for r in pairs) + f"; median {statistics.median(pairs):.2f}"
        " (target ≤ 1.15).",
    ]


def _redis_script_calls(host: str = "127.0.0.1", port: int = 6379) -> int:
    """EVALSHA + EVAL calls the Redis server has run (INFO commandstats)."""
    out = subprocess.run(
        ["redis-cli", "-h", host, "-p", str(port), "info", "commandstats"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return sum(int(m) for m in re.findall(r"cmdstat_eval(?:sha)?:calls=(\d+)", out))


_BENCH_LOG = Path("/tmp/tollway-bench-access.log")


def observability(args: argparse.Namespace) -> list[str]:
    """Metrics + access log (to a file) and + tracing at 1% (collector unreachable) vs pass-through."""
    rows = []
    for _ in range(args.rounds):  # alternate, so drift hits all three alike
        figures = []
        for name in ("passthrough", "passthrough-observed", "passthrough-traced"):
            _BENCH_LOG.unlink(missing_ok=True)  # the configs' access log: ~50 MB a run
            r = run_harness(["gateway"], args.seconds, args.connections, HERE / f"{name}.yaml")
            figures.append(float(r["gateway"]["cpu_us"]) if "gateway" in r else float("nan"))
        rows.append(figures)
    _BENCH_LOG.unlink(missing_ok=True)
    lines = [
        "### Observability: metrics + access log file, + tracing at 1%, vs pass-through",
        "",
        "| round | pass-through CPU µs/req | + metrics, log | ratio | + tracing 1% | vs metrics, log |",
        "|---|---|---|---|---|---|",
    ]
    for i, (a, b, c) in enumerate(rows, 1):
        lines.append(f"| {i} | {a:.1f} | {b:.1f} | {b / a:.2f} | {c:.1f} | {c / b:.2f} |")
    if rows:
        lines += [
            "",
            f"Bar: metrics + log ≤ 1.15× (median ratio {statistics.median(b / a for a, b, _ in rows):.2f}); "
            f"tracing at 1% adds ≤ 5% (median ratio {statistics.median(c / b for _, b, c in rows):.2f}).",
        ]
    return lines


def idle_rss(args: argparse.Namespace) -> list[str]:
    proc = subprocess.Popen(
        [*TOLLWAY, "run", "-c", str(HERE / "passthrough.yaml"), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(4)
        children = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
        rss = [_rss_mb(int(pid)) for pid in children]
        supervisor = _rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(15)
    worker = max(rss) if rss else float("nan")
    return [
        "### Memory",
        "",
        f"Idle worker RSS: {worker:.1f} MB (bar: under 40 MB); supervisor: {supervisor:.1f} MB.",
    ]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _median(rounds: list[dict[str, dict[str, str]]], target: str, key: str, conv=float) -> float:  # type: ignore[no-untyped-def]
    values = [conv(r[target][key]) for r in rounds if target in r and r[target][key] not in ("-", "")]
    return statistics.median(values) if values else float("nan")


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return (
        f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}, "
        f"tollway compiled modules: {_compiled()}"
    )


def _compiled() -> str:
    from tollway._build import compiled_modules

    return str(len(compiled_modules()))


SCENARIOS = {
    "passthrough": passthrough,
    "routes": routes,
    "leastconn4": leastconn4,
    "chain": chain,
    "limit-cost": limit_cost,
    "observability": observability,
    "idle-rss": idle_rss,
    "cache": lambda args: cache_scenario.cache(args, run_harness),  # bench/cache_scenario.py
}


def main() -> None:
    parser = argparse.ArgumentParser(description="Tollway benchmark scenarios")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    parser.add_argument("--record", type=Path, help="append the results to this markdown file")
    args = parser.parse_args()
    if not HARNESS.exists():
        sys.exit(f"benchmark harness not found at {HARNESS} (set TOLLWAY_BENCH_HARNESS)")
    when = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [
        f"## {when} — `python bench/bench.py --seconds {args.seconds} --connections {args.connections} "
        f"--rounds {args.rounds}`",
        "",
        f"Machine: {machine()}.",
        "",
    ]
    for name in args.scenario or list(SCENARIOS):
        lines += [*SCENARIOS[name](args), ""]
    text = "\n".join(lines)
    print(text)
    if args.record:
        with args.record.open("a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
