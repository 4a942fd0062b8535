"""The CLIP tokenizer sdport ships equals OpenCLIP's own BPE tokenizer, token for token.

OpenCLIP's ``tokenizer.py`` is loaded straight from the open-clip-torch package (installed without
its dependencies by .ci/run, so its torchvision need not import); transformers' ``CLIPTokenizer``
reads sdport's bundled ``vocab.json``/``merges.txt``.
"""

from __future__ import annotations

import importlib.util
import os
from importlib import resources

import pytest

from sdport.families.configs import tokenizer_files

# (the two libraries clean text differently with ftfy — curly quotes, dashes — so those are left out here;
# the vocabularies themselves are compared whole below)
TEXTS = ["a photo of an astronaut riding a horse on mars", "masterpiece, best quality, (ultra-detailed:1.2), 8k",
         "Hello, World!! 123 ümlaut café naïve 🤖🎨", "  spaces   and\ttabs\nnewlines  ",
         "CamelCase snake_case kebab-case UPPER lower 3.14159 1e-5", "日本語のテキスト 中文 한국어", "",
         "don't won't it's we're they've I'd", "#hashtag @mention http://x.y/z"]


def _open_clip_tokenizer():
    spec_dir = None
    for entry in importlib.util.find_spec("open_clip").submodule_search_locations or []:
        spec_dir = entry
    if spec_dir is None:
        pytest.skip("open_clip not installed")
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer", os.path.join(spec_dir, "tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(os.path.join(spec_dir, "bpe_simple_vocab_16e6.txt.gz"))


def test_bundled_vocabulary_tokenizes_like_open_clip(tmp_path) -> None:
    from transformers import CLIPTokenizer

    reference = _open_clip_tokenizer()
    for name, data in tokenizer_files("<|endoftext|>").items():
        (tmp_path / name).write_bytes(data)
    ours = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert len(ours) == 49408 and ours.bos_token_id == 49406 and ours.eos_token_id == 49407
    # OpenCLIP 3 spells the two special tokens <start_of_text>/<end_of_text>; CLIP and the Hub, <|startoftext|>
    specials = {"<|startoftext|>": 49406, "<|endoftext|>": 49407}
    assert {k: v for k, v in ours.get_vocab().items() if k not in specials} == {
        k: v for k, v in reference.encoder.items() if v < 49406}
    assert {k: ours.get_vocab()[k] for k in specials} == specials
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    assert {tuple(m.split()): rank for rank, m in enumerate(merges)} == reference.bpe_ranks
    for text in TEXTS + [" ".join(TEXTS) * 3]:
        assert ours(text, add_special_tokens=False)["input_ids"] == reference.encode(text), text


def test_openclip_tokenizer_differs_only_in_its_pad_token(tmp_path) -> None:
    from transformers import CLIPTokenizer

    for pad in ("<|endoftext|>", "!"):
        folder = tmp_path / pad.strip("<|>")
        folder.mkdir()
        for name, data in tokenizer_files(pad).items():
            (folder / name).write_bytes(data)
    a, b = (CLIPTokenizer.from_pretrained(str(tmp_path / n)) for n in ("endoftext", "!"))
    assert (a.pad_token_id, b.pad_token_id) == (49407, 0)
    x = a(TEXTS[0], padding="max_length", max_length=77)["input_ids"]
    y = b(TEXTS[0], padding="max_length", max_length=77)["input_ids"]
    n = len(a(TEXTS[0])["input_ids"])
    assert x[:n] == y[:n] and set(x[n:]) == {49407} and set(y[n:]) == {0}


def test_tokenizer_files_are_package_data() -> None:
    data = resources.files("sdport") / "data" / "clip"
    assert (data / "vocab.json").is_file() and (data / "merges.txt").read_text().startswith("#version: 0.2\n")
