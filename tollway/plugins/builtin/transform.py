"""Header, query and body edits shared by request-transformer and response-transformer.

Operations run in Kong's order: remove, rename (onto a name already present: replacing it), replace
(only what is present), add (only what is absent), append (always). Header names and values are
checked when the config loads — a value with CR, LF, NUL or another control character never reaches
the wire — and headers the gateway manages itself (framing, hop-by-hop, forwarding) cannot be edited.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import orjson
from pydantic import Field, field_validator

from tollway.plugins.base import HeaderName, HeaderValue, PluginConfig

Headers = list[tuple[bytes, bytes]]
# Fields the gateway sets or strips itself: editing them would break framing or forwarding.
MANAGED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "expect",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
    }
)


def _unmanaged(names: Iterable[str]) -> None:
    for name in names:
        if name.lower() in MANAGED_HEADERS:
            raise ValueError(f"{name!r} is managed by the gateway and cannot be changed")


class Names(PluginConfig):
    headers: list[HeaderName] = Field(default_factory=list)
    querystring: list[str] = Field(default_factory=list)
    body: list[str] = Field(default_factory=list, description="top-level JSON fields (or form fields)")

    @field_validator("headers")
    @classmethod
    def _headers(cls, names: list[str]) -> list[str]:
        _unmanaged(names)
        return names


class Renames(PluginConfig):
    headers: dict[HeaderName, HeaderName] = Field(default_factory=dict)
    querystring: dict[str, str] = Field(default_factory=dict)
    body: dict[str, str] = Field(default_factory=dict)

    @field_validator("headers")
    @classmethod
    def _headers(cls, names: dict[str, str]) -> dict[str, str]:
        _unmanaged([*names, *names.values()])
        return names


class Values(PluginConfig):
    headers: dict[HeaderName, HeaderValue] = Field(default_factory=dict)
    querystring: dict[str, str] = Field(default_factory=dict)
    body: dict[str, Any] = Field(default_factory=dict, description="JSON values")

    @field_validator("headers")
    @classmethod
    def _headers(cls, names: dict[str, str]) -> dict[str, str]:
        _unmanaged(names)
        return names


class TransformOps(PluginConfig):
    remove: Names = Names()
    rename: Renames = Renames()
    replace: Values = Values()
    add: Values = Values()
    append: Values = Values()

    def has(self, part: str) -> bool:
        return any(
            getattr(getattr(self, op), part) for op in ("remove", "rename", "replace", "add", "append")
        )


# -- headers --------------------------------------------------------------------------------------------
class HeaderEdits:
    """Header operations compiled to bytes once; `apply` edits a header list in place."""

    def __init__(self, ops: TransformOps) -> None:
        def low(name: str) -> bytes:
            return name.lower().encode("latin-1")

        def pair(name: str, value: str) -> tuple[bytes, bytes, bytes]:
            return low(name), name.encode("latin-1"), value.encode("utf-8")

        self.remove = frozenset(low(n) for n in ops.remove.headers)
        self.rename = {low(old): (new.encode("latin-1"), low(new)) for old, new in ops.rename.headers.items()}
        self.replace = [pair(n, v) for n, v in ops.replace.headers.items()]
        self.add = [pair(n, v) for n, v in ops.add.headers.items()]
        self.append = [pair(n, v) for n, v in ops.append.headers.items()]
        self.active = bool(self.remove or self.rename or self.replace or self.add or self.append)

    def apply(self, headers: Headers) -> None:
        out: Headers = []
        rename = self.rename
        # A rename onto a name the message already has replaces it: the receiver gets one value.
        replaced = {rename[n][1] for n in (h[0].lower() for h in headers) if n in rename} if rename else ()
        for name, value in headers:
            lname = name.lower()
            if lname in self.remove:
                continue
            new = rename.get(lname)
            if new is not None:
                out.append((new[0], value))
            elif lname not in replaced:
                out.append((name, value))
        for lname, name, value in self.replace:
            if any(n.lower() == lname for n, _ in out):
                out = [h for h in out if h[0].lower() != lname]
                out.append((name, value))
        for lname, name, value in self.add:
            if not any(n.lower() == lname for n, _ in out):
                out.append((name, value))
        out.extend((name, value) for _, name, value in self.append)
        headers[:] = out


# -- query strings ---------------------------------------------------------------------------------------
class QueryEdits:
    def __init__(self, ops: TransformOps) -> None:
        self.remove = frozenset(ops.remove.querystring)
        self.rename = dict(ops.rename.querystring)
        self.replace = dict(ops.replace.querystring)
        self.add = dict(ops.add.querystring)
        self.append = dict(ops.append.querystring)
        self.active = ops.has("querystring")

    def apply(self, query: str) -> str:
        """The edited query string, every name and value percent-encoded (nothing can break out)."""
        args = [
            (self.rename.get(n, n), v)
            for n, v in parse_qsl(query, keep_blank_values=True)
            if n not in self.remove
        ]
        present = {n for n, _ in args}
        args = [(n, self.replace[n]) if n in self.replace else (n, v) for n, v in args]
        args += [(n, v) for n, v in self.add.items() if n not in present]
        args += list(self.append.items())
        return "&".join(f"{quote(n, safe='')}={quote(v, safe='')}" for n, v in args)


# -- JSON bodies -------------------------------------------------------------------------------------------
class BodyEdits:
    def __init__(self, ops: TransformOps) -> None:
        self.remove = list(ops.remove.body)
        self.rename = dict(ops.rename.body)
        self.replace = dict(ops.replace.body)
        self.add = dict(ops.add.body)
        self.append = dict(ops.append.body)
        self.active = ops.has("body")

    def apply(self, body: bytes) -> bytes | None:
        """The edited body, or None to leave it as it is (not a JSON object)."""
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(data, dict):
            return None
        for name in self.remove:
            data.pop(name, None)
        for old, new in self.rename.items():
            if old in data:
                data[new] = data.pop(old)
        for name, value in self.replace.items():
            if name in data:
                data[name] = value
        for name, value in self.add.items():
            data.setdefault(name, value)
        for name, value in self.append.items():
            if name not in data:
                data[name] = value
            elif isinstance(data[name], list):
                data[name].append(value)
            else:
                data[name] = [data[name], value]
        return orjson.dumps(data)


# -- form bodies (application/x-www-form-urlencoded) ---------------------------------------------------------
class FormEdits:
    """The body operations on a form: names may repeat, values are text (other JSON values as JSON)."""

    # Forms are handled as latin-1 text, which keeps every byte of the client's fields as it was (they
    # may be in any charset); the config's names and values become their UTF-8 bytes, the same way.
    def __init__(self, ops: TransformOps) -> None:
        self.remove = frozenset(_raw(name) for name in ops.remove.body)
        self.rename = {_raw(old): _raw(new) for old, new in ops.rename.body.items()}
        self.replace = {_raw(name): _form_value(value) for name, value in ops.replace.body.items()}
        self.add = [(_raw(name), _form_value(value)) for name, value in ops.add.body.items()]
        self.append = [(_raw(name), _form_value(value)) for name, value in ops.append.body.items()]

    def apply(self, body: bytes) -> bytes:
        """The edited form, re-encoded (a value's encoding may change, `%20` to `+`; its meaning not)."""
        pairs = parse_qsl(body.decode("latin-1"), keep_blank_values=True, encoding="latin-1")
        renamed = {self.rename[n] for n, _ in pairs if n in self.rename}
        fields = [
            (self.rename.get(n, n), v)
            for n, v in pairs
            if n not in self.remove and (n in self.rename or n not in renamed)  # a rename replaces
        ]
        for name, value in self.replace.items():
            if any(n == name for n, _ in fields):
                first = next(i for i, (n, _) in enumerate(fields) if n == name)
                fields = [f for i, f in enumerate(fields) if f[0] != name or i == first]
                fields[first] = (name, value)
        present = {n for n, _ in fields}
        fields += [(n, v) for n, v in self.add if n not in present]
        fields += self.append
        return urlencode(fields, encoding="latin-1").encode("latin-1")


def _form_value(value: Any) -> str:
    return _raw(value) if isinstance(value, str) else orjson.dumps(value).decode("latin-1")


def _raw(text: str) -> str:
    return text.encode("utf-8").decode("latin-1")


def is_json(content_type: bytes | None) -> bool:
    if content_type is None:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


def is_form(content_type: bytes | None) -> bool:
    """application/x-www-form-urlencoded (what an HTML form posts)."""
    if content_type is None:
        return False
    return content_type.split(b";", 1)[0].strip().lower() == b"application/x-www-form-urlencoded"
