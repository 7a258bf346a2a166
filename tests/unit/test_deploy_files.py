"""The Dockerfile and compose.yaml, checked as far as a machine without image access allows: parsed
by Docker's own Dockerfile parser and by YAML, and held to what they promise (a multi-stage build, a
non-root runtime, the status listener as the health check, three gateway nodes with Redis and the
demo's services, a gateway config that `tollway check` accepts)."""

from __future__ import annotations

from typing import Any

import dockerfile
import yaml

from tests.support import ROOT
from tollway.config.loader import load_file


def _stages() -> list[list[Any]]:
    stages: list[list[Any]] = []
    for command in dockerfile.parse_file(str(ROOT / "Dockerfile")):
        if command.cmd == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(command)
    return stages


def _find(stage: list[Any], cmd: str) -> list[Any]:
    return [c for c in stage if c.cmd == cmd]


def test_dockerfile_builds_the_wheel_in_one_stage_and_runs_it_unprivileged_in_another() -> None:
    build, runtime = _stages()
    assert _find(build, "FROM")[0].value[-2:] == ("AS", "build")
    assert any("pip wheel" in c.value[0] for c in _find(build, "RUN"))
    assert any("TOLLWAY_REQUIRE_COMPILED" in c.value for c in _find(build, "ENV"))  # no silent fallback
    assert _find(runtime, "COPY")[0].flags == ("--from=build",)
    runtime_runs = " ".join(c.value[0] for c in _find(runtime, "RUN"))
    assert "gcc" not in runtime_runs and "--no-index" in runtime_runs
    users = _find(runtime, "USER")
    assert users and users[-1].value[0].split(":")[0] not in ("root", "0")
    assert _find(runtime, "ENTRYPOINT")[0].value == ("tollway",)


def test_dockerfile_health_check_asks_the_status_listener() -> None:
    (check,) = _find(_stages()[-1], "HEALTHCHECK")
    assert check.json and check.value[:3] == ("CMD", "python", "-c")
    script = check.value[3]
    compile(script, "HEALTHCHECK", "exec")  # valid Python
    assert "http://127.0.0.1:8100/ready" in script
    assert any("--timeout=" in flag for flag in check.flags)


def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_runs_three_gateways_with_redis_and_the_user_services() -> None:
    services = _compose()["services"]
    gateways = sorted(name for name in services if name.startswith("gateway-"))
    assert gateways == ["gateway-1", "gateway-2", "gateway-3"]
    assert {"redis", "users-a", "users-b"} <= set(services)
    published = [port.split(":")[-2] for name in gateways for port in services[name]["ports"]]
    assert len(published) == len(set(published)) == 6  # traffic and status port per node, no clash
    for name in gateways:
        gateway = services[name]
        assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
        assert any(v.endswith(":/etc/tollway/tollway.yaml:ro") for v in gateway["volumes"])
    assert services["redis"]["healthcheck"]["test"][:2] == ["CMD", "redis-cli"]
    for name in ("users-a", "users-b"):
        assert services[name]["entrypoint"][:3] == ["python", "-m", "tollway.examples.user_service"]


def test_compose_gateway_config_is_valid_and_points_at_compose_services() -> None:
    compose = _compose()
    mount = compose["services"]["gateway-1"]["volumes"][0].split(":")[0]
    config = load_file(ROOT / mount)  # raises ConfigError, with every problem, if invalid
    assert config.gateway.status_listen is not None and config.gateway.status_listen.endswith(":8100")
    hosts = {str(t.target).rsplit(":", 1)[0] for u in config.upstreams for t in u.targets}
    assert hosts == {"users-a", "users-b"} and hosts <= set(compose["services"])
    (route,) = config.routes
    assert route.methods == ["GET", "PUT"]
    limit = route.plugins[0].config
    assert limit["policy"] == "redis" and limit["redis"]["url"] == "redis://redis:6379"
