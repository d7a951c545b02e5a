"""The chat base model's de-quantized copy (``llm.write_base_cache`` / ``load_base``).

The copy must give the same model and tokenizer as the GGUF file (same token ids for a chat
prompt, bit-identical logits), ``load_base`` must use it only while it matches the installed
GGUF file, and a copy that failed half-way must leave nothing a replica would read.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from patterns.multiplexing import llm

MESSAGES = [{"role": "user", "content": "What is 2 + 2? Answer briefly, s'il vous plaît ✓"}]


@pytest.fixture(scope="module")
def from_gguf(tmp_path_factory: pytest.TempPathFactory):
    """The model and tokenizer read from the GGUF file itself (no copy anywhere)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("COOKBOOK_LLM_CACHE", str(tmp_path_factory.mktemp("none") / "absent"))
    try:
        model, tokenizer = llm.load_base("cpu", torch_threads=2)
    finally:
        mp.undo()
    assert getattr(model, "hf_quantizer", None) is not None  # really the GGUF path
    return model, tokenizer


def _logits(model, tokenizer):
    import torch

    ids = llm.chat_ids(tokenizer, MESSAGES)
    with torch.no_grad():
        return ids, model(torch.tensor([ids])).logits


@pytest.mark.slow
def test_the_copy_is_the_gguf_model_and_is_used_only_while_it_matches(
    from_gguf, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = from_gguf
    folder = llm.write_base_cache(model, tokenizer, tmp_path / "copy")
    assert llm.base_cache_matches(folder)
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]  # no temporary folder left
    # the GGUF model can still be used and saved after the copy (its marker restored)
    assert model.hf_quantizer is not None and model.config.quantization_config is not None

    monkeypatch.setenv("COOKBOOK_LLM_CACHE", str(folder))
    cached, cached_tokenizer = llm.load_base("cpu", torch_threads=2)
    assert getattr(cached, "hf_quantizer", None) is None  # read from the copy
    ids, expected = _logits(model, tokenizer)
    cached_ids, got = _logits(cached, cached_tokenizer)
    assert cached_ids == ids
    assert float((got - expected).abs().max()) == 0.0
    assert cached_tokenizer.pad_token_id == tokenizer.pad_token_id
    assert cached.generation_config.eos_token_id == model.generation_config.eos_token_id

    # a copy of another GGUF file (another package version) is not used
    stamp = json.loads((folder / "source.json").read_text())
    (folder / "source.json").write_text(json.dumps({**stamp, "bytes": stamp["bytes"] + 1}))
    assert not llm.base_cache_matches(folder)  # (load_base reads the GGUF file then)


def test_a_copy_that_fails_half_way_leaves_nothing(tmp_path: Path) -> None:
    class Tokenizer:
        def save_pretrained(self, folder: Path) -> None:
            raise OSError("disk full")

    class Model:
        config = SimpleNamespace()
        hf_quantizer = "gguf"

        def save_pretrained(self, folder: Path) -> None:
            (Path(folder) / "model.safetensors").write_bytes(b"weights")

    folder = tmp_path / "copy"
    with pytest.raises(OSError, match="disk full"):
        llm.write_base_cache(Model(), Tokenizer(), folder)
    assert list(tmp_path.iterdir()) == []
    assert not llm.base_cache_matches(folder)


def test_no_stamp_or_a_broken_stamp_is_no_copy(tmp_path: Path) -> None:
    assert not llm.base_cache_matches(tmp_path)
    (tmp_path / "source.json").write_text("{not json")
    assert not llm.base_cache_matches(tmp_path)
