"""The `tollway` command: run a gateway, check a config file, or see it all work with `demo`.

Thin by design: parse arguments, load config, hand over to the supervisor (or the demo).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from tollway import __version__


class _NoFlagType:
    """typer shows a flag's type (`<bool>`) after --help, --version and --exit/--stay; a flag takes no
    value, so the help shows none."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class _Group(_NoFlagType, typer.core.TyperGroup):
    pass


class _Command(_NoFlagType, typer.core.TyperCommand):
    pass


app = typer.Typer(
    cls=_Group,
    name="tollway",
    help="Tollway: an API gateway in Python. Routes, balances and protects HTTP traffic to your services.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)
out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)


def _version(value: bool) -> None:
    if value:
        out.print(f"tollway {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, metavar="", help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Tollway: an API gateway in Python."""


@app.command(cls=_Command)
def run(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="YAML configuration file (none: default settings, entities in ./tollway.db).",
            show_default=False,
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers", "-w", min=1, help="Worker processes (default: gateway.workers, or one per core)."
        ),
    ] = None,
    listen: Annotated[
        list[str] | None,
        typer.Option(
            "--listen",
            "-l",
            help='HOST:PORT to listen on, or "HOST:PORT tls" (HTTPS); repeatable; replaces gateway.listen.',
        ),
    ] = None,
    log_level: Annotated[
        str, typer.Option(help="Diagnostic log level: DEBUG, INFO, WARNING, ERROR.")
    ] = "INFO",
) -> None:
    """Run the gateway with CONFIG until SIGTERM or Ctrl-C (both drain in-flight requests first).
    Without CONFIG, entities come from the SQLite store ./tollway.db (`tollway config apply FILE`).

    SIGHUP, or saving the file, reloads the config without dropping connections; a bad file keeps the
    running config and logs why.
    """
    from tollway.config.apart import run_apart
    from tollway.config.loader import load_file
    from tollway.config.tls import check_tls
    from tollway.config.types import check_traffic_listen
    from tollway.errors import ConfigError
    from tollway.plugins.registry import PLUGIN_CHECK
    from tollway.runtime.config_hold import HeldConfig

    _setup_logging(log_level)
    _warn_if_stale()
    for address in listen or []:
        try:
            check_traffic_listen(address)
        except ValueError as exc:
            err.print(f"[red]--listen {address}: {exc}[/red]")
            raise typer.Exit(2) from None
    try:
        held = run_apart(lambda: HeldConfig.hold_file(load_file(config, PLUGIN_CHECK))) if config else None
        cfg = held.config if held is not None else _embedded_store_config()
    except ConfigError as exc:
        _print_issues(exc)
        raise typer.Exit(1) from None
    if listen:  # what --listen asks for must be servable: tls needs certificates, mtls client_auth
        gateway = cfg.gateway.model_copy(update={"listen": listen})
        for _, message in check_tls(cfg.model_copy(update={"gateway": gateway})):
            err.print(f"--listen: {message} (docs/tls.md)", style="red", markup=False)
            raise typer.Exit(2)
    source = None
    if cfg.gateway.store.backend != "file":  # entities come from a config store (docs/config-store.md)
        from tollway.store.node import StoreSource

        source = StoreSource(cfg, config)
    admin = None
    if cfg.gateway.admin.enabled:  # the admin REST API (docs/admin-api.md) writes to the store
        if source is None:
            err.print(
                "[red]gateway.admin needs a config store: "
                "set gateway.store.backend to sqlite or postgres[/red]"
            )
            raise typer.Exit(1)
        from tollway.admin.server import AdminServer

        base = config.resolve().parent if config is not None else Path.cwd()
        admin = AdminServer(cfg.gateway.admin, source.store, base, cfg.gateway.access_log)
    raise typer.Exit(serve(config, held or cfg, workers, listen, source, admin))


def _embedded_store_config() -> Any:
    """`tollway run` without a file: default node settings, entities in the SQLite store ./tollway.db."""
    from tollway.config.loader import validate

    return validate({"gateway": {"store": {"backend": "sqlite"}}}, source="(defaults)")


def serve(
    path: Path | None,
    cfg: Any,
    workers: int | None,
    listen: list[str] | None,
    source: Any = None,
    admin: Any = None,
) -> int:
    """Run a supervisor in the foreground; used by `run` and by the demo."""
    import uvloop

    from tollway.runtime.supervisor import Supervisor

    supervisor = Supervisor(
        path, cfg, workers=workers, listen=listen or None, on_event=_print_event, source=source, admin=admin
    )
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(supervisor.run())


@app.command(cls=_Command)
def check(
    config: Annotated[Path, typer.Argument(help="YAML configuration file to validate.", show_default=False)],
) -> None:
    """Validate CONFIG: print every error with its line and entity, exit 1 if there is any."""
    from tollway.config.loader import load_file
    from tollway.errors import ConfigError
    from tollway.plugins.registry import PLUGIN_CHECK

    try:
        cfg = load_file(config, PLUGIN_CHECK)
    except ConfigError as exc:
        _print_issues(exc)
        raise typer.Exit(1) from None
    from tollway.config.tls import tls_warnings

    for warning in tls_warnings(cfg):
        err.print(f"[yellow]warning: {warning}[/yellow]", markup=True)
    out.print(
        f"[green]✓[/green] {config} is valid: {len(cfg.services)} services, {len(cfg.routes)} routes, "
        f"{len(cfg.upstreams)} upstreams, {len(cfg.consumers)} consumers, {len(cfg.plugins)} global plugins"
    )
    if not cfg.routes and cfg.gateway.store.backend == "file":  # a store holds the routes otherwise
        from tollway.runtime.config_file import NO_ROUTES

        if cfg.gateway.allow_empty_routes:
            verdict = "a reload applies it (gateway.allow_empty_routes: true)"
        else:
            verdict = "a reload refuses it unless gateway.allow_empty_routes: true"
        err.print(f"[yellow]warning: {NO_ROUTES}; {verdict}[/yellow]")


