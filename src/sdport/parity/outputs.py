"""Output-level parity: the same inputs through each component of both models, and one short sampling run.

A ``Job`` holds every input (token ids, the fixed probes of each component, the initial latent, the
schedule) and is picklable, so a backend in another interpreter (MindSpore's) runs exactly the same
job. ``run_job`` asks a backend for each component's outputs under the ONNX export's names
(``trace.onnx.specs``) — the one vocabulary every backend speaks — and for the image the loop in
``sampling`` makes from the initial latent. ``compare_outputs`` measures two runs' results.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np

from .sampling import Schedule, sample, to_pixels

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
PROBE_TIMESTEP = 500.0
GUIDANCE = 7.5


class Backend(Protocol):
    """A model a runtime holds: which components it has, and one call per component under the ONNX names."""

    components: set[str]

    def run(self, component: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def release(self, component: str) -> None: ...  # the component will not run again: its memory may go


@dataclass
class Job:
    """Every input of one check, the same on both sides.

    Attributes:
        ids: text encoder → (2, 77) token ids, the empty prompt then the prompt.
        embeds: prompt embeddings given instead of text encoders (``--prompt-embeds``): conditioning, pooled.
        latents: the initial latent noise (1, 4, h, w).
        probes: fixed random inputs of the UNet and VAE checks.
        time_ids: SDXL's added time ids (size, crop, size — or a refiner's aesthetic score), negative then positive.
        zero_negative: SDXL's ``force_zeros_for_empty_prompt``: the unconditional half is zeros.
    """

    ids: dict[str, np.ndarray]
    embeds: tuple[np.ndarray, np.ndarray | None] | None
    latents: np.ndarray
    probes: dict[str, np.ndarray]
    schedule: Schedule
    steps: int
    scheduler: str
    scaling_factor: float
    in_channels: int = 4
    time_ids: np.ndarray | None = None
    zero_negative: bool = False  # SDXL base: the empty prompt's conditioning is zeros, not its encoding
    image: bool = True

    def save(self, path: str) -> None:
        """The job as one ``.npz`` (arrays, and the settings as JSON text): what another interpreter's worker runs."""
        arrays = {"latents": self.latents, **{f"ids.{k}": v for k, v in self.ids.items()},
                  **{f"probes.{k}": v for k, v in self.probes.items()}}
        if self.embeds is not None:
            arrays["embeds.cond"] = self.embeds[0]
            if self.embeds[1] is not None:
                arrays["embeds.pooled"] = self.embeds[1]
        if self.time_ids is not None:
            arrays["time_ids"] = self.time_ids
        meta = {"schedule": asdict(self.schedule), "steps": self.steps, "scheduler": self.scheduler,
                "scaling_factor": self.scaling_factor, "in_channels": self.in_channels,
                "zero_negative": self.zero_negative, "image": self.image, "embeds": self.embeds is not None}
        np.savez(path, meta=np.array(json.dumps(meta)), **arrays)

    @classmethod
    def load(cls, path: str) -> Job:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        meta = json.loads(str(arrays.pop("meta")))
        pick = lambda prefix: {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}  # noqa: E731
        embeds = (arrays["embeds.cond"], arrays.get("embeds.pooled")) if meta["embeds"] else None
        return cls(pick("ids."), embeds, arrays["latents"], pick("probes."), Schedule(**meta["schedule"]),
                   meta["steps"], meta["scheduler"], meta["scaling_factor"], meta["in_channels"],
                   arrays.get("time_ids"), meta["zero_negative"], meta["image"])


def run_job(backend: Backend, job: Job) -> dict[str, np.ndarray]:
    """Every output of the job a backend can give: components under ``component.output``, then ``image``.

    Components run in an order that lets each be released once done (text encoders, VAE encoder, UNet, VAE
    decoder), so a side holds about one component's weights at a time.
    """
    have = backend.components
    out: dict[str, np.ndarray] = {}
    for c in TEXT_ENCODERS:
        if c in have and c in job.ids:
            got = backend.run(c, {"input_ids": job.ids[c]})
            backend.release(c)
            hidden = sorted((k for k in got if k.startswith("hidden_states.")), key=lambda k: int(k.split(".")[1]))
            for name in hidden[:-2] + hidden[-1:]:  # SDXL reads the penultimate layer: that one is compared
                del got[name]
            out.update({f"{c}.{name}": value for name, value in got.items()})
    if "vae_encoder" in have:
        out["vae_encoder.latent_sample"] = backend.run("vae_encoder", {"sample": job.probes["image"]})["latent_sample"]
        backend.release("vae_encoder")
    image = job.image and {"unet", "vae_decoder"} <= have
    if "unet" in have:
        out["unet.out_sample"] = backend.run("unet", _unet_inputs(job, job.probes["sample"], PROBE_TIMESTEP,
                                                                   job.probes["encoder_hidden_states"],
                                                                   job.probes.get("text_embeds")))["out_sample"]
        if image:
            cond, pooled = conditioning(job, out)
            out["latents"] = sample(_denoiser(backend, job, cond, pooled), job.latents, job.schedule,
                                    steps=job.steps, scheduler=job.scheduler)
        backend.release("unet")
    if "vae_decoder" in have:
        out["vae_decoder.sample"] = backend.run("vae_decoder", {"latent_sample": job.probes["latent"]})["sample"]
        if image:
            decoded = backend.run("vae_decoder", {"latent_sample": out["latents"] / job.scaling_factor})
            out["image"] = to_pixels(decoded["sample"])
        backend.release("vae_decoder")
    return out


