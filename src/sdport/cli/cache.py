"""``sdport cache``: what sdport has downloaded — list it, show one source, prune what is no longer needed."""

from __future__ import annotations

import time

import click

from . import cli


@cli.group("cache")
def cache_group() -> None:
    """The download cache (SDPORT_CACHE, default ~/.cache/sdport); Hub repos stay in the Hugging Face cache."""


@cache_group.command("list")
def cache_list() -> None:
    """Every cached source: size, SHA-256 and when it was last used."""
    from ..sources.cache import Cache

    entries = Cache().entries()
    for entry in sorted(entries.values(), key=lambda e: e.source):
        click.echo(f"{entry.source}  {entry.size:,} B  sha256 {entry.sha256[:12]}  "
                   f"used {time.strftime('%Y-%m-%d %H:%M', time.localtime(entry.used))}  {entry.name}")
    if not entries:
        click.echo("the cache is empty")


@cache_group.command("info")
@click.argument("source")
def cache_info(source: str) -> None:
    """Where a cached SOURCE is and what is known of it."""
    from ..errors import SourceError
    from ..sources import civitai
    from ..sources.cache import Cache
    from ..sources.http import redact

    shown = civitai.shown(*civitai.parse(source)) if source.startswith("civitai://") else redact(source)
    cache = Cache()
    entry = cache.entries().get(shown)
    if entry is None:
        raise SourceError(shown, "not in sdport's cache", "sdport cache list shows what is")
    for key, value in (("source", entry.source), ("file", cache.file(entry)), ("bytes", f"{entry.size:,}"),
                       ("sha256", entry.sha256), ("etag", entry.etag or "-"),
                       ("fetched", time.ctime(entry.fetched)), ("last used", time.ctime(entry.used))):
        click.echo(f"{key:<10} {value}")


@cache_group.command("prune")
@click.option("--older-than", "days", type=float, help="Also forget sources not used for this many days.")
def cache_prune(days: float | None) -> None:
    """Remove partial downloads and files no source needs (and, with --older-than, stale sources)."""
    from ..sources.cache import Cache

    removed, freed = Cache().prune(days)
    click.echo(f"removed {removed} sources, freed {freed:,} bytes")