@app.command(cls=_Command)
def demo(
    port: Annotated[int, typer.Option(help="Gateway port (0 = any free port).")] = 8000,
    requests: Annotated[
        int, typer.Option(help="Requests the demo sends itself before waiting for yours.")
    ] = 20,
    exit_after: Annotated[
        bool,
        typer.Option(
            "--exit/--stay", metavar="", help="Exit after the scripted requests instead of serving on."
        ),
    ] = False,
) -> None:
    """Start a gateway in front of two instances of the example user service and show it working."""
    from tollway.demo import run_demo

    raise typer.Exit(run_demo(port=port, scripted_requests=requests, exit_after=exit_after, console=out))


cache_app = typer.Typer(cls=_Group, help="Manage proxy-cache stores.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("purge", cls=_Command)
def cache_purge(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="YAML configuration file.", show_default=False)
    ],
    key: Annotated[
        str | None, typer.Option(help="A cache key: scheme://host/path?query, as clients asked.")
    ] = None,
    prefix: Annotated[
        str | None, typer.Option(help="Every key starting with this, e.g. http://api.test/users/")
    ] = None,
    tag: Annotated[
        str | None, typer.Option(help="Every copy the backend tagged (Surrogate-Key, Cache-Tag).")
    ] = None,
) -> None:
    """Remove copies from the stores of CONFIG's proxy-cache plugins (node stores on this host, Redis)."""
    from tollway.config.loader import load_file
    from tollway.errors import ConfigError
    from tollway.plugins.builtin.cache_admin import purge
    from tollway.plugins.registry import PLUGIN_CHECK

    if key is None and prefix is None and tag is None:
        err.print("[red]name what to purge: --key, --prefix or --tag[/red]")
        raise typer.Exit(2)
    try:
        cfg = load_file(config, PLUGIN_CHECK)
    except ConfigError as exc:
        _print_issues(exc)
        raise typer.Exit(1) from None
    results = purge(cfg, key, prefix, tag)
    if not results:
        err.print(f"[yellow]{config} has no proxy-cache plugin (or no running node on this host)[/yellow]")
        raise typer.Exit(1)
    for store, outcome in results:
        out.print(f"{store}: {outcome if isinstance(outcome, str) else f'{outcome} removed'}", markup=False)


@app.command("hash-password", cls=_Command)
def hash_password(
    scheme: Annotated[
        str, typer.Option(help="bcrypt (default), argon2 (needs argon2-cffi) or pbkdf2-sha256.")
    ] = "bcrypt",
    password_stdin: Annotated[
        bool,
        typer.Option(
            "--stdin", metavar="", help="Read the password from standard input instead of prompting."
        ),
    ] = False,
) -> None:
    """Print a salted hash of a password, for a basic-auth credential's `password_hash`."""
    from tollway.plugins.builtin.passwords import hash_password as make_hash

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    if not password:
        err.print("[red]the password is empty[/red]")
        raise typer.Exit(2)
    try:
        out.print(make_hash(password, scheme), markup=False)
    except ValueError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


def _print_issues(exc: Any) -> None:
    count = len(exc.issues)
    err.print(f"[red]✗ {exc.source}: {count} error{'s' if count != 1 else ''}[/red]")
    for issue in exc.issues:
        err.print(f"  {issue}", markup=False)


def _print_event(kind: str, data: dict[str, Any]) -> None:
    # A failed reload is not printed here: the supervisor logs it, with every error, once.
    if kind == "started":
        schemes = data.get("schemes") or ["http"] * len(data["listen"])
        listen = ", ".join(f"{scheme}://{a}" for scheme, a in zip(schemes, data["listen"], strict=True))
        status = f" · status http://{data['status_listen']}" if data["status_listen"] else ""
        out.print(
            f"[bold]tollway {data['version']}[/bold] listening on {listen} "
            f"(pid {os.getpid()}, {data['workers']} worker{'s' if data['workers'] != 1 else ''}, "
            f"{data['routes']} routes, config v{data['config_version']}){status}"
        )
        if data.get("admin_listen"):
            out.print(f"admin API on {data['admin_listen']}")
    elif kind == "reloaded":
        out.print(f"config v{data['version']} applied ({data['reason']})")
    elif kind == "draining":
        out.print(f"draining (up to {data['timeout']:g}s for in-flight requests)")
    elif kind == "error":
        err.print(f"[red]{data['message']}[/red]")


def _warn_if_stale() -> None:
    from tollway._build import stale_modules

    stale = stale_modules()
    if stale:
        err.print(
            "[yellow]warning: compiled modules are older than their source, so the old code runs: "
            + ", ".join(stale)
            + ". Rebuild with: pip install -e .[/yellow]"
        )


def _setup_logging(level: str) -> None:
    os.environ["TOLLWAY_LOG_LEVEL"] = level.upper()  # workers inherit it
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )


def _add_store_commands() -> None:
    from tollway.store.cli import config_app, db_app

    app.add_typer(db_app, name="db")
    app.add_typer(config_app, name="config")
    from tollway.admin.cli import admin_app

    app.add_typer(admin_app, name="admin")


_add_store_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
