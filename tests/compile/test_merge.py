"""compile merge: the merged checkpoint computes the adapter model's logits (fp32, max |diff| ≤ 1e-4),
and ranker.json carries what serving needs."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")


def test_merged_logits_equal_adapter_logits(tiny_llm_bundle):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    llm = tiny_llm_bundle / "llm"
    row = json.loads((llm / "sft" / "valid.jsonl").read_text().splitlines()[-1])
    ids = torch.tensor([row["input_ids"]])  # [1, T]
    base = AutoModelForCausalLM.from_pretrained(llm / "base", dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits  # [1, T, V]
        adapter_logits = PeftModel.from_pretrained(base, llm / "lora").eval()(input_ids=ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(llm / "merged", dtype=torch.float32).eval()(
            input_ids=ids).logits
    assert float((adapter_logits - base_logits).abs().max()) > 1e-3, "the adapter must change the model"
    assert float((merged_logits - adapter_logits).abs().max()) <= 1e-4
    manifest = json.loads((tiny_llm_bundle / "manifest.json").read_text())
    assert manifest["artifacts"]["llm_merged"]["merge_max_abs_diff"] <= 1e-4


def test_ranker_json_describes_prompt_labels_fusion_and_generate_format(tiny_llm_bundle):
    from transformers import AutoTokenizer

    ranker = json.loads((tiny_llm_bundle / "llm" / "ranker.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_bundle / "llm" / "merged")
    k = ranker["candidates"]
    assert len(ranker["labels"]) == len(ranker["label_token_ids"]) == k
    for text, token in zip(ranker["labels"], ranker["label_token_ids"]):
        assert tokenizer.encode(text, add_special_tokens=False) == [token]
    assert ranker["generate_format"] in ("titles", "labels") and 1 <= ranker["generate_k"] <= k
    curve = ranker["fusion_validation"]["ndcg@10_by_weight"]  # {weight: validation NDCG@10}
    assert curve[str(ranker["fusion_weight"])] == max(curve.values()), "the best validation weight was kept"
