"""compile base-model with --base-model DIR: one code path, the checkpoint linked (not copied) or
copied on request, a non-causal-LM directory refused; the logits check catches a broken conversion.
(The GGUF conversion itself runs in the slow end-to-end test.)"""

from __future__ import annotations

import json
import shutil

import pytest

import torch  # noqa: E402 - a declared dependency: missing is a failure, not a skip

from compile.base_model import BaseModelConfig, max_logit_difference, run  # noqa: E402


def test_base_model_dir_is_linked_not_copied(tiny_llama_dir, tmp_path):
    out = run(BaseModelConfig(bundle=tmp_path / "b", base_model=tiny_llama_dir))
    weights = out / "model.safetensors"
    assert weights.is_symlink() and weights.resolve() == (tiny_llama_dir / "model.safetensors").resolve()
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["artifacts"]["llm_base"]["linked"] is True
    assert run(BaseModelConfig(bundle=tmp_path / "b", base_model=tiny_llama_dir)) == out  # unchanged: skipped
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["steps"] == manifest["steps"]

    copied = run(BaseModelConfig(bundle=tmp_path / "c", base_model=tiny_llama_dir, copy=True))
    assert not (copied / "model.safetensors").is_symlink()
    assert (copied / "model.safetensors").read_bytes() == weights.read_bytes()


def test_a_directory_without_a_causal_lm_is_refused(tiny_llama_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["LlamaModel"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="causal LM"):
        run(BaseModelConfig(bundle=tmp_path / "b", base_model=bad))
    with pytest.raises(FileNotFoundError, match="config.json"):
        run(BaseModelConfig(bundle=tmp_path / "b", base_model=tmp_path))


def test_a_refused_base_model_leaves_the_bundles_base_as_it_was(tiny_llama_dir, tmp_path):
    """The bundle's llm/base was deleted before the new --base-model was checked: refused, it left the bundle
    without the base model its manifest still named (and a later --force finetune failed on it)."""
    from palr.bundle import Bundle

    out = run(BaseModelConfig(bundle=tmp_path / "b", base_model=tiny_llama_dir))
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(config | {"architectures": ["LlamaModel"]}))
    with pytest.raises(ValueError, match="causal LM"):
        run(BaseModelConfig(bundle=tmp_path / "b", base_model=bad, force=True))
    Bundle.open(tmp_path / "b").verify(["llm_base"])
    assert (out / "model.safetensors").resolve() == (tiny_llama_dir / "model.safetensors").resolve()
    assert [p.name for p in out.parent.iterdir()] == ["base"], "nothing half-made left beside it"


def test_logit_check_is_zero_for_a_faithful_copy_and_not_for_a_changed_one(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    a = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    assert max_logit_difference(a, b, tokenizer) == 0.0
    with torch.no_grad():
        b.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    assert max_logit_difference(a, b, tokenizer) > 1e-4


def test_a_missing_gguf_is_refused_without_leaving_an_empty_bundle_behind(tmp_path):
    """The bundle folder was made before the GGUF was looked for; later steps then said "no manifest.json"."""
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        run(BaseModelConfig(bundle=tmp_path / "new-bundle", gguf=tmp_path / "missing.gguf"))
    assert not (tmp_path / "new-bundle").exists()
