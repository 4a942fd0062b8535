"""``sdport inspect``: what a model or adapter is, as a table or as stable JSON."""

from __future__ import annotations

import json

import click

from . import cli


@cli.command("inspect")
@click.argument("source")
@click.option("--json", "as_json", is_flag=True, help="Print the stable JSON report instead of a table.")
@click.option("--variant", help="Read the diffusers weights of this variant (fp16) of a folder or Hub repo.")
def inspect_cmd(source: str, as_json: bool, variant: str | None) -> None:
    """Say what SOURCE is (a path, Hub repo, civitai://VERSION or URL): format, family and evidence, tensors,
    dtypes, metadata."""
    from ..inspection import inspect, render

    report = inspect(source, variant=variant)
    click.echo(json.dumps(report, indent=2, sort_keys=True) if as_json else render(report))
