"""compile merge: the merged checkpoint computes the adapter model's logits (fp32, max |diff| ≤ 1e-4),
and ranker.json carries what serving needs."""

from __future__ import annotations

import json

import pytest

import torch  # noqa: E402 - a declared dependency: missing is a failure, not a skip


def test_merged_logits_equal_adapter_logits(tiny_llm_bundle):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    llm = tiny_llm_bundle / "llm"
    row = json.loads((llm / "sft" / "valid.jsonl").read_text().splitlines()[-1])
    ids = torch.tensor([row["input_ids"]])  # [1, T]
    from palr.hybrid import WEIGHTS, input_embeddings, load_projector
    from palr.llm import keep_first_layers

    manifest = json.loads((tiny_llm_bundle / "manifest.json").read_text())
    base = keep_first_layers(AutoModelForCausalLM.from_pretrained(llm / "base", dtype=torch.float32).eval(),
                             int(manifest["artifacts"]["lora"].get("layers") or 0))
    vocab = base.get_input_embeddings().num_embeddings
    # hybrid prompts: the adapter model sees the projected item embeddings, the merged one has them folded in
    projector = load_projector(llm / "lora", base.config.hidden_size) if (llm / "lora" / WEIGHTS).is_file() else None
    with torch.no_grad():
        embeds = input_embeddings(base, ids, projector() if projector is not None else None)
        base_logits = base(inputs_embeds=embeds).logits  # [1, T, V]
        adapter_logits = PeftModel.from_pretrained(base, llm / "lora").eval()(inputs_embeds=embeds).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(llm / "merged", dtype=torch.float32).eval()(
            input_ids=ids).logits[..., :vocab]
    assert float((adapter_logits - base_logits).abs().max()) > 1e-3, "the adapter must change the model"
    assert float((merged_logits - adapter_logits).abs().max()) <= 1e-4
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
    generate = ranker["fusion_validation"]["generate_first_step_ndcg@10_by_logit_weight"]
    assert generate[str(ranker["generate_logit_weight"])] == max(generate.values())
    assert ranker["trend"] == {"window_days": 30.0, "buckets": 8} and len(ranker["trend_bias"]) == 8
    assert len(ranker["retrieval_trend_weights"]) == 8  # the retrieval term's, fit on the training examples
    assert ranker["prompt"]["readout"] == "candidate" and ranker["item_tokens"]["score_token"] > ranker["item_tokens"]["offset"]


def test_retrieval_term_weights_are_the_listwise_fit_on_the_training_examples(tiny_llm_bundle):
    from compile.merge import fit_retrieval_term_weights

    ranker = json.loads((tiny_llm_bundle / "llm" / "ranker.json").read_text())
    train = [json.loads(x) for x in (tiny_llm_bundle / "llm" / "sft" / "train.jsonl").read_text().splitlines()]
    weights, collab_weight = fit_retrieval_term_weights(train, 8)
    assert weights == pytest.approx(ranker["retrieval_trend_weights"], abs=1e-5)
    assert collab_weight == pytest.approx(ranker["retrieval_collab_weight"], abs=1e-5) and collab_weight != 0
    assert fit_retrieval_term_weights([{**x, "trend": None, "collab": None} for x in train], 8) == (None, None)
    only_collab = fit_retrieval_term_weights([{**x, "trend": None} for x in train], 8)  # EASE alone: no buckets
    assert only_collab[0] is None and only_collab[1] is not None


def test_generate_logit_weight_is_the_one_whose_first_step_orders_validation_best():
    """Two candidates, retrieval slightly prefers the first; the label logits prefer the second. Where the
    second is the target they win a weight > 0; where the first is, generate mode keeps the fused order
    (weight 0)."""
    from compile.merge import fit_generate_logit_weight

    reads = [([0.0, 0.0], [0.0, 3.0])]  # (readout logits, label logits) per user
    scores, biases = [[1.0, 0.9]], [None]
    weight, curve = fit_generate_logit_weight(reads, scores, biases, [1], 1.0)
    assert weight == 1.0 and curve[0.0] < curve[1.0]
    weight, curve = fit_generate_logit_weight(reads, scores, biases, [0], 1.0)
    assert weight == 0.0 and curve[0.0] > curve[1.0]


