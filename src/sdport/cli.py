"""The ``sdport`` command: argument parsing, printing, and turning errors into one line and an exit status.

Exit status: 0 success, 2 bad input or refused output, 1 internal error, 130 Ctrl-C, 143 SIGTERM.
No logic lives here beyond calling the public API.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import click


class _Terminated(BaseException):
    """SIGTERM, raised so that every ``finally`` (temp file removal) runs."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sdport")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Inspect and convert Stable Diffusion weights between every format, streaming and offline."""
    ctx.obj = {"debug": debug}


@cli.command("inspect")
@click.argument("source")
@click.option("--json", "as_json", is_flag=True, help="Print the stable JSON report instead of a table.")
def inspect_cmd(source: str, as_json: bool) -> None:
    """Say what SOURCE is: format, family and evidence, tensors, dtypes, metadata."""
    from .inspection import inspect, render

    report = inspect(source)
    click.echo(json.dumps(report, indent=2, sort_keys=True) if as_json else render(report))


@cli.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option("--to", type=click.Choice(["single-file", "diffusers", "mindspore", "onnx"]),
              help="Output layout (default: from DST); mindspore: a MindOne .ckpt, fp32 unless --dtype; onnx: a "
                   "folder of ONNX graphs (fp32 unless --dtype).")
@click.option("--dtype", default="keep", type=click.Choice(["keep", "fp32", "fp16", "bf16"]), show_default=True)
@click.option("--format", "fmt", type=click.Choice(["safetensors", "ckpt", "mindspore"]),
              help="Single-file format (default: from DST's suffix; .ckpt is PyTorch's).")
@click.option("--ema", is_flag=True, help="Convert the UNet's EMA copy instead of its plain weights.")
@click.option("--components", help="Only these parts, comma-separated: unet,vae,text_encoder,text_encoder_2 "
              "(ONNX: vae_encoder,vae_decoder for the VAE).")
@click.option("--layout", "onnx_layout", default="diffusers", show_default=True,
              type=click.Choice(["diffusers", "optimum"]),
              help="ONNX folder layout: diffusers (OnnxStableDiffusionPipeline, onnx-web) or optimum (ORT pipelines).")
@click.option("--vae-dtype", type=click.Choice(["fp32", "fp16"]), help="ONNX: the VAE's dtype (fp16 can overflow).")
@click.option("--opset", type=click.IntRange(14, 20), help="ONNX opset (default 17).")
@click.option("--controlnet", is_flag=True, help="ONNX: add cnet/, the UNet taking a ControlNet's residuals.")
@click.option("--prediction-type", type=click.Choice(["epsilon", "v_prediction"]),
              help="What the UNet predicts, where the file cannot tell (SD2-base 512: epsilon).")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:RATIO]",
              help="Merge this adapter (kohya, diffusers/PEFT, old diffusers); repeat for more.")
@click.option("--allow-unmatched", is_flag=True, help="Merge what matches when some adapter modules match no weight.")
@click.option("--lora-alpha", type=float, help="Alpha of adapters whose file stores none (MindOne); default: rank.")
@click.option("--base", help="A whole model the input's parts go into (a fine-tuned UNet into a full file).")
@click.option("--allow-unknown", is_flag=True, help="Copy tensors no rule knows instead of refusing.")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@click.option("--report", is_flag=True, help="List every input entry left out, with the reason.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def convert_cmd(src: str, dst: str, to: str | None, dtype: str, fmt: str | None, ema: bool, components: str | None,
                onnx_layout: str, vae_dtype: str | None, opset: int | None, controlnet: bool,
                prediction_type: str | None, loras: tuple[str, ...], allow_unmatched: bool, lora_alpha: float | None,
                base: str | None, allow_unknown: bool, force: bool, report: bool, quiet: bool) -> None:
    """Convert SRC to DST (another format, layout or dtype), streaming, atomically."""
    # sdport's own workers compute LoRA updates; OpenBLAS's pool on top of them only spins (2× the CPU time of a
    # merge on two cores). numpy is not imported yet here; a user's explicit setting wins.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from .conversion import convert

    result = convert(src, dst, to=to, dtype=dtype, format=fmt, ema=ema, components=components,
                     prediction_type=prediction_type, loras=loras, allow_unmatched=allow_unmatched,
                     lora_alpha=lora_alpha, base=base, allow_unknown=allow_unknown, force=force, progress=not quiet,
                     onnx_layout=onnx_layout, vae_dtype=vae_dtype, opset=opset, controlnet=controlnet)
    if not quiet:
        click.echo(f"wrote {result.output}: {result.tensors} tensors, {result.bytes:,} bytes"
                   + (f", {len(result.dropped)} entries left out" if result.dropped else ""), err=True)
    if report:
        for adapter in result.adapters:
            click.echo(f"lora {adapter.line()}")
            for label in adapter.unmatched:
                click.echo(f"  unmatched {label}")
        for name, why in result.dropped.items():
            click.echo(f"dropped {name}: {why}")
        for name in result.unknown:
            click.echo(f"unknown {name}: copied unchanged (--allow-unknown)")


@cli.group("lora")
def lora_group() -> None:
    """Work on adapters themselves: convert between formats, combine, extract from a fine-tune."""


_DTYPES = click.Choice(["keep", "fp32", "fp16", "bf16"])


@lora_group.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option("--to", "to", required=True, type=click.Choice(["kohya", "peft", "diffusers-old"]))
@click.option("--rank", type=int, help="Re-factorise LoHa/LoKr/Tucker/full modules as LoRA of this rank (lossy).")
@click.option("--dtype", default="keep", type=_DTYPES, show_default=True, help="Dtype of re-factorised modules.")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
def lora_convert_cmd(src: str, dst: str, to: str, rank: int | None, dtype: str, force: bool) -> None:
    """Rewrite adapter SRC in another format: renames and alpha moved, factors copied bit for bit."""
    from .lora.rewrite import convert_adapter, output_dtype

    click.echo("\n".join(convert_adapter(src, dst, to=to, rank=rank, dtype=output_dtype(dtype),
                                         force=force).lines()))


@lora_group.command("combine")
@click.argument("specs", nargs=-1, required=True, metavar="A[:RATIO] B[:RATIO] … OUT")
@click.option("--to", "to", default="kohya", show_default=True, type=click.Choice(["kohya", "peft", "diffusers-old"]))
@click.option("--dtype", default="fp32", type=_DTYPES, show_default=True)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def lora_combine_cmd(specs: tuple[str, ...], to: str, dtype: str, force: bool) -> None:
    """One LoRA equal to the sum of the adapters at their ratios (ranks concatenated: exact)."""
    from .lora.rewrite import combine, output_dtype

    click.echo("\n".join(combine(list(specs[:-1]), specs[-1], to=to, dtype=output_dtype(dtype) or "F32",
                                 force=force).lines()))


@lora_group.command("extract")
@click.argument("tuned")
@click.argument("base")
@click.argument("dst")
@click.option("--rank", default=32, show_default=True, help="Rank of every module (the cap, with --energy).")
@click.option("--energy", type=float, help="Per module, the smallest rank keeping this share of Σσ² (e.g. 0.9).")
@click.option("--min-rank", default=1, show_default=True)
@click.option("--max-rank", type=int, help="Upper bound with --energy (default: --rank).")
@click.option("--min-diff", default=0.0, show_default=True, help="Leave out modules whose |ΔW| never exceeds this.")
@click.option("--to", "to", default="kohya", show_default=True, type=click.Choice(["kohya", "peft", "diffusers-old"]))
@click.option("--dtype", default="fp16", type=_DTYPES, show_default=True)
@click.option("--report", is_flag=True, help="Print the rank and retained energy of every module.")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
def lora_extract_cmd(tuned: str, base: str, dst: str, rank: int, energy: float | None, min_rank: int,
                     max_rank: int | None, min_diff: float, to: str, dtype: str, report: bool, force: bool) -> None:
    """A LoRA turning BASE into TUNED: per-module SVD of their difference, energy reported."""
    from .lora.extract import extract
    from .lora.rewrite import output_dtype

    result = extract(tuned, base, dst, rank=rank, energy=energy, min_rank=min_rank,
                     max_rank=max_rank if max_rank is not None else (rank if energy is not None else None),
                     min_diff=min_diff, to=to, dtype=output_dtype(dtype) or "F16", force=force)
    click.echo("\n".join(result.lines(every=report)))


@cli.command("demo")
@click.argument("folder", default="sdport-demo")
def demo_cmd(folder: str) -> None:
    """Build a tiny SD1.x .ckpt (real key names, no download) in FOLDER, inspect it, convert it."""
    from .demo import run_demo

    run_demo(folder, echo=click.echo)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    from .errors import SdportError

    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        cli.main(args=argv, prog_name="sdport", standalone_mode=False)
    except SdportError as exc:
        if debug:
            raise
        click.echo(f"sdport: error: {exc.message()}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("sdport: interrupted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("sdport: interrupted", err=True)
        return 130
    except _Terminated:
        click.echo("sdport: terminated", err=True)
        return 143
    except Exception as exc:  # noqa: BLE001 - the one place that reports bugs
        if debug:
            raise
        click.echo(f"sdport: error: internal error: {type(exc).__name__}: {exc} (rerun with --debug "
                   "and report it)", err=True)
        return 1
    return 0
