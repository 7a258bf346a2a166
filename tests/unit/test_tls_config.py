"""TLS configuration: listen entries, certificate entities checked at load (files, keys, passphrases),
SNI lookups, route SNI patterns, expiry and verify warnings, `tollway check`."""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.tls_support import CA
from tollway.config.loader import validate
from tollway.config.tls import certificate_expiry, tls_warnings
from tollway.config.types import parse_listen
from tollway.errors import ConfigError
from tollway.protocol.tls import CertificateTable
from tollway.router.matchers import NameMatcher


def test_parse_listen() -> None:
    assert parse_listen("0.0.0.0:8443 tls") == ("0.0.0.0", 8443, frozenset({"tls"}))
    assert parse_listen("[::1]:8443 mtls")[2] == frozenset({"tls", "mtls"})
    assert parse_listen(":8000") == ("0.0.0.0", 8000, frozenset())
    with pytest.raises(ValueError, match="unknown listener option 'tsl'"):
        parse_listen("0.0.0.0:8443 tsl")


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, Any]:
    ca = CA()
    a = ca.issue(["a.test"], kind="rsa")
    b = ca.issue(["*.b.test"], kind="ec")
    return {
        "dir": tmp_path,
        "a": a.write(tmp_path, "a"),
        "b": b.write(tmp_path, "b"),
        "a_pem": (a.cert_pem().decode(), a.key_pem().decode()),
        "enc": a.write(tmp_path, "enc", passphrase=b"pw"),
        "soon": ca.issue(["soon.test"], days=10).write(tmp_path, "soon"),
        "old": ca.issue(["old.test"], expired=True).write(tmp_path, "old"),
    }


def config(certificates: list[dict[str, Any]], **tls: Any) -> dict[str, Any]:
    return {
        "gateway": {"listen": ["127.0.0.1:0", "127.0.0.1:0 tls"], "tls": tls},
        "certificates": certificates,
    }


