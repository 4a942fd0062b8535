"""``sdport demo``: a tiny SD1.x checkpoint with the real key names, inspected and converted."""

from __future__ import annotations

import click

from . import cli


@cli.command("demo")
@click.argument("folder", default="sdport-demo")
def demo_cmd(folder: str) -> None:
    """Build a tiny SD1.x .ckpt (real key names, no download) in FOLDER, inspect it, convert it."""
    from ..demo import run_demo

    run_demo(folder, echo=click.echo)
