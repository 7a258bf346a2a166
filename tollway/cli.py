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

app = typer.Typer(
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
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Tollway: an API gateway in Python."""


@app.command()
def run(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="YAML configuration file.", show_default=False)
    ],
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

    SIGHUP, or saving the file, reloads the config without dropping connections; a bad file keeps the
    running config and logs why.
    """
    from tollway.config.loader import load_file
    from tollway.config.tls import check_tls
    from tollway.config.types import check_traffic_listen
    from tollway.errors import ConfigError

    _setup_logging(log_level)
    _warn_if_stale()
    for address in listen or []:
        try:
            check_traffic_listen(address)
        except ValueError as exc:
            err.print(f"[red]--listen {address}: {exc}[/red]")
            raise typer.Exit(2) from None
    try:
        cfg = load_file(config)
    except ConfigError as exc:
        _print_issues(exc)
        raise typer.Exit(1) from None
    if listen:  # what --listen asks for must be servable: tls needs certificates, mtls client_auth
        gateway = cfg.gateway.model_copy(update={"listen": listen})
        for _, message in check_tls(cfg.model_copy(update={"gateway": gateway})):
            err.print(f"--listen: {message} (docs/tls.md)", style="red", markup=False)
            raise typer.Exit(2)
    raise typer.Exit(serve(config, cfg, workers, listen))


def serve(path: Path | None, cfg: Any, workers: int | None, listen: list[str] | None) -> int:
    """Run a supervisor in the foreground; used by `run` and by the demo."""
    import uvloop

    from tollway.runtime.supervisor import Supervisor

    supervisor = Supervisor(path, cfg, workers=workers, listen=listen or None, on_event=_print_event)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(supervisor.run())


@app.command()
def check(
    config: Annotated[Path, typer.Argument(help="YAML configuration file to validate.", show_default=False)],
) -> None:
    """Validate CONFIG: print every error with its line and entity, exit 1 if there is any."""
    from tollway.config.loader import load_file
    from tollway.errors import ConfigError

    try:
        cfg = load_file(config)
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


@app.command()
def demo(
    port: Annotated[int, typer.Option(help="Gateway port (0 = any free port).")] = 8000,
    requests: Annotated[
        int, typer.Option(help="Requests the demo sends itself before waiting for yours.")
    ] = 20,
    exit_after: Annotated[
        bool, typer.Option("--exit/--stay", help="Exit after the scripted requests instead of serving on.")
    ] = False,
) -> None:
    """Start a gateway in front of two instances of the example user service and show it working."""
    from tollway.demo import run_demo

    raise typer.Exit(run_demo(port=port, scripted_requests=requests, exit_after=exit_after, console=out))


@app.command("hash-password")
def hash_password(
    scheme: Annotated[
        str, typer.Option(help="bcrypt (default), argon2 (needs argon2-cffi) or pbkdf2-sha256.")
    ] = "bcrypt",
    password_stdin: Annotated[
        bool, typer.Option("--stdin", help="Read the password from standard input instead of prompting.")
    ] = False,
) -> None:
    """Print a salted hash of a password, for a basic-auth credential's `password_hash`."""
    from tollway.plugins.passwords import hash_password as make_hash

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
    if kind == "started":
        schemes = data.get("schemes") or ["http"] * len(data["listen"])
        listen = ", ".join(f"{scheme}://{a}" for scheme, a in zip(schemes, data["listen"], strict=True))
        status = f" · status http://{data['status_listen']}" if data["status_listen"] else ""
        out.print(
            f"[bold]tollway {data['version']}[/bold] listening on {listen} "
            f"({data['workers']} worker{'s' if data['workers'] != 1 else ''}, "
            f"{data['routes']} routes, config v{data['config_version']}){status}"
        )
    elif kind == "reloaded":
        out.print(f"config v{data['version']} applied ({data['reason']})")
    elif kind == "reload_failed":
        err.print(f"[red]config reload failed ({data['reason']}); the running config stays:[/red]")
        for issue in data["issues"]:
            err.print(f"  {issue}", markup=False)
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
