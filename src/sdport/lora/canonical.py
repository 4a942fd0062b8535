"""Adapter modules in canonical names — component and dotted diffusers path — whatever format they came in, and
LyCORIS modules re-factorised as LoRA by SVD: what ``lora convert``, ``combine`` and ``extract`` write from.

An ``Out`` names its factor tensors in a workspace ``TensorSource``: the input adapters joined into it
(their factors are then copied byte for byte by the writer) and the tensors computed here (SVD factors,
rank-concatenated factors, alphas), held in memory by ``TensorSource.put``. Names are read against the
adapter's own family: SDXL kohya files name UNet modules after the SGM layout, SD1/SD2 ones mostly after
diffusers' (``names``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np

from ..dtypes import cast
from ..errors import FormatError
from ..families import FAMILIES
from ..families.parts.clip import hub_name
from ..io.base import TensorSource
from ..model import Model
from ..patches import MAGNITUDES, delta
from .formats import Adapter, Module, base_family, parse, rank_role, read_alphas, scale
from .names import SGM_ROOTS, dotted, unet_to_diffusers
from .svd import factorize

#: the SD UNet's 3×3 convs, by the end of their diffusers path
CONV3X3 = ("conv1", "conv2", "conv_in", "conv_out", "downsamplers.0.conv", "upsamplers.0.conv")
COMPUTED = "computed:"


@dataclass
class Out:
    """One module of the adapter being written: canonical names, its factors by role (tensor names in the
    workspace), and how its update is scaled."""

    component: str
    path: str
    kind: str  # lora, loha, lokr, ia3, full, norm
    factors: dict[str, str]
    alpha: float | None = None
    rslora: bool = False
    on_input: bool = False

    @property
    def label(self) -> str:
        return f"{self.component}:{self.path}"

    def rank(self, source: TensorSource) -> int | None:
        key = rank_role(self.kind, self.factors)
        return source.tensors[self.factors[key]].shape[0] if key else None

    def scale(self, source: TensorSource) -> float:
        return scale(self.rank(source), self.alpha, self.rslora)


def computed(source: TensorSource, name: str, a: np.ndarray, dtype: str) -> str:
    """Values computed here (fp32), held in ``source`` as ``dtype`` under ``computed:<name>``."""
    return source.put(COMPUTED + name, cast(np.require(np.asarray(a, dtype=np.float32), requirements="C"), dtype))


def adapter_family(source: TensorSource, modules: list[Module]) -> str:
    """The family whose names the adapter uses: the one its cross-attention width or text encoders say; else the one
    whose UNet table knows every module named after the original (SGM) layout — kohya names SDXL's that way, and
    SD1's when it extracts them — SDXL's first; else SD1's diffusers-derived names."""
    found = base_family(source, Adapter(source.path, "", modules, []))
    if found:
        return found
    pipelines = [f for f in FAMILIES.values() if f.whole and f.unet_layout]
    sgm = [path for m in modules if m.component == "unet" and (path := _sgm_path(m)) is not None]
    fits = [f for f in pipelines if sgm and all(unet_to_diffusers(p, f.name) for p in sgm)]
    return min(fits or pipelines, key=lambda f: f.kohya_sgm != bool(fits)).name


def _sgm_path(m: Module) -> str | None:
    """The module's dotted path when it is named after the original UNet's blocks, else None."""
    name = re.sub(r"^model[._]diffusion_model[._]", "", m.name)
    path = dotted(name) if m.naming == "kohya" else name
    return path if path and path.split(".", 1)[0] in SGM_ROOTS else None


@dataclass
class Canonical:
    """An adapter read into a workspace: its modules, family, the dtype of its alphas and the alpha tensors."""

    outs: list[Out]
    family: str
    alpha_dtype: str
    alpha_keys: list[str]
    left: dict[str, str]  # tensors of the file that are no module's factors → why


def canonical(model: Model, workspace: TensorSource, prefix: str = "", family: str | None = None) -> Canonical:
    """The adapter's modules in canonical names; its tensors join ``workspace`` under ``prefix``."""
    source = model.source
    adapter = parse(source, read_alphas(source), model.found.adapter_format)
    family = family or adapter_family(source, adapter.modules)
    names = workspace.join(prefix, source)
    alpha_dtypes = Counter(source.tensors[k].dtype for k in adapter.alpha_keys if k.endswith(".alpha"))
    outs: dict[str, Out] = {}
    for m in adapter.modules:
        path = dotted(m.name) if m.naming == "kohya" else m.name.removeprefix("model.diffusion_model.")
        if path is not None:
            path = unet_to_diffusers(path, family) if m.component == "unet" else hub_name(path)
        if path is None:
            raise FormatError(source.path, f"module '{m.name}' has a name sdport cannot map to a {family} module",
                              "merge it into a base instead: a base's own names resolve every module")
        out = Out(m.component, path, m.kind, {r: names[n] for r, n in m.factors.items()}, m.alpha, m.rslora,
                  m.on_input)
        if out.label in outs:
            raise FormatError(source.path, f"two modules of the file update {out.label}", "the file is damaged")
        outs[out.label] = out
    alpha_dtype = alpha_dtypes.most_common(1)[0][0] if alpha_dtypes else "F32"
    return Canonical(list(outs.values()), family, alpha_dtype, [names[k] for k in adapter.alpha_keys],
                     {names[k]: why for k, why in adapter.left.items()})


def refactorable(out: Out) -> bool:
    """Whether the module is a ΔW LoRA can approximate but not hold as it is (LoHa, LoKr, Tucker, full)."""
    return (out.kind in ("loha", "lokr", "full") or "mid" in out.factors) and "bias" not in out.factors


def as_lora(out: Out, source: TensorSource, rank: int, dtype: str, family: str) -> tuple[Out, float]:
    """A LoRA of at most ``rank`` closest to the module's scaled ΔW (SVD, alpha = rank), and its relative error.

    A DoRA magnitude is kept: it renormalises W + ΔW, whatever factors ΔW comes from.
    """
    roles = {r: f for r, f in out.factors.items() if r not in MAGNITUDES}
    d = out.scale(source) * delta({"full": "diff"}.get(out.kind, out.kind),
                                  {r: source.read(f) for r, f in roles.items()})
    shape = _kernel_shape(out.path, d.shape, family)
    up, down, error = factorize(d.reshape(shape[0], -1), rank)
    factors = {"up": computed(source, f"{out.label}.up", up.reshape(shape[0], -1, *([1] * (len(shape) - 2))), dtype),
               "down": computed(source, f"{out.label}.down", down.reshape(down.shape[0], *shape[1:]), dtype),
               **{r: f for r, f in out.factors.items() if r in MAGNITUDES}}
    return replace(out, kind="lora", factors=factors, alpha=float(up.shape[1]), rslora=False), error


def _kernel_shape(path: str, shape: tuple[int, ...], family: str) -> tuple[int, ...]:
    """ΔW's shape with its conv kernel: LoHa and LoKr store a conv's flattened, [out, in·kh·kw]."""
    if len(shape) != 2 or not path.startswith(("down_blocks", "up_blocks", "mid_block", "conv_")):
        return shape
    if path.endswith(CONV3X3) and shape[1] % 9 == 0:
        return (shape[0], shape[1] // 9, 3, 3)
    # 1×1 convs: every resnet's shortcut, and the attention projections of families that project with convs
    if path.endswith("conv_shortcut") or (FAMILIES[family].conv_projections and path.endswith(("proj_in", "proj_out"))):
        return (*shape, 1, 1)
    return shape
