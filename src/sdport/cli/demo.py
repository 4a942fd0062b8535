"""``sdport demo``: a tiny SD1.x checkpoint with the real key names, inspected and converted, and the other tiny
models, adapters and embeddings the README's examples read."""

from __future__ import annotations

import click

from . import cli


@cli.command("demo")
@click.argument("folder", default="sdport-demo")
def demo_cmd(folder: str) -> None:
    """Build a tiny SD1.x .ckpt (real key names, no download) in FOLDER, inspect it, convert it; then write the
    files the README's examples use (LoRAs, embeddings, a tiny SDXL and its VAE, a ControlNet, extras.json)."""
    from ..demo import run_demo

    run_demo(folder, echo=click.echo)