def errors(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        validate(data)
    return "\n".join(info.value.issues)


def test_certificate_problems_are_located(certs: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = certs["a"], certs["b"]
    text = errors(
        config(
            [
                {"name": "mismatch", "cert": a[0], "key": b[1]},
                {"name": "missing", "cert": str(certs["dir"] / "nope.crt"), "key": a[1]},
                {"name": "nopass", "cert": certs["enc"][0], "key": certs["enc"][1]},
                {
                    "name": "env",
                    "cert": certs["enc"][0],
                    "key": certs["enc"][1],
                    "passphrase_env": "TW_UNSET_PW",
                },
                {"name": "ok", "cert": a[0], "key": a[1], "snis": ["a.test"]},
                {"name": "ok", "cert": a[0], "key": a[1]},
            ],
            default_certificate="nobody",
        )
    )
    assert 'certificates[0] "mismatch": cannot load certificate and key' in text
    assert 'certificates[1] "missing": cert: ' in text and "no such file" in text
    assert 'certificates[2] "nopass": cannot load' in text
    assert "TW_UNSET_PW is not set" in text
    assert "duplicate name 'ok'" in text
    assert "gateway.tls.default_certificate: unknown certificate 'nobody'" in text
    monkeypatch.setenv("TW_PW", "pw")
    ok = validate(
        config([{"name": "env", "cert": certs["enc"][0], "key": certs["enc"][1], "passphrase_env": "TW_PW"}])
    )
    assert ok.certificates[0].name == "env"


def test_tls_listener_needs_certificates_and_mtls_needs_client_auth() -> None:
    text = errors({"gateway": {"listen": ["127.0.0.1:0 mtls"]}})
    assert "a tls listener needs at least one entry in `certificates`" in text
    assert "an mtls listener needs gateway.tls.client_auth" in text
    assert "1.1" not in str(validate({}).gateway.tls.min_version)
    assert "min_version" in errors({"gateway": {"tls": {"min_version": "1.1"}}})


def test_inline_pem_and_sni_table(certs: dict[str, Any]) -> None:
    cert_pem, key_pem = certs["a_pem"]
    cfg = validate(
        config(
            [
                {"name": "a", "cert": cert_pem, "key": key_pem, "snis": ["A.Test"]},
                {"name": "b", "cert": certs["b"][0], "key": certs["b"][1], "snis": ["*.b.test"]},
            ],
            default_certificate="b",
        )
    )
    table = CertificateTable(cfg)
    a, b = table.exact["a.test"], table.wildcard["b.test"]
    assert isinstance(a, ssl.SSLContext)
    assert table.lookup("a.test") is a and table.lookup("A.TEST") is a
    assert table.lookup("x.b.test") is b
    assert table.lookup("x.y.b.test") is b  # not covered: the default (b) as unknown
    assert table.lookup(None) is b
    refusing = CertificateTable(
        cfg.model_copy(
            update={
                "gateway": cfg.gateway.model_copy(
                    update={"tls": cfg.gateway.tls.model_copy(update={"unknown_sni": "refuse"})}
                )
            }
        )
    )
    assert refusing.lookup("unknown.test") is None
    assert refusing.lookup("x.y.b.test") is None  # a wildcard covers one label
    assert refusing.lookup(None) is refusing.default


def test_sni_name_matcher_for_routes() -> None:
    matcher = NameMatcher(["api.test", "*.apps.test", "intra.*"])
    assert matcher.matches("api.test") and matcher.matches("API.TEST")
    assert matcher.matches("x.apps.test") and not matcher.matches("apps.test")
    assert matcher.matches("intra.corp") and not matcher.matches("intra.")
    assert not matcher.matches("") and not matcher.matches("other.test")


def test_warnings_for_expiry_and_unverified_backends(certs: dict[str, Any]) -> None:
    cfg = validate(
        {
            "certificates": [
                {"name": "fine", "cert": certs["a"][0], "key": certs["a"][1]},
                {"name": "soon", "cert": certs["soon"][0], "key": certs["soon"][1]},
                {"name": "old", "cert": certs["old"][0], "key": certs["old"][1]},
            ],
            "services": [
                {"name": "lax", "url": "https://backend.test", "tls": {"verify": False}},
                {"name": "clear", "url": "http://backend.test", "tls": {"verify": False}},
            ],
        }
    )
    warnings = tls_warnings(cfg)
    assert any("'soon' expires in 10 days" in w or "'soon' expires in 9 days" in w for w in warnings), (
        warnings
    )
    assert any("'old' expired" in w for w in warnings)
    assert not any("'fine'" in w for w in warnings)
    assert any("service 'lax': tls.verify is false" in w for w in warnings)
    assert not any("'clear'" in w for w in warnings)  # no TLS, nothing to verify
    expiry = certificate_expiry(cfg.certificates[1])
    assert expiry is not None and 9 * 86400 < expiry - time.time() < 11 * 86400


def test_tollway_check_prints_expiry_warnings(certs: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(
        yaml.safe_dump(config([{"name": "soon", "cert": certs["soon"][0], "key": certs["soon"][1]}]))
    )
    out = subprocess.run(
        [sys.executable, "-m", "tollway", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "certificate 'soon' expires in" in out.stderr


def test_crl_checking_needs_a_crl_for_every_ca(certs: dict[str, Any]) -> None:
    ca_file = CA().write(certs["dir"], "clients")
    crl = certs["dir"] / "c.crl"
    crl.write_bytes(CA().crl([]))
    data = config(
        [{"name": "a", "cert": certs["a"][0], "key": certs["a"][1], "client_auth": {"ca_file": ca_file}}]
    )
    data["gateway"]["listen"] = ["127.0.0.1:0 mtls"]
    data["gateway"]["tls"] = {"client_auth": {"ca_file": ca_file, "crl_files": [str(crl)]}}
    text = errors(data)
    assert (
        'certificates[0] "a": client_auth.crl_files: CRLs are checked (crl_files in gateway.tls.client_auth)'
        in text
    )


def test_clear_routes_keep_the_fast_path_and_tls_matchers_choose() -> None:
    from tollway.router import Router
    from tollway.router.table import RouteEntry

    cfg = validate(
        {
            "services": [{"name": "s", "url": "http://127.0.0.1:9"}],
            "routes": [
                {"name": "plain", "service": "s", "paths": ["/"]},
                {"name": "tls", "service": "s", "paths": ["/"], "protocols": ["https"], "priority": 1},
                {"name": "sni", "service": "s", "paths": ["/"], "snis": ["*.corp.test"], "priority": 2},
            ],
        }
    )
    assert RouteEntry(cfg.routes[0], None).plain  # no TLS matcher: nothing more is checked per request
    assert not RouteEntry(cfg.routes[1], None).plain
    router = Router([(route, route.name) for route in cfg.routes])

    def chosen(scheme: bytes, sni: str) -> object:
        found = router.match("GET", "h", "/", "", [], scheme, sni)
        return getattr(found, "route", None)

    assert chosen(b"http", "") == "plain"
    assert chosen(b"https", "") == "tls"
    assert chosen(b"https", "a.corp.test") == "sni"
    assert chosen(b"https", "corp.test") == "tls"
    assert router.match("GET", "h", "/", "", []).route == "plain"  # type: ignore[union-attr]


def test_reload_reuses_unchanged_certificate_contexts(certs: dict[str, Any]) -> None:
    data = config(
        [
            {"name": "a", "cert": certs["a"][0], "key": certs["a"][1], "snis": ["a.test"]},
            {"name": "b", "cert": certs["b"][0], "key": certs["b"][1], "snis": ["*.b.test"]},
        ]
    )
    first = CertificateTable(validate(data))
    data["routes"] = []  # an unrelated change
    second = CertificateTable(validate(data), first)
    assert second.exact["a.test"] is first.exact["a.test"]
    renewed = CA().issue(["a.test"])
    Path(certs["a"][0]).write_bytes(renewed.cert_pem())  # renewed in place, same paths
    Path(certs["a"][1]).write_bytes(renewed.key_pem())
    third = CertificateTable(validate(data), second)
    assert third.exact["a.test"] is not second.exact["a.test"]
    assert third.wildcard["b.test"] is second.wildcard["b.test"]