def conditioning(job: Job, out: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """The UNet's (2, 77, width) conditioning and SDXL's pooled embedding, from the text encoders' outputs.

    SD1/SD2 use the last hidden state; SDXL concatenates the penultimate hidden states of its encoders
    and pools with the second one's projection, as its pipelines do.
    """
    if job.embeds is not None:
        return job.embeds
    if job.time_ids is None:
        return out["text_encoder.last_hidden_state"], None
    hidden = [out[k] for c in TEXT_ENCODERS for k in out if k.startswith(f"{c}.hidden_states.")]
    cond, pooled = np.concatenate(hidden, axis=-1), out["text_encoder_2.text_embeds"].copy()
    if job.zero_negative:
        cond[:1], pooled[:1] = 0.0, 0.0
    return cond, pooled


def _unet_inputs(job: Job, x: np.ndarray, t: float, cond: np.ndarray, pooled: np.ndarray | None
                 ) -> dict[str, np.ndarray]:
    batch = cond.shape[0]
    if x.shape[0] != batch:
        x = np.repeat(x, batch, axis=0)
    if job.in_channels == 9:  # inpainting: a mask of ones over an empty masked image — repaint everything
        mask = np.ones((batch, 1, *x.shape[2:]), np.float32)
        x = np.concatenate([x, mask, np.zeros((batch, 4, *x.shape[2:]), np.float32)], axis=1)
    inputs = {"sample": x.astype(np.float32), "timestep": np.array([t], np.float32),
              "encoder_hidden_states": cond.astype(np.float32)}
    if job.time_ids is not None:
        inputs["text_embeds"] = pooled.astype(np.float32)
        inputs["time_ids"] = job.time_ids[-batch:].astype(np.float32)
    return inputs


def _denoiser(backend: Backend, job: Job, cond: np.ndarray, pooled: np.ndarray | None):
    """The guided UNet: one call on the (unconditional, conditional) pair per step."""

    def denoise(x: np.ndarray, t: float) -> np.ndarray:
        pred = backend.run("unet", _unet_inputs(job, x, t, cond, pooled))["out_sample"].astype(np.float64)
        return pred[:1] + GUIDANCE * (pred[1:] - pred[:1])

    return denoise


@dataclass
class OutputDiff:
    """One output of both sides: its errors, and whether they pass."""

    name: str
    max_abs: float
    mean_abs: float
    cosine: float | None = None
    psnr: float | None = None
    passed: bool = True

    def as_dict(self) -> dict:
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                for k, v in self.__dict__.items()}


@dataclass
class Tolerance:
    """Pass thresholds: component cosine similarity, image mean abs pixel error (0–255), tensor ULPs."""

    cosine: float = 0.999
    pixel: float = 5.0
    ulp: float = 0.5

    @classmethod
    def parse(cls, text: str | None) -> Tolerance:
        from ..errors import SdportError

        tol = cls()
        for item in filter(None, (text or "").split(",")):
            key, _, value = item.partition("=")
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if key.strip() not in ("cosine", "pixel", "ulp") or not math.isfinite(number) or number < 0:
                raise SdportError(None, f"bad --tolerance {item!r}", "write e.g. pixel=5,cosine=0.999,ulp=0.5")
            setattr(tol, key.strip(), number)
        return tol


@dataclass
class OutputReport:
    """Every shared output compared; outputs only one side gave are listed, not failed."""

    diffs: list[OutputDiff] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(d.passed for d in self.diffs)


def compare_outputs(a: dict[str, np.ndarray], b: dict[str, np.ndarray], tol: Tolerance) -> OutputReport:
    report = OutputReport(skipped=sorted((a.keys() ^ b.keys()) - {"latents"}))
    for name in [k for k in a if k in b and k != "latents"]:
        x, y = a[name].astype(np.float64), b[name].astype(np.float64)
        if x.shape != y.shape:
            report.diffs.append(OutputDiff(f"{name} (shape {x.shape} vs {y.shape})", math.inf, math.inf, passed=False))
            continue
        err = np.abs(x - y)
        diff = OutputDiff(name, float(err.max(initial=0.0)), float(err.mean()) if err.size else 0.0)
        if name == "image":
            mse = float(np.mean(err ** 2))
            diff.psnr = math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)
            diff.passed = diff.mean_abs < tol.pixel
        else:
            norm = float(np.linalg.norm(x) * np.linalg.norm(y))
            diff.cosine = float(np.vdot(x, y) / norm) if norm else (1.0 if not err.any() else 0.0)
            diff.passed = bool(np.isfinite(x).all() and np.isfinite(y).all()) and diff.cosine >= tol.cosine
        report.diffs.append(diff)
    return report
