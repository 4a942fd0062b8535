"""``sdport verify``: parse the check's options, print its table (or JSON), exit 0 on pass and 3 on a failure."""

from __future__ import annotations

import json

import click

from . import cli

PARITY_FAILURE = 3


@cli.command("verify")
@click.argument("a")
@click.argument("b", required=False)
@click.option("--tensors", is_flag=True, help="Compare the weights (no torch needed).")
@click.option("--outputs", is_flag=True, help="Run both models: each component on fixed inputs, and a short "
              "sampling run. Neither flag: both checks.")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:RATIO]", help="An adapter merged into A first.")
@click.option("--lora-b", "loras_b", multiple=True, metavar="FILE[:RATIO]", help="An adapter merged into B first.")
@click.option("--dtypes", help="One model at several precisions (fp32,fp16,bf16): the first against each other.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initial latent and the probes.")
@click.option("--latents", type=click.Path(dir_okay=False), help="The initial latent, a saved .npy (1, 4, h, w).")
@click.option("--steps", type=int, default=4, show_default=True, help="Sampling steps.")
@click.option("--size", metavar="WxH", help="Image size (default: the UNet's own, 512x512 for SD1.5).")
@click.option("--prompt", default=None, help="The prompt (default: an astronaut riding a horse on mars).")
@click.option("--prompt-embeds", type=click.Choice(["random", "zeros"]),
              help="Condition on these embeddings instead of the text encoders.")
@click.option("--scheduler", default="euler", show_default=True, type=click.Choice(["euler", "ddim"]))
@click.option("--tolerance", metavar="K=V,…", help="pixel=5 (mean abs, 0-255), cosine=0.999 (components), "
              "ulp=0.5 (tensors across a cast).")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), help="Write report.json, "
              "init_latents.npy and compare.png here.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json's content instead of a table.")
@click.option("--variant", help="Read the diffusers weights of this variant (fp16) of a folder or Hub repo.")
def verify_cmd(a: str, b: str | None, tensors: bool, outputs: bool, loras: tuple[str, ...], loras_b: tuple[str, ...],
               dtypes: str | None, seed: int, latents: str | None, steps: int, size: str | None, prompt: str | None,
               prompt_embeds: str | None, scheduler: str, tolerance: str | None, report_dir: str | None,
               as_json: bool, variant: str | None) -> int:
    """Check that B is the same model as A (any forms and sources): tensor by tensor, component outputs and images.

    Exit status 0: the same within the tolerances; 3: they differ; 2: bad input.
    """
    from ..parity import DEFAULT_PROMPT, verify
    from ..parity.report import table

    result = verify(a, b, tensors=tensors or None, outputs=outputs or None, loras=loras, loras_b=loras_b,
                    dtypes=dtypes, seed=seed, latents=latents, steps=steps, size=size,
                    prompt=prompt if prompt is not None else DEFAULT_PROMPT, prompt_embeds=prompt_embeds,
                    scheduler=scheduler, tolerance=tolerance, report=report_dir, variant=variant)
    click.echo(json.dumps(result.as_dict(), indent=2) if as_json else table(result))
    if result.png and not as_json:
        click.echo(f"image comparison: {result.png}")
    return 0 if result.passed else PARITY_FAILURE
