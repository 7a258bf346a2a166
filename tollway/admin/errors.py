"""The admin API's error answers, in one shape: `{message, errors: [{path, message, entity}], request_id}`.

Validation errors come from the store, which validates with `tollway check`'s code; their lines
(`store: routes[0] "users": paths[0]: must start with "/"`) are split here into the entity, the field
path inside it and the message, so a client can point at the field it sent.
"""

from __future__ import annotations

import re
from typing import Any

from tollway.admin.http import Response

# `routes[0] "users": rest` — the entity of a check line, then what is wrong inside it.
_ENTITY = re.compile(r'^(?P<kind>\w+)\[\d+\](?: "(?P<name>[^"]*)")?: (?P<rest>.*)$', re.S)
# One segment of a field path: `paths[0]`, `config.minute`, `plugins[0] "rate-limiting"`.
_SEGMENT = re.compile(r'^[A-Za-z_][\w.\-\[\]]*(?: "[^"]*")?$')


class ApiError(Exception):
    """Raised by handlers; the app turns it into a JSON answer."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra
        self.headers: dict[str, str] = {}

    def response(self) -> Response:
        return Response(self.status, {"message": self.message, **self.extra}, headers=self.headers)


def validation_errors(issues: list[str]) -> list[dict[str, str]]:
    """`tollway check` lines as `{path, message, entity, line}`: `path` is inside the entity."""
    out = []
    for issue in issues:
        line = issue.removeprefix("store: ")
        entry = {"path": "", "message": line, "entity": "", "line": line}
        found = _ENTITY.match(line)
        if found:
            name = found["name"]
            entry["entity"] = f'{found["kind"]} "{name}"' if name is not None else found["kind"]
            parts = found["rest"].split(": ")
            path: list[str] = []
            while len(parts) > 1 and _SEGMENT.match(parts[0]):
                path.append(re.sub(r' "[^"]*"$', "", parts.pop(0)))
            entry["path"] = ".".join(path)
            entry["message"] = ": ".join(parts)
        out.append(entry)
    return out


def refused(issues: list[str]) -> ApiError:
    count = len(issues)
    return ApiError(
        400,
        f"invalid configuration ({count} error{'s' if count != 1 else ''}); nothing was changed",
        errors=validation_errors(issues),
    )
