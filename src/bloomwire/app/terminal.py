"""What every command module shares: the consoles, the invocation's settings, a clean failure."""

from __future__ import annotations

import typer
from rich.console import Console

from bloomwire.runtime.settings import Settings

console = Console()
err = Console(stderr=True)


def make_settings(ctx: typer.Context) -> Settings:
    """The settings of this invocation (environment + root options, built by the root callback)."""
    settings: Settings = ctx.obj
    return settings


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print a clear error and return the exit to raise."""
    err.print(f"[bold red]error:[/bold red] {message}")
    return typer.Exit(code)
