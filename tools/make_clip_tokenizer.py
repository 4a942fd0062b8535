#!/usr/bin/env python3
"""Derive CLIP's tokenizer files (``vocab.json``, ``merges.txt``) from the public BPE merge list, once.

    python tools/make_clip_tokenizer.py BPE_GZ OUT_DIR

BPE_GZ is ``bpe_simple_vocab_16e6.txt.gz`` as shipped inside the PyPI package open-clip-torch
(``open_clip/``). The vocabulary is built the way CLIP builds it: the 256 byte symbols, the same
with ``</w>``, one token per merge (the first 48,894 merges), then ``<|startoftext|>`` and
``<|endoftext|>`` — 49,408 tokens. The output is what transformers' ``CLIPTokenizer`` reads;
sdport ships it as package data (``src/sdport/data/clip``) so converted pipelines load offline.
"""

from __future__ import annotations

import gzip
import json
import os
import sys

VOCAB_SIZE = 49408


def byte_symbols() -> list[str]:
    """The printable stand-in for each byte value, in CLIP's order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    order, chars, extra = list(printable), list(printable), 0
    for b in range(256):
        if b not in printable:
            order.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def main(bpe_gz: str, out: str) -> None:
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = lines[1:VOCAB_SIZE - 512 - 2 + 1]
    symbols = byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB_SIZE == len(set(vocab)), len(vocab)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
