"""``sdport lora``: adapters themselves — convert between formats, combine several, extract one from a fine-tune."""

from __future__ import annotations

import click

from . import cli

_DTYPES = click.Choice(["keep", "fp32", "fp16", "bf16"])
_FORMATS = click.Choice(["kohya", "peft", "diffusers-old"])


@cli.group("lora")
def lora_group() -> None:
    """Work on adapters themselves: convert between formats, combine, extract from a fine-tune."""


@lora_group.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option("--to", "to", required=True, type=_FORMATS)
@click.option("--rank", type=int, help="Re-factorise LoHa/LoKr/Tucker/full modules as LoRA of this rank (lossy).")
@click.option("--dtype", default="keep", type=_DTYPES, show_default=True, help="Dtype of re-factorised modules.")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
def lora_convert_cmd(src: str, dst: str, to: str, rank: int | None, dtype: str, force: bool) -> None:
    """Rewrite adapter SRC in another format: renames and alpha moved, factors copied bit for bit."""
    from ..lora import convert

    click.echo("\n".join(convert(src, dst, to=to, rank=rank, dtype=dtype, force=force).lines()))


@lora_group.command("combine")
@click.argument("specs", nargs=-1, required=True, metavar="A[:RATIO] B[:RATIO] … OUT")
@click.option("--to", "to", default="kohya", show_default=True, type=_FORMATS)
@click.option("--dtype", default="fp32", type=_DTYPES, show_default=True)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def lora_combine_cmd(specs: tuple[str, ...], to: str, dtype: str, force: bool) -> None:
    """One LoRA equal to the sum of the adapters at their ratios (ranks concatenated: exact)."""
    from ..lora import combine

    click.echo("\n".join(combine(list(specs[:-1]), specs[-1], to=to, dtype=dtype, force=force).lines()))


@lora_group.command("extract")
@click.argument("tuned")
@click.argument("base")
@click.argument("dst")
@click.option("--rank", default=32, show_default=True, help="Rank of every module (the cap, with --energy).")
@click.option("--energy", type=float, help="Per module, the smallest rank keeping this share of Σσ² (e.g. 0.9).")
@click.option("--min-rank", default=1, show_default=True)
@click.option("--max-rank", type=int, help="Upper bound with --energy (default: --rank).")
@click.option("--min-diff", default=0.0, show_default=True, help="Leave out modules whose |ΔW| never exceeds this.")
@click.option("--to", "to", default="kohya", show_default=True, type=_FORMATS)
@click.option("--dtype", default="fp16", type=_DTYPES, show_default=True)
@click.option("--report", is_flag=True, help="Print the rank and retained energy of every module.")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
def lora_extract_cmd(tuned: str, base: str, dst: str, rank: int, energy: float | None, min_rank: int,
                     max_rank: int | None, min_diff: float, to: str, dtype: str, report: bool, force: bool) -> None:
    """A LoRA turning BASE into TUNED: per-module SVD of their difference, energy reported."""
    from ..lora import extract

    result = extract(tuned, base, dst, rank=rank, energy=energy, min_rank=min_rank, max_rank=max_rank,
                     min_diff=min_diff, to=to, dtype=dtype, force=force)
    click.echo("\n".join(result.lines(every=report)))
