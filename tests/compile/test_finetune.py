"""compile finetune on the tiny random Llama: the loss is the answer tokens' cross-entropy whatever the
padding, it goes down when training, and a run resumed from a checkpoint ends exactly where an
uninterrupted run does."""

from __future__ import annotations

import json
import shutil

import pytest

import torch  # noqa: E402 - a declared dependency: missing is a failure, not a skip

from compile.finetune import FinetuneConfig, answer_loss, collate, load_examples, run  # noqa: E402
from palr.bundle import Bundle  # noqa: E402


@pytest.fixture
def bundle_copy(tiny_llm_bundle, tmp_path):
    """A writable copy of the tiny bundle without its adapter and checkpoints."""
    out = tmp_path / "bundle"
    shutil.copytree(tiny_llm_bundle, out, symlinks=True)
    for name in ("checkpoints", "lora"):
        shutil.rmtree(out / "llm" / name, ignore_errors=True)
    return out


def test_answer_loss_equals_per_example_cross_entropy(tiny_llm_bundle):
    from transformers import AutoModelForCausalLM

    from palr.hybrid import WEIGHTS, input_embeddings, load_projector

    model = AutoModelForCausalLM.from_pretrained(tiny_llm_bundle / "llm" / "base", dtype=torch.float32).eval()
    rows = load_examples(tiny_llm_bundle / "llm" / "sft" / "train.jsonl", 4096)
    rows = sorted(rows, key=lambda r: len(r[0]) + len(r[1]))[:1] + rows[-2:]  # different lengths and answers
    lora = tiny_llm_bundle / "llm" / "lora"  # hybrid prompts: soft tokens through the trained projector
    items = load_projector(lora, model.config.hidden_size)() if (lora / WEIGHTS).is_file() else None
    with torch.no_grad():
        batched = float(answer_loss(model, collate(rows, pad_id=0), items))
        token_losses = []
        for prompt, answer in rows:
            embeds = input_embeddings(model, torch.tensor([prompt + answer[:-1]]), items)
            logits = model(inputs_embeds=embeds).logits[0, -len(answer):]  # [A, V]
            token_losses += torch.nn.functional.cross_entropy(logits, torch.tensor(answer), reduction="none").tolist()
    assert batched == pytest.approx(sum(token_losses) / len(token_losses), abs=1e-4)


def test_loss_goes_down_on_a_tiny_run(bundle_copy):
    """Four examples, one batch: the loss must fall. (The tiny random Llama's logits span only about
    ±1.3, so its cross-entropy cannot fall far below ln(vocab) ≈ 10.8; 0.1 is a clear drop.)"""
    train = bundle_copy / "llm" / "sft" / "train.jsonl"
    ranked = [line for line in train.read_text().splitlines(keepends=True)
              if json.loads(line).get("target_position") is not None]  # what the listwise loss trains on
    train.write_text("".join(ranked[:4]))
    bundle = Bundle.open(bundle_copy)  # the smaller data set, recorded as sft-data would (finetune checks its files)
    entry = bundle.artifact("sft_data")
    bundle.add_artifact("sft_data", entry["path"], **{k: v for k, v in entry.items()
                                                      if k not in ("path", "sha256", "files", "created_at")})
    bundle.save()
    run(FinetuneConfig(bundle=bundle_copy, max_steps=12, batch_size=4, lr=2e-2, warmup_steps=0, save_every=0,
                       force=True, rank=16, alpha=32))
    losses = json.loads((bundle_copy / "llm" / "lora" / "training.json").read_text())["losses"]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1