def test_generate_decodes_only_for_a_validation_gain_beyond_noise():
    """A weight > 0 costs every generate request its decode passes: a gain under GENERATE_DECODE_MIN_GAIN over
    weight 0 keeps 0 (no decode pass), a larger one is kept."""
    from compile.merge import GENERATE_DECODE_MIN_GAIN, fit_generate_logit_weight

    # 200 users whose target the fused order ranks 2nd, 1st or 3rd; the label logits move one user's target up
    reads = [([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])] * 199 + [([0.0, 0.0, 0.0], [0.0, 3.0, 0.0])]
    scores, biases = [[1.0, 0.9, 0.8]] * 200, [None] * 200
    targets = [1] * 200
    weight, curve = fit_generate_logit_weight(reads, scores, biases, targets, 1.0)
    assert curve[1.0] > curve[0.0] and curve[1.0] < curve[0.0] * (1 + GENERATE_DECODE_MIN_GAIN)
    assert weight == 0.0
    reads = [([0.0, 0.0, 0.0], [0.0, 3.0, 0.0])] * 200  # now the logits move every user's target up
    weight, curve = fit_generate_logit_weight(reads, scores, biases, targets, 1.0)
    assert weight > 0 and curve[weight] >= curve[0.0] * (1 + GENERATE_DECODE_MIN_GAIN)


def test_a_changed_fit_rule_refits_an_existing_bundle(tiny_llm_bundle, tmp_path, monkeypatch, caplog):
    """The fits' code-level choices are part of merge's fingerprint: an unchanged bundle skips merge, and the
    same bundle after a change of GENERATE_DECODE_MIN_GAIN is merged and fit again (not served stale)."""
    from compile import merge
    from compile.presets import preset_for
    from palr.bundle import Bundle
    from tests.fixtures.builds import copy_bundle

    bundle = copy_bundle(tiny_llm_bundle, tmp_path / "bundle")
    config = merge.MergeConfig(bundle=bundle, **preset_for("tiny", "merge"))
    with caplog.at_level("INFO", logger="compile.merge"):
        merge.run(config)
    assert "merged model is current" in caplog.text
    before = Bundle.open(bundle).manifest.steps["merge"]["fingerprint"]
    caplog.clear()
    monkeypatch.setattr(merge, "GENERATE_DECODE_MIN_GAIN", merge.GENERATE_DECODE_MIN_GAIN * 2)
    with caplog.at_level("INFO", logger="compile.merge"):
        merge.run(config)
    assert "merged model is current" not in caplog.text
    assert Bundle.open(bundle).manifest.steps["merge"]["fingerprint"] != before


def test_a_generate_k_over_the_candidates_is_refused_before_the_merged_model_is_touched(tiny_llm_bundle, tmp_path):
    """It was refused after the merge had rewritten llm/merged (and the fusion fit), leaving new weights under
    the manifest's old checksums: the ranking server then refused the bundle."""
    import dataclasses

    from compile import merge
    from compile.presets import preset_for
    from palr.bundle import Bundle
    from tests.fixtures.builds import copy_bundle

    bundle = copy_bundle(tiny_llm_bundle, tmp_path / "bundle")
    k = json.loads((bundle / "llm" / "ranker.json").read_text())["candidates"]
    config = merge.MergeConfig(bundle=bundle, **preset_for("tiny", "merge"))
    written = {p: p.stat().st_mtime_ns for p in (bundle / "llm" / "merged").rglob("*")}
    with pytest.raises(ValueError, match="--generate-k"):
        merge.run(dataclasses.replace(config, generate_k=k + 1, force=True))
    assert {p: p.stat().st_mtime_ns for p in (bundle / "llm" / "merged").rglob("*")} == written  # not rewritten
    Bundle.open(bundle).verify(["llm_merged", "ranker"])
    with pytest.raises(ValueError, match="--fusion-users"):
        merge.MergeConfig(bundle=bundle, fusion_users=-1)


