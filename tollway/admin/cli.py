"""`tollway admin token …`: the admin API's tokens, managed in the store the API serves."""

from __future__ import annotations

import datetime
from typing import Annotated, Any

import typer

from tollway.store.cli import ConfigOption, StoreOption, _fail, _with_store, out

admin_app = typer.Typer(help="Manage the admin API (tokens).", no_args_is_help=True)
token_app = typer.Typer(help="Create, list and revoke admin API tokens.", no_args_is_help=True)
admin_app.add_typer(token_app, name="token")


@token_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Who uses it (shown in the audit log).", show_default=False)],
    role: Annotated[str, typer.Option(help="admin (read and write) or read-only (GET only).")] = "admin",
    config: ConfigOption = None,
    store: StoreOption = None,
) -> None:
    """Create a token (or replace the one of that NAME) and print it: the only time it is shown."""
    from tollway.admin.tokens import ROLES, create_token

    if role not in ROLES:
        _fail(f"--role must be one of {', '.join(ROLES)}")
    token = _with_store(config, store, lambda s: create_token(s, name, role))
    out.print(token, markup=False)
    typer.echo(f"token {name!r} ({role}) created; it is stored hashed and cannot be shown again", err=True)


@token_app.command("list")
def list_tokens(config: ConfigOption = None, store: StoreOption = None) -> None:
    """The tokens' names, roles and creation times (never the tokens)."""

    async def read(s: Any) -> Any:
        return await s.admin_tokens()

    for token in _with_store(config, store, read):
        created = datetime.datetime.fromtimestamp(token.created_at, datetime.UTC).isoformat(
            timespec="seconds"
        )
        out.print(f"{token.name}  {token.role}  created {created}", markup=False)


@token_app.command("delete")
def delete(
    name: Annotated[str, typer.Argument(help="The token's name.", show_default=False)],
    config: ConfigOption = None,
    store: StoreOption = None,
) -> None:
    """Revoke a token: requests carrying it are refused from now on."""
    if not _with_store(config, store, lambda s: s.delete_admin_token(name)):
        _fail(f"no token named {name!r}")
    out.print(f"token {name!r} revoked")