def test_resume_continues_exactly_from_the_checkpoint_whatever_its_checkpoint_cadence(bundle_copy, tmp_path,
                                                                                      caplog):
    from safetensors.torch import load_file

    other = tmp_path / "other"
    shutil.copytree(bundle_copy, other, symlinks=True)
    settings = dict(max_steps=4, batch_size=4, lr=1e-2, save_every=2, seed=3)

    run(FinetuneConfig(bundle=bundle_copy, force=True, **settings))  # uninterrupted
    run(FinetuneConfig(bundle=other, force=True, stop_after=2, **settings))  # leaves after 2 steps
    assert not (other / "llm" / "lora").exists(), "no adapter before the run is complete"
    assert [c.name for c in (other / "llm" / "checkpoints").glob("*/step-*")] == ["step-000002"]
    with caplog.at_level("INFO", logger="compile.finetune"):
        run(FinetuneConfig(bundle=other, **(settings | {"save_every": 1})))  # resumes at step 2, saves more often
    assert "resuming from" in caplog.text and "(step 2 of 4)" in caplog.text

    done = [json.loads((b / "llm" / "lora" / "training.json").read_text()) for b in (bundle_copy, other)]
    assert done[0]["losses"] == done[1]["losses"] and len(done[0]["losses"]) == 4
    a, b = (load_file(x / "llm" / "lora" / "adapter_model.safetensors") for x in (bundle_copy, other))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    versions = {Bundle.open(b).version("lora") for b in (bundle_copy, other)}
    assert len(versions) == 1, "the same adapter trained twice is the same artifact version (no timings in it)"
    config = json.loads((other / "llm" / "lora" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(config["target_modules"]), "not in hash order (PYTHONHASHSEED)"


def test_a_run_begun_under_the_earlier_fingerprint_resumes_after_the_upgrade(bundle_copy, caplog):
    """The fingerprint stopped counting --save-every (stop 33): a run paused under the earlier one still resumes
    from its checkpoint instead of starting over (and a finished one is still current)."""
    from compile.finetune import _fingerprint, train
    from palr.bundle import Bundle

    settings = dict(max_steps=4, batch_size=4, save_every=2, seed=3)
    paused = FinetuneConfig(bundle=bundle_copy, stop_after=2, **settings)
    bundle = Bundle.open(bundle_copy)
    train(bundle, paused, _fingerprint(bundle, paused, ("stop_after", "threads")))  # as the earlier code ran it
    with caplog.at_level("INFO", logger="compile.finetune"):
        run(FinetuneConfig(bundle=bundle_copy, **settings))
    assert "resuming from" in caplog.text and "(step 2 of 4)" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="compile.finetune"):
        run(FinetuneConfig(bundle=bundle_copy, **settings))
    assert "LoRA adapter is current" in caplog.text


def test_a_run_with_other_inputs_resumes_from_its_own_checkpoint_not_an_earlier_runs(bundle_copy, caplog):
    """A finished run left step-000004; an interrupted run with other inputs then saw each of its checkpoints
    rotated away as "older" right after writing it (a projector-only folder was left in its place), and its rerun
    crashed on that folder instead of resuming."""
    settings = dict(max_steps=4, batch_size=4, save_every=2, seed=3)
    run(FinetuneConfig(bundle=bundle_copy, force=True, lr=1e-2, **settings))  # leaves step-000004
    run(FinetuneConfig(bundle=bundle_copy, lr=2e-2, stop_after=2, **settings))  # other inputs, stops after step 2
    with caplog.at_level("INFO", logger="compile.finetune"):
        run(FinetuneConfig(bundle=bundle_copy, lr=2e-2, **settings))
    assert "resuming from" in caplog.text and "(step 2 of 4)" in caplog.text
    done = json.loads((bundle_copy / "llm" / "lora" / "training.json").read_text())
    assert len(done["losses"]) == 4


def test_a_run_paused_for_one_with_other_options_still_resumes_when_rerun_with_its_own(bundle_copy, caplog):
    """Training in pieces (--stop-after), then trying other options from scratch: the paused run's checkpoint was
    deleted with every other run's, and rerunning its options started over."""
    settings = dict(max_steps=4, batch_size=4, save_every=2, seed=3)
    run(FinetuneConfig(bundle=bundle_copy, force=True, lr=1e-2, stop_after=2, **settings))  # paused at step 2
    with caplog.at_level("INFO", logger="compile.finetune"):
        run(FinetuneConfig(bundle=bundle_copy, lr=2e-2, **settings))  # other inputs, a fresh start, finished
    assert "kept the checkpoints of 1 other run(s)" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="compile.finetune"):
        run(FinetuneConfig(bundle=bundle_copy, lr=1e-2, **settings))
    assert "resuming from" in caplog.text and "(step 2 of 4)" in caplog.text


