"""The passes that change a target's plan, in order (``STEPS``): each is ``(Plan, Run) -> Plan``.

``place_unknown`` lets through what no rule knows (``--allow-unknown``); ``take_ema`` reads the UNet's EMA
copy instead of its weights (``--ema``); ``into_base`` puts the input's tensors into a whole model
(``--base``); ``replace_vae`` reads another VAE's weights in place of the model's (``vae=``);
``merge_loras`` adds each adapter's update as patches (``--lora``); ``add_inversions`` blends textual-inversion
embeddings into the text encoders and tokenizers (``inversion``); ``cast`` gives float tensors the dtype asked
for. A step that reads another model opens it through ``Run.open`` and
joins its tensors into ``Run.source`` under a prefix (``base:``, ``lora<i>:``), so the plan streams
every input from one source and the output can never replace any of them.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from .dtypes import BY_CODE
from .errors import SdportError
from .families import UNET, Family
from .inversion import add_inversions
from .io.base import TensorSource
from .model import Model, open_model
from .plan import OutputFile, Plan, derive
from .request import ConvertRequest

if TYPE_CHECKING:
    from .lora.merge import AdapterReport
    from .targets import Target

BASE = "base:"
VAE = "vae:"
#: an original file with at least this many ``model_ema.`` tensors carries the UNet's EMA copy (a handful are
#: bookkeeping: decay, num_updates)
EMA_MIN = 100


@dataclass
class Run:
    """One conversion under way: what was asked, the opened input, the source every step reads from.

    Attributes:
        source: the input's tensors, joined by every model a step opens (a base, adapters).
        base: the ``--base`` model, once opened: its family is the output's.
        adapters: what each merged adapter did.
    """

    request: ConvertRequest
    model: Model
    target: Target
    stack: ExitStack
    progress: bool = False
    source: TensorSource = field(init=False)
    base: Model | None = None
    adapters: list[AdapterReport] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.source = self.stack.enter_context(self.model.source.fork())

    def open(self, source: str, kind: str = "model") -> Model:
        """Another model this run reads (any source form), open until the run ends."""
        from .sources import locate

        return self.stack.enter_context(open_model(locate(source, kind=kind, progress=self.progress).path))

    def family(self) -> Family:
        """The output's family: the base's with ``--base``, else the input's."""
        return (self.base or self.model).family()


def place_unknown(plan: Plan, run: Run) -> Plan:
    """With --allow-unknown, tensors no rule knows are copied unchanged into a single file, or left out of a folder."""
    if not run.request.allow_unknown:
        return plan
    used = {i for f in plan.files for t in f.tensors for i in t.inputs}
    left = [k for k in run.source.tensors if k not in used and k not in plan.dropped]
    plan.unknown += left
    if len(plan.files) == 1 and plan.files[0].path == "." and not plan.extra:
        plan.files[0].tensors += [derive(k, None, run.source, (k,)) for k in left]
    else:
        plan.dropped.update({k: "no rule knows it: left out (--allow-unknown)" for k in left})
    return plan


def ema_name(ldm_unet_name: str) -> str:
    """Where an original file keeps the EMA copy of a UNet weight: ``model_ema.`` + the name without dots."""
    return "model_ema." + ldm_unet_name.removeprefix("model.").replace(".", "")


def take_ema(plan: Plan, run: Run) -> Plan:
    """With --ema, every output made of UNet weights reads their EMA copies instead."""
    if not run.request.ema:
        return plan
    source = run.source
    if sum(k.startswith("model_ema.") for k in source.tensors) < EMA_MIN:
        raise SdportError(source.path, "--ema: the file has no EMA weights", "convert without --ema")
    taken: dict[str, str] = {}
    for out in plan.files:
        for k, t in enumerate(out.tensors):
            if any(i.startswith(UNET.ldm_prefix) for i in t.inputs):
                inputs = tuple(ema_name(i) if i.startswith(UNET.ldm_prefix) else i for i in t.inputs)
                missing = next((i for i in inputs if i not in source.tensors), None)
                if missing:
                    raise SdportError(source.path, f"--ema: the EMA copy '{missing}' is missing",
                                      "convert without --ema")
                taken.update(zip(t.inputs, inputs, strict=True))
                out.tensors[k] = replace(t, inputs=inputs, dtype=source.tensors[inputs[0]].dtype)
    for weight, copy in taken.items():
        plan.dropped.pop(copy, None)
        plan.dropped[weight] = "non-EMA UNet weight (--ema converts the EMA copy)"
    if not taken:
        plan.dropped.update({k: "EMA copy of the UNet, left out with it (--components)" for k in plan.dropped
                             if k.startswith("model_ema.")})
    return plan


