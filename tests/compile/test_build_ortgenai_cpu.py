"""`compile build --target ortgenai-cpu` on the tiny LLM bundle (the real onnxruntime-genai model
builder) and the `ortgenai` engine over it: in-flight answers equal the one-at-a-time torch
reference, the shared prefix is reused, aborts work, and only the modes the build won are served
by it (the rest by torch, through `ModeRouter`)."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

import torch  # noqa: E402 - a declared dependency: missing is a failure, not a skip
pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install -e '.[ortgenai]')")

from compile import build  # noqa: E402
from compile.build import build_inputs  # noqa: E402
from palr.builds import engine_threads  # noqa: E402
from palr.bundle import Bundle  # noqa: E402
from palr.builds import BuildMismatch  # noqa: E402
from palr.machine import Machine, library_version  # noqa: E402
from palr.llm import generate_labels, load_causal_lm, score_labels  # noqa: E402
from palr.prompt import Readout  # noqa: E402
from ranking_server.engines.base import EngineAborted, EngineRequest  # noqa: E402
from ranking_server.engines.factory import engine_from_build, ortgenai_engine  # noqa: E402
from ranking_server.engines.config import EngineConfig  # noqa: E402
from ranking_server.engines.hf import HFEngine  # noqa: E402
from ranking_server.engines.ortgenai import OrtGenaiEngine  # noqa: E402
from ranking_server.engines.routed import ModeRouter  # noqa: E402
from tests.fixtures.builds import build_config, copy_bundle  # noqa: E402
from tests.fixtures.engine_workload import GatedConstraint, label_ids, mixed_requests  # noqa: E402
from tests.fixtures.serving import eventually  # noqa: E402

NAME = "engine:ortgenai-cpu"


@pytest.fixture(scope="module")
def ortgenai_bundle(tiny_llm_bundle, tmp_path_factory):
    bundle = copy_bundle(tiny_llm_bundle, tmp_path_factory.mktemp("ortgenai-build") / "bundle")
    other = OTHER_BUILDS_STAGING(bundle)  # another build's candidates, as if it ran beside this one
    other.mkdir(parents=True)
    (other / "fp32").write_text("another build's model")
    build.run(build_config(bundle, "ortgenai-cpu", dtype="fp32", threads=1))
    return bundle


def OTHER_BUILDS_STAGING(bundle):
    """Where another build's candidates lie; the name every build shared until each got its own."""
    return bundle / "engines" / ".ortgenai-cpu.building.candidates"


def test_a_build_leaves_another_builds_staging_alone(ortgenai_bundle):
    """Each build stages its candidate models next to its own scratch directory: two builds on one bundle at
    once never delete or overwrite each other's."""
    assert (OTHER_BUILDS_STAGING(ortgenai_bundle) / "fp32").read_text() == "another build's model"
    assert sorted(p.name for p in (ortgenai_bundle / "engines").iterdir() if "ortgenai" in p.name) == [
        ".ortgenai-cpu.building.candidates", "ortgenai-cpu"]


@pytest.fixture(scope="module")
def reference(ortgenai_bundle):
    model, tokenizer = load_causal_lm(Bundle.open(ortgenai_bundle).path("llm_merged"))
    labels = label_ids(tokenizer, 20)
    return model, labels


def test_a_new_hf_cpu_build_makes_the_ortgenai_build_measured_against_the_old_one_stale(ortgenai_bundle, tmp_path):
    """ortgenai-cpu is timed against the bundle's hf-cpu build: once that is (re)built, the ortgenai build's step
    is no longer current (it was skipped as current, and kept routing modes it no longer wins)."""
    bundle = Bundle.open(copy_bundle(ortgenai_bundle, tmp_path / "bundle"))
    before = {target: build_inputs(bundle, target) for target in ("ortgenai-cpu", "hf-cpu")}
    hf_cpu = bundle.root / "engines" / "hf-cpu"
    hf_cpu.mkdir()
    (hf_cpu / "config.json").write_text("{}")
    bundle.add_artifact("engine:hf-cpu", "engines/hf-cpu")
    assert build_inputs(bundle, "ortgenai-cpu") != before["ortgenai-cpu"]
    assert build_inputs(bundle, "hf-cpu") == before["hf-cpu"]