def test_a_merge_stopped_during_the_fit_leaves_the_merged_model_the_manifest_names(tiny_llm_bundle, tmp_path,
                                                                                    monkeypatch):
    """The merge wrote llm/merged, then fit the fusion over it for minutes: stopped there, the new weights sat under
    the manifest's old checksums, and a build made an engine of them under the old version."""
    import dataclasses

    from safetensors.torch import load_file, save_file

    from compile import merge
    from compile.presets import preset_for
    from palr.bundle import Bundle
    from tests.fixtures.builds import copy_bundle

    bundle = copy_bundle(tiny_llm_bundle, tmp_path / "bundle")
    config = merge.MergeConfig(bundle=bundle, **preset_for("tiny", "merge"))
    written = {p: p.read_bytes() for p in (bundle / "llm" / "merged").rglob("*") if p.is_file()}
    adapter = bundle / "llm" / "lora" / "adapter_model.safetensors"  # retrained, as far as the merge can tell
    save_file({name: 2 * tensor for name, tensor in load_file(adapter).items()}, adapter)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(merge, "fit_fusion", stopped)
    with pytest.raises(KeyboardInterrupt):
        merge.run(dataclasses.replace(config, tolerance=1.0, force=True))
    assert {p: p.read_bytes() for p in (bundle / "llm" / "merged").rglob("*") if p.is_file()} == written
    assert not list((bundle / "llm").glob(".merged*")), "no partial merge left beside it"
    Bundle.open(bundle).verify(["llm_merged", "ranker"])


def test_an_adapter_trained_on_other_sft_data_is_refused_before_the_merged_model_is_touched(tiny_llm_bundle,
                                                                                           tmp_path, ml100k_dir):
    """sft-data run again (here with fewer candidates) after finetune: merge would pair the old adapter's weights
    and item rows with the new data's candidate count and fits, and nothing refused it."""
    from compile import merge, sft_data
    from compile.presets import preset_for
    from tests.fixtures.builds import copy_bundle

    bundle = copy_bundle(tiny_llm_bundle, tmp_path / "bundle")
    sft_data.run(sft_data.SftDataConfig(bundle=bundle, data=ml100k_dir, **preset_for("tiny", "sft-data"),
                                        candidates=19))
    written = {p: p.stat().st_mtime_ns for p in (bundle / "llm" / "merged").rglob("*")}
    with pytest.raises(ValueError, match=r"trained on sft_data version \w+, and the bundle's sft_data is now"):
        merge.run(merge.MergeConfig(bundle=bundle, **preset_for("tiny", "merge")))
    assert {p: p.stat().st_mtime_ns for p in (bundle / "llm" / "merged").rglob("*")} == written


def test_sft_data_left_part_written_is_refused_by_finetune_and_merge(tiny_llm_bundle, tmp_path):
    """An sft-data run stopped between its files (valid.jsonl rewritten, the manifest not yet): finetune and
    merge read the files under the old version's fingerprint and trained or fitted on a mix."""
    from compile import finetune, merge
    from compile.presets import preset_for
    from compile.steps import StepFailed
    from tests.fixtures.builds import copy_bundle

    bundle = copy_bundle(tiny_llm_bundle, tmp_path / "bundle")
    valid = bundle / "llm" / "sft" / "valid.jsonl"
    valid.write_text("".join(valid.read_text().splitlines(keepends=True)[:-1]))  # a shorter rewrite
    with pytest.raises(StepFailed, match="the SFT data is not what sft-data wrote"):
        finetune.run(finetune.FinetuneConfig(bundle=bundle, **preset_for("tiny", "finetune"), force=True))
    with pytest.raises(StepFailed, match="the SFT data is not what sft-data wrote"):
        merge.run(merge.MergeConfig(bundle=bundle, **preset_for("tiny", "merge"), force=True))