@pytest.mark.parametrize("flag, value, message", [
    ("max_steps", -1, "--max-steps must be >= 0"), ("batch_size", 0, "--batch-size must be >= 1"),
    ("layers", -1, "--layers must be >= 0"), ("epochs", 0.0, "--epochs must be a finite number > 0"),
    ("lr", float("nan"), "--lr must be a finite number > 0"), ("dropout", 1.0, "--dropout must be in"),
])
def test_an_option_that_would_train_nothing_or_lose_the_adapter_is_refused_before_anything_is_touched(
        bundle_copy, flag, value, message):
    """--max-steps -1 replaced the adapter with an untrained one, --batch-size 0 deleted the checkpoints and then
    crashed, --layers -1 saved a model with no decoder layers: refused by the config, the bundle left as it was."""
    before = (bundle_copy / "manifest.json").read_text()
    with pytest.raises(ValueError, match=message):
        run(FinetuneConfig(bundle=bundle_copy, **{flag: value}))
    assert (bundle_copy / "manifest.json").read_text() == before


def test_merge_refuses_an_earlier_adapter_while_a_run_with_other_options_is_unfinished(bundle_copy):
    """The earlier run's adapter matches the bundle's SFT data and base model, so merge took it for the stopped
    run's; the bundle now stops naming it until the new run finishes."""
    from compile import merge
    from palr.bundle import Bundle

    settings = dict(max_steps=4, batch_size=4, save_every=2, seed=3)
    run(FinetuneConfig(bundle=bundle_copy, force=True, lr=1e-2, **settings))
    assert Bundle.open(bundle_copy).has("lora")
    assert run(FinetuneConfig(bundle=bundle_copy, lr=2e-2, stop_after=2, **settings)) is None
    assert not Bundle.open(bundle_copy).has("lora")
    with pytest.raises(ValueError, match="no finished LoRA adapter to merge"):
        merge.run(merge.MergeConfig(bundle=bundle_copy))
    run(FinetuneConfig(bundle=bundle_copy, lr=2e-2, **settings))  # finished: the bundle's adapter again
    assert Bundle.open(bundle_copy).has("lora")


def test_a_crashed_run_sets_the_adapter_aside_and_going_back_takes_it_again(bundle_copy, monkeypatch, caplog):
    """A run with other options that crashes (killed, out of memory) leaves the earlier adapter's files but not its
    name: merge refuses; the earlier options again find that adapter finished and take it back without training."""
    import compile.finetune
    from palr.bundle import Bundle

    settings = dict(max_steps=4, batch_size=4, save_every=2, seed=3)
    run(FinetuneConfig(bundle=bundle_copy, force=True, lr=1e-2, **settings))
    trained = (bundle_copy / "llm" / "lora" / "training.json").read_text()

    def crash(*args, **kwargs):
        raise MemoryError("killed mid-run")

    with monkeypatch.context() as patched:
        patched.setattr(compile.finetune, "train", crash)
        with pytest.raises(MemoryError):
            run(FinetuneConfig(bundle=bundle_copy, lr=2e-2, **settings))
    assert not Bundle.open(bundle_copy).has("lora")
    with caplog.at_level("INFO", logger="compile.finetune"):
        run(FinetuneConfig(bundle=bundle_copy, lr=1e-2, **settings))
    assert "is this run's, finished" in caplog.text and "resuming" not in caplog.text
    assert Bundle.open(bundle_copy).has("lora")
    assert (bundle_copy / "llm" / "lora" / "training.json").read_text() == trained