def into_base(plan: Plan, run: Run) -> Plan:
    """With --base, the base's own plan with the input's tensors in place of its matching ones (by name and shape)."""
    if run.request.base is None:
        return plan
    from .targets.single_file import repackage_plan

    base = run.base = run.open(run.request.base)
    base_plan = repackage_plan(base.source, run.request, whole=True)
    names = run.source.join(BASE, base.source)
    provided = {t.name: t for t in plan.files[0].tensors}
    tensors, replaced = [], {}
    for t in base_plan.files[0].tensors:
        mine = provided.pop(t.name, None)
        if mine is None:
            tensors.append(replace(t, inputs=tuple(names[i] for i in t.inputs)))
        elif mine.shape != t.shape:
            raise SdportError(run.model.path, f"'{t.name}' is {list(mine.shape)}, in the base {list(t.shape)}",
                              "the input is not a part of this base's family")
        else:
            tensors.append(mine)
            replaced.update({names[i]: f"replaced by {run.model.path}" for i in t.inputs})
    if provided:
        name = next(iter(provided))
        raise SdportError(run.model.path, f"{len(provided)} tensors have no place in the base {base.path}, e.g. "
                          f"'{name}'", "the input is not a part of this base's family")
    out = base_plan.files[0]
    dropped = {**{BASE + k: v for k, v in base_plan.dropped.items()}, **replaced, **plan.dropped}
    return Plan([OutputFile(out.path, out.writer, tensors, out.metadata)], dropped)


def replace_vae(plan: Plan, run: Run) -> Plan:
    """With a VAE source, its weights in place of the model's own VAE (same names and shapes, or refused)."""
    if run.request.vae is None:
        return plan
    from .request import ConvertRequest
    from .targets import diffusers

    vae = run.open(run.request.vae)
    if vae.family().name != "vae" or vae.kind == "onnx":
        raise SdportError(vae.path, f"is a {vae.kind} {vae.family().name} model, not a VAE",
                          "give a VAE file or folder")
    planner = diffusers.from_original if vae.kind == "original" else (lambda m, r: diffusers.folder_plan(m))
    mine = next((f for f in plan.files if f.path.startswith("vae/")), None)
    if mine is None:
        raise SdportError(run.model.path, "has no VAE to replace", "drop the VAE, or convert the whole model")
    vae_plan = planner(vae, ConvertRequest(vae.path, "vae"))
    theirs = {t.name: t for f in vae_plan.files for t in f.tensors}
    names = run.source.join(VAE, vae.source)
    for k, t in enumerate(mine.tensors):
        new = theirs.pop(t.name, None)
        if new is None or new.shape != t.shape:
            got = "lacks it" if new is None else f"has it as {list(new.shape)}"
            raise SdportError(vae.path, f"the model's VAE has '{t.name}' {list(t.shape)}, this VAE {got}",
                              "the VAE is of another architecture")
        plan.dropped.update({i: f"VAE weight replaced by {vae.path}" for i in t.reads})
        mine.tensors[k] = replace(new, inputs=tuple(names[i] for i in new.inputs))
    if theirs:
        raise SdportError(vae.path, f"has {len(theirs)} weights the model's VAE lacks, e.g. '{next(iter(theirs))}'",
                          "the VAE is of another architecture")
    plan.dropped.update({names[k]: why for k, why in vae_plan.dropped.items()})
    return plan


def merge_loras(plan: Plan, run: Run) -> Plan:
    """With --lora, each adapter's modules become patches on the base weights they update (``lora.merge``)."""
    request = run.request
    if not request.loras:
        return plan
    from .lora.merge import merge_adapters

    read_as = {k: ema_name(k) for k in run.source.tensors if k.startswith(UNET.ldm_prefix)} if request.ema else {}
    adapters = [(run.open(spec.source, "adapter"), spec.ratio) for spec in request.loras]
    run.adapters = merge_adapters(plan, run.source, run.family(), run.model.kind != "original", adapters,
                                  allow_unmatched=request.allow_unmatched, read_as=read_as,
                                  default_alpha=request.lora_alpha)
    return plan


def cast(plan: Plan, run: Run) -> Plan:
    """Float tensors in the dtype asked for (the target's own default when none was); integers keep theirs."""
    dtype = run.request.dtype or run.target.default_dtype
    if dtype is None or not run.target.casts:
        return plan
    for out in plan.files:
        out.tensors = [replace(t, dtype=dtype) if BY_CODE[t.dtype].is_float else t for t in out.tensors]
    return plan


Step = Callable[[Plan, Run], Plan]
STEPS: tuple[Step, ...] = (place_unknown, take_ema, into_base, replace_vae, merge_loras, add_inversions, cast)


def apply(plan: Plan, run: Run) -> Plan:
    """Every step, in order."""
    for step in STEPS:
        plan = step(plan, run)
    return plan

