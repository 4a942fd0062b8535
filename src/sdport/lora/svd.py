"""Low-rank factorisation by SVD: the closest rank-r LoRA to a weight difference, and what it keeps.

``factorize`` returns ``up = U·S`` and ``down = Vh`` truncated to the rank, as kohya's extraction
does, plus the relative Frobenius error ``‖ΔW − up·down‖ / ‖ΔW‖`` (Eckart–Young: the best any
rank-r factorisation can do). ``pick_rank`` chooses the smallest rank that keeps a share of the
energy (Σ S², the squared Frobenius norm), within bounds.
"""

from __future__ import annotations

import numpy as np


def spectrum(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """U, S, Vh of a 2-D matrix (thin SVD, in fp32)."""
    u, s, vh = np.linalg.svd(matrix.astype(np.float32, copy=False), full_matrices=False)
    return u, s, vh


def pick_rank(s: np.ndarray, *, rank: int, energy: float | None = None, min_rank: int = 1,
              max_rank: int | None = None) -> int:
    """``rank``, or with ``energy`` the smallest rank keeping that share of Σ S², clipped to [min_rank, max_rank]."""
    if energy is None:
        r = rank
    else:
        total = float(np.sum(s ** 2))
        kept = np.cumsum(s ** 2) / total if total > 0 else np.ones_like(s)
        r = int(np.searchsorted(kept, energy - 1e-12) + 1)
        r = max(min_rank, min(r, max_rank or rank))
    return max(1, min(r, len(s)))


def retained(s: np.ndarray, r: int) -> float:
    """The share of Σ S² the first ``r`` singular values keep."""
    total = float(np.sum(s ** 2))
    return float(np.sum(s[:r] ** 2)) / total if total > 0 else 1.0


def factorize(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """``up [out, r]``, ``down [r, in]`` with ``up @ down`` the best rank-``rank`` approximation, and its error."""
    u, s, vh = spectrum(matrix)
    r = max(1, min(rank, len(s)))
    return split(u, s, vh, r)


def split(u: np.ndarray, s: np.ndarray, vh: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The rank-``r`` factors of an SVD and the relative error they leave."""
    up = (u[:, :r] * s[:r]).astype(np.float32)
    down = vh[:r].astype(np.float32)
    return up, down, float(np.sqrt(max(0.0, 1.0 - retained(s, r))))