def test_a_run_killed_after_a_new_best_resumes_with_the_best_its_checkpoint_names(bundle_copy, monkeypatch):
    """Killed after saving step 3 as its best but before step 4's checkpoint, the run resumes from step 2's checkpoint,
    which names step 2 as the best. If the replayed steps validate lower (a GPU's kernels need not replay exactly),
    step 2 stays the best, and the kept adapter is step 2's, not step 3's (one `best/`, overwritten at step 3, kept
    it under step 2's name)."""
    import compile.finetune
    from safetensors.torch import load_file

    settings = dict(max_steps=4, batch_size=4, save_every=2, eval_every=1, valid_examples=1, seed=3, lr=1e-2)
    first_scores = iter([0.1, 0.2, 0.3])  # step 4's evaluation finds none: the run is killed there

    def killed_at_step_4(*args, **kwargs):
        try:
            return next(first_scores)
        except StopIteration:
            raise KeyboardInterrupt("killed") from None

    monkeypatch.setattr(compile.finetune, "validation_ndcg", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(FinetuneConfig(bundle=bundle_copy, force=True, **settings))
    checkpoint = next((bundle_copy / "llm" / "checkpoints").glob("*/step-000002"))
    step_2 = load_file(checkpoint / "adapter_model.safetensors")

    monkeypatch.setattr(compile.finetune, "validation_ndcg", lambda *args, **kwargs: 0.15)  # the replay: lower
    run(FinetuneConfig(bundle=bundle_copy, **settings))
    kept = load_file(bundle_copy / "llm" / "lora" / "adapter_model.safetensors")
    assert json.loads((bundle_copy / "llm" / "lora" / "training.json").read_text())["best_step"] == 2
    assert kept.keys() == step_2.keys() and all(torch.equal(kept[name], step_2[name]) for name in kept)
    assert [p.name for p in checkpoint.parent.glob("best-*")] == ["best-000002"], "bests no resume needs are gone"


@pytest.mark.parametrize("readout", ["label", "candidate"])
def test_listwise_loss_is_the_cross_entropy_of_the_target_over_fused_readouts(tiny_llama_dir, readout):
    """readout_scores = each label's LM-head row at the prompt's last position (label readout), or the score
    row at each candidate's own position, soft, trend and rank tokens embedded by the extra rows (candidate
    readout); by hand: one prompt at a time, full hidden states. The loss = -log softmax(readout +
    trend_bias[trend] + Σ_r rank_bias[r, rank bucket] + w · log_softmax(retrieval scores))[target]."""
    import math
    import random

    from transformers import AutoModelForCausalLM

    from compile.finetune import fused_scores, listwise_loss, readout_scores
    from palr.hybrid import extra_rows, input_embeddings
    from palr.ranking import RANK_BUCKETS

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    torch.manual_seed(0)
    extra = extra_rows(torch.randn(6, 64), model.config.hidden_size, 3, rank_rows=2 * RANK_BUCKETS)
    with torch.no_grad():
        extra.score.normal_()
        extra.rank.normal_()
        extra.trend_bias.copy_(torch.tensor([-1.0, 0.25, 0.5]))
        extra.rank_bias.normal_()
    rng = random.Random(0)
    labels = list(range(330, 335))
    rows = []
    for n in (9, 17, 12):  # different lengths: padding
        ids = [rng.choice([rng.randrange(100, 40000), vocab + rng.randrange(1, 6 + 3 + 2 * RANK_BUCKETS)])
               for _ in range(n)]
        row = {"input_ids": ids, "label_token_ids": labels, "target_position": rng.randrange(len(labels)),
               "retrieval_scores": sorted((rng.uniform(-2, 5) for _ in labels), reverse=True)}
        if readout == "candidate":
            row |= {"readout_positions": sorted(rng.sample(range(n), len(labels))),
                    "readout_tokens": [vocab + 6 + 3 + 2 * RANK_BUCKETS] * len(labels),
                    "trend": [rng.randrange(3) for _ in labels],
                    "ranks": [[rng.randrange(RANK_BUCKETS), rng.randrange(RANK_BUCKETS)] for _ in labels]}
        rows.append(row)
    with torch.no_grad():
        scores, _ = readout_scores(model, rows, pad_id=0, extra=extra)
        loss = float(listwise_loss(fused_scores(scores, rows, 0.7, extra), rows))
    by_hand = []
    for i, row in enumerate(rows):
        with torch.no_grad():
            hidden = model.model(inputs_embeds=input_embeddings(model, torch.tensor([row["input_ids"]]),
                                                                extra())).last_hidden_state[0]  # [T, D]
            if readout == "label":
                read = [float(x) for x in model.lm_head(hidden[-1])[labels]]
                bias = [0.0] * len(labels)
            else:
                read = [float(hidden[p] @ extra.score) for p in row["readout_positions"]]
                bias = [float(extra.trend_bias[b] + extra.rank_bias[r0] + extra.rank_bias[RANK_BUCKETS + r1])
                        for b, (r0, r1) in zip(row["trend"], row["ranks"])]
        assert scores[i].tolist() == pytest.approx(read, abs=1e-4)
        retrieval = row["retrieval_scores"]
        log_norm = max(retrieval) + math.log(sum(math.exp(s - max(retrieval)) for s in retrieval))
        fused = [x + b + 0.7 * (s - log_norm) for x, b, s in zip(read, bias, retrieval)]
        top = max(fused)
        by_hand.append(-(fused[row["target_position"]] - top - math.log(sum(math.exp(f - top) for f in fused))))
    assert loss == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-4)


