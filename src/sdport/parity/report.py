"""What a check shows people: a terminal table, ``report.json``, and a PNG per check — A | B | difference.

The PNG needs no imaging library: rows of uint8 pixels, zlib-compressed into the few chunks a PNG needs.
The difference panel is the per-pixel max channel error times ``AMPLIFY`` in a black → red → yellow → white
ramp, so identical images give a black panel and a one-level difference is visible.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from typing import TYPE_CHECKING

import numpy as np

from ..io.atomic import write_atomic

if TYPE_CHECKING:
    from . import VerifyResult
    from .outputs import OutputReport
    from .tensors import TensorReport

AMPLIFY = 10
GAP = 4


def table(result: VerifyResult) -> str:
    """The verdict as the terminal shows it."""
    lines = []
    for c in result.comparisons:
        lines.append(f"== {c.label}: {'pass' if c.passed else 'FAIL'}")
        if c.tensors is not None:
            lines += _tensor_lines(c.tensors)
        if c.outputs is not None:
            lines += _output_lines(c.outputs, c.runtimes)
    lines += [f"note: {n}" for n in result.notes]
    lines.append(f"verdict: {'PASS' if result.passed else 'FAIL'}")
    return "\n".join(lines)


def _tensor_lines(t: TensorReport) -> list[str]:
    lines = [f"tensors  {'pass' if t.passed else 'FAIL'}  {t.compared} compared: {t.identical} identical, "
             f"{t.within} within {t.tolerance_ulp:g} ULP, {t.different} different"]
    lines += [f"  only in A: {n}" for n in t.only_a[:10]] + [f"  only in B: {n}" for n in t.only_b[:10]]
    more = len(t.only_a) + len(t.only_b) - min(len(t.only_a), 10) - min(len(t.only_b), 10)
    lines += [f"  … and {more} more on one side only (report.json lists them all)"] if more > 0 else []
    for d in t.worst:
        ulp = "" if d.max_ulp is None else f"  {d.max_ulp:.3g} ULP"
        lines.append(f"  {d.status:9} {d.name}  {d.dtype_a}/{d.dtype_b}  max abs {d.max_abs:.3g}  "
                     f"max rel {d.max_rel:.3g}{ulp}")
    return lines


def _output_lines(out: OutputReport, runtimes: tuple[str, str]) -> list[str]:
    lines = [f"outputs  {'pass' if out.passed else 'FAIL'}  ({runtimes[0]} | {runtimes[1]})",
             f"  {'output':34} {'max abs':>10} {'mean abs':>10} {'cosine':>9} {'PSNR dB':>8}"]
    for d in out.diffs:
        cos = "" if d.cosine is None else f"{d.cosine:.6f}"
        psnr = "" if d.psnr is None else f"{d.psnr:.1f}"
        lines.append(f"  {d.name:34} {d.max_abs:10.4g} {d.mean_abs:10.4g} {cos:>9} {psnr:>8}"
                     f"{'' if d.passed else '  FAIL'}")
    return lines + [f"  only one side: {n}" for n in out.skipped]


def write_report(result: VerifyResult, folder: str) -> None:
    """``compare.png`` (when images were made) and ``report.json`` in ``folder``, each written atomically."""
    rows = [_row(*c.images) for c in result.comparisons if c.images is not None]
    if rows:
        result.png = os.path.join(folder, "compare.png")
        write_atomic(result.png, png(_stack(rows)))
    result.report = folder
    write_atomic(os.path.join(folder, "report.json"), json.dumps(result.as_dict(), indent=2).encode() + b"\n")


def heat(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a − b| (max over channels) × AMPLIFY as an RGB heat map: black where the images agree."""
    v = np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2).astype(np.float64) * AMPLIFY / 255
    ramp = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=2)
    return np.round(ramp * 255).astype(np.uint8)


def _row(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    gap = np.full((a.shape[0], GAP, 3), 255, np.uint8)
    return np.concatenate([a, gap, b, gap, heat(a, b)], axis=1)


def _stack(rows: list[np.ndarray]) -> np.ndarray:
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, GAP), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(padded, axis=0)[:-GAP]


def png(image: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 image as PNG bytes (8-bit RGB, no filtering)."""
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
