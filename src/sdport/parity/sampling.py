"""The sampling loop every backend runs the same way: numpy schedulers, classifier-free guidance, decode.

Both sides of a check see the same initial latent, the same timesteps and the same arithmetic between
UNet calls, so any difference in the image comes from the models. The schedules are diffusers'
(``scaled_linear`` betas of the family's training run; Euler with ``linspace`` spacing, DDIM with
``leading`` spacing and eta 0), in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SCHEDULERS = ("euler", "ddim")
#: UNet(sample, timestep) → the model's prediction (noise or v), with guidance already applied
Denoise = Callable[[np.ndarray, float], np.ndarray]


@dataclass(frozen=True)
class Schedule:
    """A model's training noise schedule and what its UNet predicts."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    train_steps: int = 1000
    prediction_type: str = "epsilon"

    @classmethod
    def from_config(cls, config: dict | None, prediction_type: str = "") -> Schedule:
        config = config or {}
        return cls(float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012)),
                   str(config.get("beta_schedule", "scaled_linear")), int(config.get("num_train_timesteps", 1000)),
                   prediction_type or str(config.get("prediction_type", "epsilon")))

    def alphas_cumprod(self) -> np.ndarray:
        if self.beta_schedule == "scaled_linear":
            betas = np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, self.train_steps) ** 2
        else:
            betas = np.linspace(self.beta_start, self.beta_end, self.train_steps)
        return np.cumprod(1.0 - betas)


def sample(denoise: Denoise, latents: np.ndarray, schedule: Schedule, *, steps: int, scheduler: str) -> np.ndarray:
    """Run ``steps`` steps of ``scheduler`` from the initial noise ``latents``; the final latents (float32)."""
    loop = {"euler": _euler, "ddim": _ddim}[scheduler]
    return loop(denoise, latents.astype(np.float64), schedule, steps).astype(np.float32)


def _x0(out: np.ndarray, x: np.ndarray, alpha: float, kind: str) -> np.ndarray:
    """The denoised latent from the model's output at cumulative alpha ``alpha`` (x in DDPM scale)."""
    if kind == "v_prediction":
        return alpha ** 0.5 * x - (1 - alpha) ** 0.5 * out
    return (x - (1 - alpha) ** 0.5 * out) / alpha ** 0.5


def _euler(denoise: Denoise, noise: np.ndarray, s: Schedule, steps: int) -> np.ndarray:
    ac = s.alphas_cumprod()
    all_sigmas = ((1 - ac) / ac) ** 0.5
    timesteps = np.linspace(0, s.train_steps - 1, steps)[::-1]
    sigmas = np.append(np.interp(timesteps, np.arange(s.train_steps), all_sigmas), 0.0)
    x = noise * sigmas[0]
    for i, t in enumerate(timesteps):
        sigma = sigmas[i]
        alpha = 1 / (sigma ** 2 + 1)  # x / sqrt(sigma² + 1) is the DDPM-scale sample at this sigma
        x0 = _x0(denoise((x * alpha ** 0.5).astype(np.float32), float(t)).astype(np.float64), x * alpha ** 0.5,
                 alpha, s.prediction_type)
        x = x + (x - x0) / sigma * (sigmas[i + 1] - sigma)
    return x


def _ddim(denoise: Denoise, noise: np.ndarray, s: Schedule, steps: int) -> np.ndarray:
    ac = s.alphas_cumprod()
    ratio = s.train_steps // steps
    timesteps = (np.arange(steps) * ratio)[::-1] + 1
    x = noise
    for t in timesteps:
        alpha, prev = ac[t], (ac[t - ratio] if t - ratio >= 0 else ac[0])
        out = denoise(x.astype(np.float32), float(t)).astype(np.float64)
        x0 = _x0(out, x, alpha, s.prediction_type)
        eps = (x - alpha ** 0.5 * x0) / (1 - alpha) ** 0.5
        x = prev ** 0.5 * x0 + (1 - prev) ** 0.5 * eps
    return x


def to_pixels(decoded: np.ndarray) -> np.ndarray:
    """A VAE's output (1, 3, H, W) in [-1, 1] → an (H, W, 3) uint8 image, as diffusers' image processor rounds it."""
    image = np.clip(decoded[0].astype(np.float64) / 2 + 0.5, 0, 1).transpose(1, 2, 0)
    return np.round(image * 255).astype(np.uint8)
