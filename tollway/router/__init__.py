"""Request routing: routes compiled once per config version, matched per request without I/O.

`Router(entries).match(...)` returns a `RouteMatch` (route payload, forwarded path, parameters), a
`MethodNotAllowed` (answer 405 with its `allowed` methods) or None (404). `normalize_path` runs first
and returns None for a malformed path (400). Syntax and precedence: docs/routing.md.
"""

from tollway.router.paths import normalize_path
from tollway.router.table import MethodNotAllowed, RouteMatch, Router

__all__ = ["MethodNotAllowed", "RouteMatch", "Router", "normalize_path"]
