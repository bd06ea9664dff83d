"""compile sft-data: examples learn from the TRAIN split only (no valid or test interaction as history or target;
the candidate lists are built without knowing them); the validation file's candidates are exactly what serving
retrieves for the history (only the history masked: never the test item, which would leak its label)."""

from __future__ import annotations

import json

import pytest

from palr.prompt import RECOMMEND, RETRIEVAL


def read(bundle, name):
    return [json.loads(line) for line in (bundle / "llm" / "sft" / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def train_rows(tiny_llm_bundle):
    return read(tiny_llm_bundle, "train.jsonl")


@pytest.fixture(scope="module")
def valid_rows(tiny_llm_bundle):
    return read(tiny_llm_bundle, "valid.jsonl")


def test_both_tasks_are_present(train_rows, tiny_llm_bundle):
    tasks = {row["task"] for row in train_rows}
    assert tasks == {RETRIEVAL, RECOMMEND}
    meta = json.loads((tiny_llm_bundle / "llm" / "sft" / "meta.json").read_text())
    assert meta["train_examples"] == len(train_rows)


def test_training_examples_learn_from_training_interactions_only(train_rows, ml100k):
    """History and targets come from the train split; the user's valid and test items may be candidates
    (negatives), as for a model trained before they happened: leaving them out would use the evaluation's labels
    to build the training lists (and shield exactly those items from ever being a negative)."""
    split = ml100k.split
    for row in train_rows:
        user, history = row["user"], row["history"]
        train = split.train[user]
        held_out = {split.valid[user], split.test[user]}
        assert history == train[: len(history)], "history is a prefix of the user's training items"
        targets = [row["target"]] if row["task"] == RETRIEVAL else row["targets"]
        assert targets == train[len(history): len(history) + len(targets)], "targets follow in the train split"
        assert not (set(history) | set(targets)) & held_out, f"user {user}: a valid/test item is learnt as a positive"


def test_training_lists_leave_out_the_history_and_later_training_items_only(tiny_llm_bundle, ml100k):
    """The held-out SASRec's list for a cut, as long as every item it may offer: exactly the catalog minus the
    cut's history and the user's later training items; the user's valid and test items among them."""
    from compile.sft_data import holdout_cuts, holdout_retrieve
    from palr.bundle import Bundle
    from palr.catalog import Catalog
    from palr.sasrec import SASRec

    bundle = Bundle.open(tiny_llm_bundle)
    catalog = Catalog.load(bundle.path("catalog"))
    model = SASRec.load(bundle.path("sasrec_holdout"))
    cuts = holdout_cuts(ml100k, sorted(ml100k.split.train)[:10], 3)
    for cut in cuts:
        left_out = set(cut.history) | set(cut.following)
        (ids, _), = holdout_retrieve(model, catalog, [cut], len(catalog.items) - len(left_out))
        assert set(ids) == {item.id for item in catalog.items} - left_out
        assert {ml100k.split.valid[cut.user], ml100k.split.test[cut.user]} <= set(ids)


def test_retrieval_candidates_hold_the_target_once_and_no_later_item(train_rows, ml100k, tiny_llm_bundle):
    meta = json.loads((tiny_llm_bundle / "llm" / "sft" / "meta.json").read_text())
    positions = set()
    for row in (r for r in train_rows if r["task"] == RETRIEVAL):
        candidates = row["candidates"]
        assert len(candidates) == meta["candidates"] == len(set(candidates))
        assert candidates[row["target_position"]] == row["target"]
        later = set(ml100k.split.train[row["user"]][len(row["history"]) + 1:])
        assert not later & set(candidates), "a later positive of the user was used as a negative"
        assert not set(row["history"]) & set(candidates)
        positions.add(row["target_position"])
    assert len(positions) >= 5, "candidate order is shuffled: the target is not always at one label"


def test_validation_file_is_the_valid_split_with_the_candidates_serving_retrieves(valid_rows, ml100k,
                                                                                 tiny_llm_bundle):
    from palr.bundle import Bundle
    from palr.catalog import Catalog
    from palr.sasrec_onnx import Query, SasrecOnnx

    bundle = Bundle.open(tiny_llm_bundle)
    catalog = Catalog.load(bundle.path("catalog"))
    split = ml100k.split
    assert valid_rows
    served = SasrecOnnx.from_bundle(bundle).retrieve(
        [Query(history=catalog.indices(r["history"]), exclude=catalog.indices(r["history"]), k=len(r["candidates"]))
         for r in valid_rows])
    for row, ranked in zip(valid_rows, served):
        user = row["user"]
        assert row["history"] == split.train[user]
        assert row["target"] == split.valid[user]
        assert split.test[user] not in set(row["history"]) | {row["target"]}
        assert row["candidates"] == [catalog.item(int(i)).id for i in ranked.indices], "not serving's candidates"
        scores = row["retrieval_scores"]
        assert scores == sorted(scores, reverse=True), "candidates keep SASRec's order"
        position = row["target_position"]
        assert (position is None) == (row["target"] not in row["candidates"])
        if position is not None:
            assert row["candidates"][position] == row["target"]


def test_held_out_cuts_are_each_users_last_training_items_capped_for_short_users(ml100k):
    from compile.holdout import MIN_HISTORY, held_out_count, held_out_split
    from compile.sft_data import holdout_cuts

    split = ml100k.split
    lengths = {u: len(items) for u, items in split.train.items()}
    short = min(lengths, key=lengths.get)  # 18 training items on ML-100k
    long = max(lengths, key=lengths.get)
    assert held_out_count(lengths[long], 32) == 32 and held_out_count(lengths[short], 32) == lengths[short] - MIN_HISTORY
    assert held_out_count(lengths[short], 8) == 8 and held_out_count(2, 8) == 0
    cuts = holdout_cuts(ml100k, [short, long], 32)
    by_user = {u: [c for c in cuts if c.user == u] for u in (short, long)}
    assert len(by_user[long]) == 32 and len(by_user[short]) == lengths[short] - MIN_HISTORY
    for user, user_cuts in by_user.items():
        train = split.train[user]
        assert [c.target for c in user_cuts] == train[-len(user_cuts):]
        assert all(c.history == train[:len(c.history)] and len(c.history) >= MIN_HISTORY for c in user_cuts)
    encoded = held_out_split(ml100k, 32)  # the held-out SASRec never trains on a held-out position
    row = encoded.users.index(short)
    assert len(encoded.train[row]) == MIN_HISTORY and encoded.valid[row] == ml100k.catalog.index(split.train[short][MIN_HISTORY])


def test_the_held_out_sasrec_trains_with_the_served_sasrecs_architecture_and_options(ml100k_dir, tmp_path):
    """A SASRec trained with non-default options records them; the held-out one takes them (and its
    architecture) from that record. A record from before options were recorded is completed by the next
    `compile sasrec` (current, so trained with the options it is given); without it, the defaults."""
    from compile.holdout import training_config
    from compile.presets import preset_for
    from compile.sasrec import SASRecConfig, run
    from palr.bundle import Bundle

    options = {"batch_size": 16, "lr": 3e-4, "weight_decay": 1e-5, "window_stride": 5, "random_windows": False,
               "seed": 7}
    run(SASRecConfig(bundle=tmp_path, data=ml100k_dir, **preset_for("tiny", "sasrec") | options))
    bundle = Bundle.open(tmp_path)
    held_out = training_config(bundle, epochs=1, threads=1)
    assert {name: getattr(held_out, name) for name in options} == options
    assert (held_out.hidden, held_out.max_len, held_out.ffn_hidden) == (32, 20, 64)
    del bundle.manifest.artifacts["sasrec_torch"]["training"]
    defaults = SASRecConfig()
    assert all(getattr(training_config(bundle, 1, 1), name) == getattr(defaults, name) for name in options)
    bundle.save()  # an older bundle: no record
    run(SASRecConfig(bundle=tmp_path, data=ml100k_dir, **preset_for("tiny", "sasrec") | options))  # skipped
    completed = training_config(Bundle.open(tmp_path), epochs=1, threads=1)
    assert {name: getattr(completed, name) for name in options} == options


def test_ease_scores_come_from_tables_that_never_saw_the_examples_target(train_rows, valid_rows, ml100k,
                                                                        tiny_llm_bundle):
    """Training examples: a table fit on every user's training items minus the held-out ones (the examples'
    targets); validation examples: one fit on training items only; the bundle's serving table on train + valid."""
    import numpy as np

    from compile.holdout import held_out_count
    from palr.bundle import Bundle
    from palr.catalog import Catalog
    from palr.collab import CollabTable

    bundle = Bundle.open(tiny_llm_bundle)
    catalog, split = Catalog.load(bundle.path("catalog")), ml100k.split
    l2, held = float(bundle.artifact("collab")["l2"]), int(bundle.artifact("sasrec_holdout")["held_out_items"])
    users = sorted(split.train)
    kept = {u: split.train[u][:len(split.train[u]) - held_out_count(len(split.train[u]), held)] for u in users}
    holdout = CollabTable.fit([catalog.indices(kept[u]) for u in users], catalog.num_indices, l2)
    train_only = CollabTable.fit([catalog.indices(split.train[u]) for u in users], catalog.num_indices, l2)
    serving = CollabTable.load(bundle.path("collab"))
    assert serving.weights.shape == (catalog.num_indices,) * 2

    def expected(table, row):
        return table.scores(catalog.indices(row["history"]), catalog.indices(row["candidates"]))

    retrieval_rows = [r for r in train_rows if r["task"] == RETRIEVAL]
    assert retrieval_rows and valid_rows
    for row in retrieval_rows:
        assert row["target"] not in kept[row["user"]], "the training table holds this example's target"
        np.testing.assert_allclose(row["collab"], expected(holdout, row), rtol=1e-5, atol=1e-6)
    for row in valid_rows:
        np.testing.assert_allclose(row["collab"], expected(train_only, row), rtol=1e-5, atol=1e-6)
    # the tables differ: a held-out item moves the scores (this test would pass vacuously if they did not)
    assert not np.allclose(holdout.weights, train_only.weights) and not np.allclose(train_only.weights, serving.weights)


def test_rank_tokens_in_every_example_are_the_candidates_ranks_under_its_own_scores(train_rows, valid_rows):
    """Each retrieval example's rank tokens: its candidates' EASE rank (from the leak-free scores the example
    carries) and SASRec rank, bucketed; and the prompt's tokens are those (the last two of each candidate line)."""
    from palr.ranking import RANK_BUCKETS, rank_buckets

    rows = [r for r in train_rows if r["task"] == RETRIEVAL] + valid_rows
    for row in rows:
        expected = [list(pair) for pair in zip(rank_buckets(row["collab"]), rank_buckets(row["retrieval_scores"]))]
        assert row["ranks"] == expected
        ends = row["readout_positions"]
        tokens = [row["input_ids"][e - 1:e + 1] for e in ends]
        base = row["readout_tokens"][0] - 2 * RANK_BUCKETS  # the score row follows the rank rows
        assert tokens == [[base + a, base + RANK_BUCKETS + b] for a, b in expected]
    assert rows and all(sorted(a for a, _ in r["ranks"])[:2] == [0, 1] for r in rows), "ranks, not constants"


def test_rank_tokens_need_the_scores_they_rank_by():
    from compile.sft_data import SftDataConfig, check_options
    from palr.cli import add_config_arguments, build_config

    with pytest.raises(ValueError, match="--negatives holdout"):
        check_options(SftDataConfig(negatives="sasrec"))
    with pytest.raises(ValueError, match="needs --collab"):
        check_options(SftDataConfig(collab=False))
    with pytest.raises(ValueError, match="unknown"):
        check_options(SftDataConfig(rank_tokens=["popularity"]))
    check_options(SftDataConfig(negatives="sasrec", rank_tokens=[]))  # none: any negatives
    with pytest.raises(ValueError, match="--holdout-items must be >= 1 with --negatives holdout"):
        check_options(SftDataConfig(holdout_items=0))
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, SftDataConfig)
    assert build_config(SftDataConfig, parser.parse_args(["--rank-tokens"])).rank_tokens == [], "the option alone"
    assert build_config(SftDataConfig, parser.parse_args([])).rank_tokens == ["collab", "retrieval"]


def test_the_dataset_reached_by_another_path_does_not_redo_sft_data(tiny_llm_bundle, ml100k_dir, tmp_path, caplog):
    """The fingerprint holds the dataset's checksum, not the `--data` path: the same files reached another way
    (here a symlink) keep sft-data, and with it the finetune, current."""
    from compile import pipeline, sft_data
    from tests.fixtures.builds import copy_bundle

    bundle = copy_bundle(tiny_llm_bundle, tmp_path / "bundle")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.symlink_to(ml100k_dir)
    step = next(s for s in pipeline.STEPS if s.name == "sft-data")
    config = pipeline.step_config(pipeline.PipelineConfig(bundle=bundle, data=elsewhere, preset="tiny"), step, sft_data)
    with caplog.at_level("INFO", logger="compile.sft_data"):
        sft_data.run(config)
    assert "SFT data is current" in caplog.text


@pytest.mark.parametrize("module", ["holdout", "sasrec"])
def test_a_new_version_of_the_held_out_sasrecs_code_makes_sft_data_stale(tiny_llm_bundle, ml100k_dir, module,
                                                                        monkeypatch):
    """The held-out SASRec is trained inside sft-data: a change to its code (the module's VERSION) must make the
    step stale, or its own record is never looked at and the old negatives stay."""
    import importlib

    from compile import pipeline, sft_data
    from palr.bundle import Bundle

    bundle = Bundle.open(tiny_llm_bundle)
    step = next(s for s in pipeline.STEPS if s.name == "sft-data")
    config = pipeline.step_config(pipeline.PipelineConfig(bundle=tiny_llm_bundle, data=ml100k_dir, preset="tiny"),
                                  step, sft_data)
    inputs = ["catalog", "users", "sasrec_onnx", "sasrec_torch", "profiles", "llm_base"]
    recorded = sft_data.step_fingerprint(config, bundle, inputs)
    code = importlib.import_module(f"compile.{module}")
    monkeypatch.setattr(code, "VERSION", code.VERSION + 1)
    assert sft_data.step_fingerprint(config, bundle, inputs) != recorded