def test_build_records_the_onnx_model_and_what_it_measured(ortgenai_bundle):
    bundle = Bundle.open(ortgenai_bundle)
    entry = bundle.artifact(NAME)
    assert entry["target"] == "ortgenai-cpu" and entry["engine"] == "ortgenai" and entry["dtype"] == "fp32"
    assert entry["engine_libraries"] == {"onnxruntime-genai": library_version("onnxruntime-genai")}
    assert {"genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json"} <= set(entry["files"])
    assert set(entry["serves_modes"]) <= {"score", "generate"}
    genai = json.loads((bundle.path(NAME) / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 1
    report = json.loads((ortgenai_bundle / "reports" / "build_ortgenai-cpu.json").read_text())
    assert set(report["latency"]) == {"torch-fp32", "ortgenai-fp32"} and report["latency_baseline"] == "torch-fp32"
    assert entry["routing_baseline"] is None  # measured against torch fp32: the bundle had no hf-cpu build
    assert report["quality"]["ortgenai-fp32"]["score_max_abs_logprob_diff"] < 1e-3  # fp32 graph ≈ torch fp32
    assert report["modes"]["fp32"]["won"] == entry["serves_modes"]
    assert set(report["modes"]["fp32"]["why"]) == {"score", "generate"}


def test_with_an_hf_cpu_build_a_mode_is_won_against_that_build(hf_cpu_bundle, tmp_path):
    """The modes onnxruntime-genai does not win are served by the bundle's hf-cpu build (its precision), not by
    torch fp32: that build is what its latency is measured against; quality stays against torch fp32."""
    bundle = copy_bundle(hf_cpu_bundle, tmp_path / "bundle")
    build.run(build_config(bundle, "ortgenai-cpu", dtype="fp32", threads=1))
    served = f"torch-hf-cpu-{Bundle.open(bundle).artifact('engine:hf-cpu')['dtype']}"
    report = json.loads((bundle / "reports" / "build_ortgenai-cpu.json").read_text())
    assert report["latency_baseline"] == served
    # timed at the threads the server runs that build with (it was timed at ortgenai's --threads 1)
    served_threads = engine_threads(Bundle.open(bundle).artifact("engine:hf-cpu"), Machine.detect("cpu"))[0]
    assert report["latency_baseline_threads"] == (served_threads or torch.get_num_threads())
    opened = Bundle.open(bundle)
    assert opened.artifact(NAME)["routing_baseline"] == opened.version("engine:hf-cpu")
    assert set(report["latency"]) == {"torch-fp32", served, "ortgenai-fp32"}
    assert all(f"x {served} latency" in why for why in report["modes"]["fp32"]["why"].values())
    assert 0 < report["quality"][served]["score_top1_agreement"] <= 1  # measured beside, against torch fp32


def test_inflight_answers_equal_the_torch_reference_with_prefix_reuse(ortgenai_bundle, reference):
    model, labels = reference
    requests = mixed_requests(labels)
    engine = engine_from_build(Bundle.open(ortgenai_bundle), "ortgenai-cpu",
                               EngineConfig(max_batch_size=4, max_tokens_per_step=64))
    try:
        assert isinstance(engine, OrtGenaiEngine)

        async def all_at_once():
            return await asyncio.gather(*(engine.rank(r) for r in requests))

        results = asyncio.run(all_at_once())
        stats = engine.stats()
    finally:
        engine.close()
    for request, result in zip(requests, results):
        if request.mode == "score":
            assert result.scores == pytest.approx(score_labels(model, request.input_ids, request.label_token_ids),
                                                  abs=1e-4)
        else:
            assert result.order == generate_labels(model, request.input_ids, request.label_token_ids, request.k,
                                                   request.bias)
            assert result.generated_tokens == request.k
    assert stats.completed == 16 and stats.max_active == 4 and stats.cached_tokens > 0
    assert sum(r.cached_tokens for r in results) == stats.cached_tokens


def test_abort_of_a_queued_request(ortgenai_bundle, reference):
    """The long request is held mid-decode (its constraint blocks the engine thread) while the short one waits
    behind it for the one slot, so the abort meets it queued however fast or loaded the machine is."""
    _, labels = reference
    engine = engine_from_build(Bundle.open(ortgenai_bundle), "ortgenai-cpu", EngineConfig(max_batch_size=1,
                                                                                            max_tokens_per_step=8))
    held = GatedConstraint(labels[:5], 5, at=1)
    long = EngineRequest("long", [], list(range(1000, 1400)), labels[:5], "generate", k=5, constraint=lambda: held)
    # generate too: a score request would go ahead of it (score_first_ms) and take the slot first
    queued = EngineRequest("queued", [], [5, 6, 7], labels[:5], "generate", k=2)

    async def scenario():
        first = asyncio.ensure_future(engine.rank(long))
        assert await asyncio.to_thread(held.reached.wait, 60), "the long request never decoded"
        second = asyncio.ensure_future(engine.rank(queued))
        await eventually(lambda: (engine.stats().active, engine.stats().queued) == (1, 1), what="one active, one queued")
        assert engine.abort("queued")
        held.gate.set()
        with pytest.raises(EngineAborted):
            await second
        return await first

    try:
        result = asyncio.run(scenario())
        assert len(result.order) == 5 and engine.stats().aborted == 1
    finally:
        held.gate.set()
        engine.close()


def test_only_the_modes_the_build_won_go_to_onnxruntime_genai(ortgenai_bundle, reference, tmp_path):
    bundle_dir = copy_bundle(ortgenai_bundle, tmp_path / "bundle")
    bundle = Bundle.open(bundle_dir)
    bundle.artifact(NAME)["serves_modes"] = ["generate"]
    bundle.save()
    model, labels = reference
    config = EngineConfig(max_batch_size=2, max_tokens_per_step=64)
    def torch_engine(part):
        engine = HFEngine(model, part)
        engine.version = "merged:test"
        return engine

    engine = ortgenai_engine(Bundle.open(bundle_dir), config, torch_engine)
    try:
        assert isinstance(engine, ModeRouter)
        assert engine.version == f"merged:test(score)+ortgenai-cpu:{bundle.version(NAME)}(generate)"  # both
        assert engine.by_mode["generate"].name == "ortgenai" and engine.by_mode["score"].name == "hf-inflight"
        assert engine.by_mode["generate"].device_turns is engine.by_mode["score"].device_turns  # one CPU, in turns
        # one queue bound for the caller; the context-cache budget is torch's (ortgenai weighs none in bytes)
        assert engine.max_queue == config.max_queue
        assert engine.by_mode["score"].config.context_cache_mb == config.context_cache_mb
        score = EngineRequest("s", [], list(range(500, 560)), labels[:6])
        generate = EngineRequest("g", [], list(range(500, 560)), labels[:6], "generate", k=2)
        asyncio.run(engine.rank(score))
        asyncio.run(engine.rank(generate))
        assert [engine.by_mode[m].stats().completed for m in ("score", "generate")] == [1, 1]
        assert engine.stats().completed == 2 and engine.check_health()
    finally:
        engine.close()


def test_a_build_that_won_no_mode_is_refused(ortgenai_bundle, tmp_path):
    bundle_dir = copy_bundle(ortgenai_bundle, tmp_path / "bundle")
    bundle = Bundle.open(bundle_dir)
    bundle.artifact(NAME)["serves_modes"] = []
    bundle.save()
    with pytest.raises(BuildMismatch, match="no ranking mode where onnxruntime-genai beats torch"):
        ortgenai_engine(Bundle.open(bundle_dir), EngineConfig(), lambda part: None)


@pytest.mark.parametrize("reads", [False, True], ids=["label-readout", "readout-in-the-bias"])
def test_generate_at_logit_weight_zero_writes_the_bias_order_without_decoding(ortgenai_bundle, reference, reads):
    """Weight 0: no decode step. Reading the labels (their logits are what weight 0 multiplies) no pass at all;
    with a readout joining the bias, one prompt pass."""
    model, labels = reference
    engine = engine_from_build(Bundle.open(ortgenai_bundle), "ortgenai-cpu", EngineConfig(max_batch_size=2,
                                                                                            max_tokens_per_step=64))
    bias = [0.1, 0.5, -0.2, 0.3, 0.0]
    request = EngineRequest("zero", [], list(range(500, 540)), labels[:5], "generate", k=3, bias=bias,
                            logit_weight=0.0)
    if reads:
        request = dataclasses.replace(request, readout=Readout.after_prompt(len(request.input_ids), labels[:5]))
    try:
        result = asyncio.run(engine.rank(request))
        steps = list(engine.step_log)
    finally:
        engine.close()
    assert result.generated_tokens == 3 and len(set(result.order)) == 3
    if reads:
        assert steps and all(step.decoding == 0 for step in steps), "a decode step ran though the logits count zero"
        from palr.decoding import LabelConstraint  # the bias joined by the readouts, as the torch reference writes it
        from palr.llm import generate_constrained
        assert result.order == generate_constrained(model, request.input_ids, LabelConstraint(labels[:5], 3), bias,
                                                    readout=request.readout, logit_weight=0.0)
    else:
        assert result.order == [1, 3, 0] and steps == [], "a pass ran though nothing of it counts"


def test_a_constraint_that_raises_fails_its_request_alone(ortgenai_bundle, reference):
    """As in the hf engine: a bug in one request's constraint (here in allowed_tokens) fails that request; it
    was called outside the guard and took the engine loop down for everyone."""
    from palr.decoding import LabelConstraint
    from palr.errors import EngineError

    _, labels = reference

    class Broken(LabelConstraint):
        def allowed_tokens(self):
            raise RuntimeError("constraint bug in allowed_tokens")

    engine = engine_from_build(Bundle.open(ortgenai_bundle), "ortgenai-cpu", EngineConfig(max_batch_size=2,
                                                                                            max_tokens_per_step=64))
    try:
        bad = EngineRequest("bad", [], [5, 6, 7], labels[:5], "generate", k=3,
                            constraint=lambda: Broken(labels[:5], 3))
        with pytest.raises(EngineError, match="constrained decoding failed.*constraint bug"):
            asyncio.run(engine.rank(bad))
        assert engine.check_health()
        good = EngineRequest("good", [], [5, 6, 7], labels[:5], "generate", k=3)
        assert len(asyncio.run(engine.rank(good)).order) == 3
    finally:
        engine.close()


def test_a_candidate_readout_prompt_runs_in_one_step_and_scores_as_the_reference(ortgenai_bundle, reference):
    """Its pieces end at each candidate's readout position; the engine fed one piece a step, so 8 candidates took
    8 steps (each a turn on the device shared with the torch engine under a ModeRouter) with budget to spare."""
    import random

    from palr.llm import score_candidates
    from palr.prompt import Readout

    model, labels = reference
    rng = random.Random(3)
    prefix = [rng.randrange(100, 40000) for _ in range(24)]
    suffix, ends = [rng.randrange(100, 40000) for _ in range(30)], []
    for label in labels[:8]:  # candidate lines: label + two item tokens, read at the line's last token
        suffix += [label, rng.randrange(100, 40000), rng.randrange(100, 40000)]
        ends.append(len(prefix) + len(suffix) - 1)
    request = EngineRequest("cand", prefix, suffix + [rng.randrange(100, 40000)], labels[:8], mode="score",
                            readout=Readout(tuple(ends), tuple(labels[:8])))
    engine = engine_from_build(Bundle.open(ortgenai_bundle), "ortgenai-cpu", EngineConfig(max_tokens_per_step=2048))
    try:
        result = asyncio.run(engine.rank(request))
        steps = engine.stats().steps
    finally:
        engine.close()
    assert steps == 1
    assert result.scores == pytest.approx(score_candidates(model, request.input_ids, request.readout), abs=1e-4)


def test_the_build_times_its_prompt_pass_in_the_pieces_the_engine_feeds(ortgenai_bundle):
    """The latency model fed the whole prompt at once, while the engine feeds a candidate-readout prompt in pieces
    ending at each readout position (one generator call each)."""
    from compile.targets.measure import OrtGenaiRunner, Probe, latency_readout_stops
    from palr.prompt import Readout

    probe = Probe(list(range(100, 160)), [1, 2, 3], None, readout=Readout((10, 20, 70), (1, 2, 3)))
    assert latency_readout_stops([probe], 40) == [10, 20]  # a stop past the latency prompt is not one
    assert latency_readout_stops([Probe(list(range(100, 160)), [1, 2, 3], None)], 40) == []
    runner = OrtGenaiRunner("ortgenai-fp32", Bundle.open(ortgenai_bundle).path(NAME), 1, [10, 20])
    fed = []
    feed = runner._slot.feed
    runner._slot.feed = lambda tokens: fed.append(len(tokens)) or feed(tokens)  # counts the real generator's calls
    runner.prefill(list(range(100, 140)))
    assert fed == [11, 10, 19]


def test_a_request_with_nothing_cached_takes_the_least_recently_used_generator():
    """It took the most recently used one: the context of the user who just left, the likeliest to come back."""
    from ranking_server.engines.ortgenai import pick_idle

    prefix, alice, bob = [1, 2], [1, 2, 7, 7], [1, 2, 8, 8]
    idle = [alice, bob]  # alice left first, bob last
    assert pick_idle(idle, [[1, 2, 9, 9], prefix]) == (0, prefix)  # a new user overwrites alice's, the older
    assert pick_idle(idle, [bob, prefix]) == (1, bob)  # a returning user finds their own context
    assert pick_idle([[5, 5], alice], [[1, 2, 9], prefix]) == (1, prefix)  # the shared prefix before any slot
    assert pick_idle([], [prefix]) == (None, prefix)


def test_context_reuse_is_counted_as_the_hf_engines_is(ortgenai_bundle, reference):
    """The ortgenai engine reuses a user's context (an idle generator whose cache starts with it) but reported no
    hits or misses: the dashboard's context-cache panel read 0 for it."""
    model, labels = reference
    prefix, alice, bob = list(range(500, 520)), list(range(1000, 1040)), list(range(2000, 2040))

    def call(rid, context, candidates):
        return EngineRequest(rid, prefix, context + candidates, labels[:4], "score", k=3, context_len=len(context))

    requests = [call("a1", alice, [7, 8, 9]), call("a2", alice, [10, 11, 12]), call("b1", bob, [7, 8, 9])]
    engine = engine_from_build(Bundle.open(ortgenai_bundle), "ortgenai-cpu",
                               EngineConfig(max_batch_size=1, max_tokens_per_step=64, context_cache_mb=8))
    try:
        results = [asyncio.run(engine.rank(r)) for r in requests]  # one after another: a1's generator is idle
        stats = engine.stats()
    finally:
        engine.close()
    assert results[1].cached_tokens == len(prefix) + len(alice)
    assert (stats.context_hits, stats.context_misses) == (1, 2)
    for request, result in zip(requests, results):
        assert result.scores == pytest.approx(score_labels(model, request.input_ids, request.label_token_ids),
                                              abs=1e-4)