def test_with_retrieval_prior_gives_the_rows_the_term_merge_fuses_with(tiny_llm_bundle):
    """Training fuses with the retrieval term serving uses: the weights merge wrote to ranker.json."""
    from compile.finetune import with_retrieval_prior
    from palr.ranking import retrieval_prior

    ranker = json.loads((tiny_llm_bundle / "llm" / "ranker.json").read_text())
    weights, collab_weight = ranker["retrieval_trend_weights"], ranker["retrieval_collab_weight"]
    train = [json.loads(x) for x in (tiny_llm_bundle / "llm" / "sft" / "train.jsonl").read_text().splitlines()]
    ranked = [r for r in train if r.get("retrieval_scores")]
    (rows,) = with_retrieval_prior(train, 8, ranked)
    assert weights is not None and collab_weight is not None and len(rows) == len(ranked)
    for before, after in zip(ranked, rows):
        assert after["retrieval_scores"] == pytest.approx(retrieval_prior(
            before["retrieval_scores"], before["trend"], weights, before["collab"], collab_weight), abs=1e-6)
        assert after["input_ids"] == before["input_ids"] and after["target_position"] == before["target_position"]


def test_training_runs_with_deterministic_kernels_and_puts_the_setting_back(bundle_copy, monkeypatch):
    """Two quick-preset runs on the same data drifted apart from step 4 without deterministic kernels (two 8-step
    runs: different adapters; with them: the same bytes); the setting holds while training, and only then."""
    import compile.finetune

    real_train, seen = compile.finetune.train, []

    def recording(*args, **kwargs):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return real_train(*args, **kwargs)

    monkeypatch.setattr(compile.finetune, "train", recording)
    assert not torch.are_deterministic_algorithms_enabled()
    run(FinetuneConfig(bundle=bundle_copy, force=True, max_steps=2, batch_size=4, save_every=0, seed=3))
    assert seen == [True] and not torch.are_deterministic_algorithms_enabled()


def test_cuda_without_a_gpu_is_refused_before_the_adapter_is_set_aside(tiny_llm_bundle, tmp_path):
    """It failed inside training, after the bundle's adapter had been set aside: merge then refused the bundle."""
    from compile.steps import StepFailed

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: --device cuda is valid here")
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_llm_bundle, bundle, symlinks=True)
    with pytest.raises(StepFailed, match="--device cuda"):
        run(FinetuneConfig(bundle=bundle, force=True, device="cuda", max_steps=2))
    assert Bundle.open(bundle).has("lora")



def test_a_sasrec_retrained_since_sft_data_is_refused_before_training(bundle_copy):
    """The soft tokens carry the SASRec checkpoint sft-data built the examples with: finetune loaded whatever the
    bundle held now (its fingerprint covers llm_base and sft_data only) and recorded that version as the one used."""
    from palr.bundle import BundleError

    meta_path = bundle_copy / "llm" / "sft" / "meta.json"
    meta = json.loads(meta_path.read_text())
    table = meta["item_tokens"]["table"]
    meta["item_tokens"]["table_version"] = "0" * 12  # as if sft-data ran against an earlier SASRec
    meta_path.write_text(json.dumps(meta))
    bundle = Bundle.open(bundle_copy)  # recorded as sft-data would have
    entry = bundle.artifact("sft_data")
    bundle.add_artifact("sft_data", entry["path"], **{k: v for k, v in entry.items()
                                                      if k not in ("path", "sha256", "files", "created_at")})
    bundle.save()
    (bundle_copy / "llm" / "lora").mkdir()  # an earlier run's adapter, named by the manifest
    (bundle_copy / "llm" / "lora" / "adapter.txt").write_text("earlier")
    bundle = Bundle.open(bundle_copy)
    bundle.add_artifact("lora", "llm/lora")
    bundle.save()
    with pytest.raises(BundleError, match=f"{table} is version .*, but llm/sft was built against 000000000000"):
        run(FinetuneConfig(bundle=bundle_copy, max_steps=1, batch_size=4, save_every=0, force=True))
    assert Bundle.open(bundle_copy).has("lora"), "refused before the earlier adapter was set aside"
