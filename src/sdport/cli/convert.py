"""``sdport convert``: options in, a ``ConvertRequest`` built from them, the result's summary and report out."""

from __future__ import annotations

import os

import click

from . import cli


@cli.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option("--to", type=click.Choice(["single-file", "diffusers", "mindspore", "onnx"]),
              help="Output layout (default: from DST); mindspore: a MindOne .ckpt, fp32 unless --dtype; onnx: a "
                   "folder of ONNX graphs (fp32 unless --dtype).")
@click.option("--dtype", default="keep", type=click.Choice(["keep", "fp32", "fp16", "bf16"]), show_default=True)
@click.option("--format", "fmt", type=click.Choice(["safetensors", "ckpt", "mindspore"]),
              help="Single-file format (default: from DST's suffix; .ckpt is PyTorch's).")
@click.option("--crc", is_flag=True,
              help="MindSpore outputs: append the crc_num trailer load_checkpoint(crc_check=True) verifies.")
@click.option("--ema", is_flag=True, help="Convert the UNet's EMA copy instead of its plain weights.")
@click.option("--components", help="Only these parts, comma-separated: unet,vae,text_encoder,text_encoder_2 "
              "(ONNX: vae_encoder,vae_decoder for the VAE).")
@click.option("--layout", "onnx_layout", type=click.Choice(["diffusers", "optimum"]),
              help="ONNX folder layout: diffusers (OnnxStableDiffusionPipeline, onnx-web; the default) or optimum "
                   "(ORT pipelines).")
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
@click.option("--vae", help="A VAE (file, folder or any source) in place of the model's own (folder outputs).")
@click.option("--inversion", "inversions", multiple=True, metavar="[TOKEN=]FILE[:WEIGHT]",
              help="Blend a textual-inversion embedding into the text encoder and tokenizer (folder outputs); "
                   "repeat for more. Tokens as onnx-web names them (README, Batch).")
@click.option("--variant", help="Read the diffusers weights of this variant (fp16) of a folder or Hub repo.")
@click.option("--allow-unknown", is_flag=True, help="Copy tensors no rule knows instead of refusing.")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@click.option("--report", is_flag=True, help="List every input entry left out, with the reason.")
@click.option("--verify", "check", is_flag=True, help="Then run DST against SRC (its --lora merged): component "
              "outputs and a 4-step image, as `sdport verify --outputs`; exit 3 if they differ.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def convert_cmd(src: str, dst: str, to: str | None, dtype: str, fmt: str | None, crc: bool, ema: bool,
                components: str | None, onnx_layout: str | None, vae_dtype: str | None, opset: int | None,
                controlnet: bool, prediction_type: str | None, loras: tuple[str, ...], allow_unmatched: bool,
                lora_alpha: float | None, base: str | None, vae: str | None, inversions: tuple[str, ...],
                variant: str | None, allow_unknown: bool, force: bool, report: bool, check: bool, quiet: bool) -> int:
    """Convert SRC to DST (another format, layout or dtype), streaming, atomically.

    SRC, --lora and --base take a path, a Hugging Face repo (owner/repo[@rev], hf://…), civitai://VERSION or a URL.
    """
    # sdport's own workers compute LoRA updates; OpenBLAS's pool on top of them only spins (2× the CPU time of a
    # merge on two cores). numpy is not imported yet here; a user's explicit setting wins.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from ..api import run
    from ..errors import SdportError
    from ..request import ConvertRequest, InversionSpec

    if check and (vae or inversions):
        raise SdportError(None, "--verify compares DST with SRC, and --vae and --inversion change what it computes",
                          "verify without them")
    request = ConvertRequest.build(src, dst, to=to, dtype=dtype, format=fmt, ema=ema, components=components,
                                   prediction_type=prediction_type, loras=loras, allow_unmatched=allow_unmatched,
                                   lora_alpha=lora_alpha, base=base, allow_unknown=allow_unknown, force=force,
                                   onnx_layout=onnx_layout, vae_dtype=vae_dtype, opset=opset, controlnet=controlnet,
                                   crc=crc, variant=variant, vae=vae,
                                   inversions=[InversionSpec.parse(i) for i in inversions])
    result = run(request, progress=not quiet)
    if not quiet:
        click.echo(f"wrote {result.output}: {result.tensors} tensors, {result.bytes:,} bytes"
                   + (f", {len(result.dropped)} entries left out" if result.dropped else ""), err=True)
        for path, why in result.added.items():
            click.echo(f"added {path}: {why}", err=True)
        if result.family == "lora":
            click.echo("note: a LoRA adapter, repackaged as it is; `sdport lora convert` rewrites adapters between "
                       "formats, `--lora` merges one into a model", err=True)
    if report:
        for adapter in result.adapters:
            click.echo(f"lora {adapter.line()}")
            for label in adapter.unmatched:
                click.echo(f"  unmatched {label}")
        for line in _left_out(result):
            click.echo(line)
        for name in result.unknown:
            click.echo(f"unknown {name}: copied unchanged (--allow-unknown)")
        for path, why in result.added.items():
            click.echo(f"added {path}: {why}")
    return _verify(request) if check else 0


def _left_out(result) -> list[str]:
    """The entries left out grouped by reason, most first, each group with its count and names; the adapter alphas
    read into the merge as one count."""
    groups: dict[str, list[str]] = {}
    for name, why in result.dropped.items():
        groups.setdefault(why, []).append(name)
    lines = []
    for why, names in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"left out {len(names)}: {why}")
        lines += [f"  {name}" for name in names]
    if result.read:
        lines.append(f"read {len(result.read)}: {next(iter(result.read.values()))}")
    return lines


def _verify(request) -> int:
    """The output-level check of the output against its source (adapters merged into the source the same way)."""
    from ..parity import verify
    from ..parity.report import table
    from .verify import PARITY_FAILURE

    result = verify(request.source, request.output, outputs=True, loras=request.loras, variant=request.variant)
    click.echo(table(result))
    return 0 if result.passed else PARITY_FAILURE
