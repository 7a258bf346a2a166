"""The `tollway` command: `check` (every error with its line, entity and field; exit 1), `--version`,
and `run` refusing bad input before starting anything. Run as a subprocess, as users run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tollway import __version__

ROOT = Path(__file__).resolve().parents[2]

GOOD = """\
upstreams:
  - name: pool
    targets: [{target: "127.0.0.1:8001"}, {target: "127.0.0.1:8002", weight: 50}]
services:
  - {name: api, upstream: pool}
  - {name: legacy, url: "http://127.0.0.1:9000/base"}
routes:
  - {name: health, service: api, paths: ["=/health"]}
  - {name: orders, service: api, paths: ["/orders/{id}"], methods: [GET]}
  - {name: legacy, service: legacy, paths: [/legacy], strip_path: true}
  - name: users
    service: api
    paths: [users]
"""


def tollway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tollway", *args], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def test_check_a_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(GOOD.replace("paths: [users]", "paths: [/users]"))
    result = tollway("check", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"✓ {path} is valid: 2 services, 4 routes, 1 upstreams, 0 consumers, 0 global plugins"
    )
    assert result.stderr == ""


def test_check_a_bad_file_prints_where_and_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(GOOD)
    result = tollway("check", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"✗ {path}: 1 error",
        f'  {path}:13: routes[3] "users": paths[0]: must start with "/" '
        '(or "=/" for an exact path, "~" for a regular expression)',
    ]


def test_check_prints_every_error(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(
        GOOD
        + "  - {name: users, service: nowhere, paths: [/u2]}\n"
        + "gateway:\n  timeouts: {client_header: soon}\n  limit: {}\n"
    )
    result = tollway("check", str(path))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0] == f"✗ {path}: 5 errors"
    assert lines[1:] == [  # in line order
        f'  {path}:13: routes[3] "users": paths[0]: must start with "/" '
        '(or "=/" for an exact path, "~" for a regular expression)',
        f"  {path}:14: routes[4] \"users\": name: duplicate name 'users'",
        f"  {path}:14: routes[4] \"users\": service: unknown service 'nowhere'",
        f'  {path}:16: gateway.timeouts.client_header: must be a duration such as 5, "5s" or "250ms"',
        f'  {path}:17: gateway.limit: unknown field (did you mean "limits"?)',
    ]


FIVE_MISTAKES = """\
gateway:
  listen: ["127.0.0.1:8000"]
  wokers: 2
services:
  - name: users
    url: http://127.0.0.1:8001
routes:
  - name: users
    service: user
    paths: ["/users"]
    plugins:
      - name: rate-limting
        config: {minute: 5}
  - name: orders
    service: users
    paths: ["orders"]
    plugins:
      - name: rate-limiting
        config: {minute: five}
"""


def test_check_prints_five_different_mistakes_at_once_in_line_order(tmp_path: Path) -> None:
    # An unknown field, a misspelt reference, an unknown plugin, a bad path and a bad plugin option:
    # the unknown plugin is reported although the schema errors keep the file from validating.
    path = tmp_path / "gw.yaml"
    path.write_text(FIVE_MISTAKES)
    result = tollway("check", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"✗ {path}: 5 errors",
        f'  {path}:3: gateway.wokers: unknown field (did you mean "workers"?)',
        f'  {path}:9: routes[0] "users": service: unknown service \'user\' (did you mean "users"?)',
        f'  {path}:12: routes[0] "users": plugins[0] "rate-limting": name: unknown plugin '
        "'rate-limting' (did you mean \"rate-limiting\"?)",
        f'  {path}:16: routes[1] "orders": paths[0]: must start with "/" '
        '(or "=/" for an exact path, "~" for a regular expression)',
        f'  {path}:19: routes[1] "orders": plugins[0] "rate-limiting": config.minute: '
        "must be a whole number, not 'five'",
    ]


def test_check_names_the_line_that_opened_an_unclosed_bracket(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text('gateway:\n  listen: ["0.0.0.0:8000"\n  workers: 2\n')
    result = tollway("check", str(path))
    assert result.returncode == 1
    assert f"{path}:2: invalid YAML: did not find expected ',' or ']'" in result.stderr
    assert "noticed at line 3" in result.stderr


def test_check_a_missing_file(tmp_path: Path) -> None:
    result = tollway("check", str(tmp_path / "missing.yaml"))
    assert result.returncode == 1
    assert "cannot read the file: No such file or directory" in result.stderr


def test_check_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("routes:\n  - name: a\n   bad indent: [\n")
    result = tollway("check", str(path))
    assert result.returncode == 1
    assert f"{path}:3: invalid YAML" in result.stderr


def test_version() -> None:
    result = tollway("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"tollway {__version__}"


def test_run_refuses_a_bad_file_like_check(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(GOOD)
    run = tollway("run", "-c", str(path))
    check = tollway("check", str(path))
    assert run.returncode == 1
    assert run.stderr.splitlines()[-2:] == check.stderr.splitlines()


def test_run_refuses_a_bad_listen_address(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(GOOD.replace("paths: [users]", "paths: [/users]"))
    result = tollway("run", "-c", str(path), "--listen", "nowhere")
    assert result.returncode == 2
    assert "--listen nowhere" in result.stderr


def test_help_shows_no_type_after_flags() -> None:
    for command in ([], ["demo"], ["run"], ["hash-password"]):
        result = tollway(*command, "--help")
        assert result.returncode == 0, result.stderr
        assert "--help" in result.stdout
        assert "<bool>" not in result.stdout, result.stdout  # --help, --version, --exit/--stay take no value
