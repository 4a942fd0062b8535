"""``sdport batch``: parse the options, print each entry as it finishes and the summary table (or JSON); exit 0
only when every entry succeeded."""

from __future__ import annotations

import json

import click

from . import cli


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB" if n else "-"


def _row(r) -> str:
    outputs = ", ".join(r.outputs) or "-"
    line = f"{r.where:<40} {r.status:<8} {r.seconds:7.1f}s {_mb(r.peak_rss):>9}  {outputs}"
    extra = [f"    {n}" for n in r.notes] + ([f"    {r.error}"] if r.error else [])
    return "\n".join([line, *extra])


@cli.command("batch")
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--out", "out", default=".", show_default=True, type=click.Path(file_okay=False),
              help="The folder outputs go to (onnx-web's models folder; with Ray, one every node sees).")
@click.option("--only", multiple=True, metavar="NAME", help="Run just this entry (repeatable).")
@click.option("--jobs", "-j", type=int, default=1, show_default=True,
              help="Entries at once (local executor; fewer when their memory would not fit).")
@click.option("--dry-run", is_flag=True, help="Validate and say what would run; run nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of a table.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--address", help="The Ray cluster to run on (default: a local one).")
@click.option("--force", is_flag=True, help="Redo entries done before.")
def batch_cmd(manifest: str, out: str, only: tuple[str, ...], jobs: int, dry_run: bool, as_json: bool,
              executor: str, address: str | None, force: bool) -> int:
    """Convert every model of a manifest — onnx-web's extras.json as it is, or sdport's own — into one folder."""
    from ..batching import ManifestError, batch

    if address and executor != "ray":
        raise click.UsageError("--address is the Ray cluster's: add --executor ray")
    show = None if as_json or dry_run else (lambda r: click.echo(_row(r)))
    try:
        result = batch(manifest, out, executor=executor, jobs=jobs, only=only, force=force, dry_run=dry_run,
                       address=address, on_result=show)
    except ManifestError as exc:
        for line in exc.lines:
            click.echo(line, err=True)
        return 2
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=1))
    elif dry_run:
        for r in result.entries:
            click.echo(f"{r.where:<40} {'skip' if r.status == 'skipped' else 'run':<5} {', '.join(r.outputs)}")
    else:
        counts = {s: sum(r.status == s for r in result.entries) for s in ("ok", "skipped", "failed")}
        click.echo(f"{counts['ok']} done, {counts['skipped']} skipped (done before), {counts['failed']} failed; "
                   f"record: {out}/sdport-batch.json")
    return 0 if result.ok else 2
