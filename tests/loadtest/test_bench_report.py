"""The benchmark report's arithmetic on synthetic numbers (no timings asserted): utilisation (FLOPs of
the matmul peak and of a prefill, the parameter count used), "vs" figures taken within one round,
and the per-concurrency plots with the spread over rounds."""

from __future__ import annotations

import statistics

import pytest

from loadtest.bench_all import (
    PREFILL_RATIO, Paired, cell_rows, disturbed_ratio_rounds, goals, paired_ratio, prefill_vs_peak, ratio_pairs,
    round_ratios, strategy_cells, vs_within_rounds)
from loadtest.bench_ranking import Cell
from loadtest.utilisation import (
    MATMUL_DTYPE, engine_row, flops_per_s, matmul_flops, matmul_shares, non_embedding_parameters, prefill_flops,
    shares_label, utilisation_row)


def summary(round_, throughput, p95, **extra):
    return {"round": round_, "requests": 16, "throughput_rps": throughput, "p50_ms": p95 / 2, "p95_ms": p95,
            "p99_ms": p95, "mean_ms": p95 / 2, "mean_batch": 1.0, "errors": {}, **extra}


def test_flop_arithmetic():
    assert matmul_flops(2048) == 2 * 2048 ** 3 == 17_179_869_184
    assert prefill_flops(100_000_000, 300) == 60_000_000_000
    assert flops_per_s(6e10, 0.5) == 1.2e11 and flops_per_s(1.0, 0.0) == 0.0
    row = utilisation_row("fp32", peak_s=0.1, prefill_s=0.5, parameters=100_000_000, tokens=300)
    assert row["peak_gflops"] == pytest.approx(171.8, abs=0.01)  # 2 x 2048^3 / 0.1 s
    assert row["prefill_gflops"] == 120.0  # 2 x 1e8 x 300 / 0.5 s
    assert row["utilisation"] == pytest.approx(120 / 171.8, abs=1e-3)
    assert row["prefill_ms"] == 500.0 and row["matmul_ms"] == 100.0 and row["prompt_tokens"] == 300
    assert MATMUL_DTYPE["bf16-body"] == "bf16" and MATMUL_DTYPE["int8"] == "int8" and MATMUL_DTYPE["int8-wo"] == "fp32"


def test_engine_row_uses_the_cells_mean_latency_as_the_mean_prompts_prefill_time():
    peak = {**utilisation_row("fp32", 0.1, 0.5, 10, 3), "matmul_dtype": "fp32"}
    assert engine_row(peak, {"p50_ms": 250.0, "mean_ms": float("nan")}, 1, 1) is None
    row = engine_row(peak, {"p50_ms": 100.0, "mean_ms": 250.0}, 100_000_000, 299.6)
    assert row["prompt_tokens"] == 300 and row["prefill_gflops"] == 240.0 and row["source"].startswith("engine cell")
    assert row["peak_gflops"] == peak["peak_gflops"]
    assert engine_row(peak, None, 1, 1) is None


def test_non_embedding_parameters_count_decoder_layers_and_final_norm_only():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3 + 2 * 64  # q, o; k, v (GQA); gate, up, down; 2 norms
    assert non_embedding_parameters(model) == 2 * per_layer + 64
    assert non_embedding_parameters(model) == model.num_parameters() - 1000 * 64  # all but the (tied) embeddings


def test_a_mixed_build_peak_is_split_as_its_layers_are():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from compile.targets.hf_cpu import variant

    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    mixed = matmul_shares("bf16-body-fp32-last", variant(model, "bf16-body-fp32-last"))
    assert mixed == {torch.bfloat16: 0.75, torch.float32: 0.25}
    assert shares_label(mixed) == "bf16 75 % + fp32 25 %"
    assert matmul_shares("bf16-body", variant(model, "bf16-body")) == {torch.bfloat16: 1.0}
    assert matmul_shares("int8-wo", model) == {torch.float32: 1.0} and shares_label({torch.float32: 1.0}) == "fp32"
    # a dynamic int8 build is measured against its own int8 Linear, not the fp32 matmul it ran ~2.5x faster than
    assert matmul_shares("int8", model) == {"int8": 1.0} and shares_label({"int8": 1.0}) == "int8 (dynamic)"


def test_vs_sequential_is_taken_within_one_round():
    """The issue's case: in-flight at c=1 ran 3 rounds (rounds 1-2 on a machine 1.6x slower), one-at-a-
    time only in round 0. Within round 0 in-flight is 1.12x; median-over-rounds / round 0 would say 0.7x."""
    runs = {Cell("score", "inflight", 1): [summary(0, 1.12, 900), summary(1, 0.7, 1500), summary(2, 0.7, 1400)],
            Cell("score", "sequential", 1): [summary(0, 1.0, 1000)],
            Cell("score", "inflight", 16): [summary(0, 2.0, 8000), summary(1, 1.5, 12000)],
            Cell("score", "sequential", 16): [summary(0, 1.0, 16000), summary(1, 1.0, 15000)]}
    rows = {(r["strategy"], r["concurrency"]): r for r in cell_rows(runs)}
    c1 = rows[("inflight", 1)]
    # the table's (and plots') figure: the rounds every strategy at c=1 ran in, round 0 here; its own median over
    # its three rounds (0.7) beside one-at-a-time's round 0 (1.0) showed in-flight as 0.7x in one row and 1.12x
    # ("vs") in the next column
    assert c1["throughput_rps"] == 1.12 and c1["compared_rounds"] == [0] and c1["rounds"] == 3
    assert c1["vs_sequential_throughput"] == 1.12 and c1["vs_rounds"] == [0]
    from loadtest.plots import spread
    assert spread(c1, "throughput_rps") == (1.12, 1.12, 1.12)  # no bar from rounds the others did not run
    assert c1["vs_sequential_p95"] == 0.9
    c16 = rows[("inflight", 16)]
    assert c16["vs_sequential_throughput_runs"] == [2.0, 1.5] and c16["vs_sequential_throughput"] == 1.75
    assert c16["vs_sequential_p95_runs"] == [0.5, 0.8] and c16["vs_rounds"] == [0, 1]
    assert rows[("sequential", 16)]["vs_sequential_throughput"] == 1.0


def test_vs_sequential_compares_a_cell_with_the_one_at_a_time_cell_of_its_own_engine_settings():
    """The hf-cpu build's in-flight cell against the build's own one-at-a-time cell, not the fp32 model's; a cell
    without a one-at-a-time twin (no prefix reuse) gets no "vs" figure instead of one against other settings."""
    runs = {Cell("score", "inflight", 16): [summary(0, 2.0, 8000)],
            Cell("score", "sequential", 16): [summary(0, 1.0, 16000)],
            Cell("score", "inflight", 16, build=True): [summary(0, 3.0, 4000)],
            Cell("score", "sequential", 16, build=True): [summary(0, 2.0, 6000)],
            Cell("score", "inflight", 16, prefix_reuse=False): [summary(0, 1.5, 9000)]}
    rows = {r["cell"]: r for r in cell_rows(runs)}
    assert rows["score/inflight/c16"]["vs_sequential_throughput"] == 2.0
    build = next(r for r in rows.values() if r["model"] == "hf-cpu build" and r["strategy"] == "inflight")
    assert build["vs_sequential_throughput"] == 1.5 and build["vs_sequential_p95"] == 0.67
    assert "vs_sequential_throughput" not in rows["score/inflight/c16/no-prefix-reuse"]


def test_the_strategy_tables_and_plots_leave_out_the_answer_cache_cell():
    """Its repeats are answered without the model (p50 ~0.2 ms): beside the strategies it read as a second,
    1000x faster in-flight engine at c=1."""
    runs = {Cell("score", "inflight", 1): [summary(0, 16.0, 80)],
            Cell("score", "inflight", 1, answer_cache=True): [summary(0, 33.0, 76)],
            Cell("score", "inflight", 1, context_reuse=False): [summary(0, 14.0, 90)],
            Cell("score", "sequential", 1): [summary(0, 16.0, 88)]}
    cells = strategy_cells({"cells": cell_rows(runs)}, "score")
    assert [(r["strategy"], r["answer_cache"], r["context_reuse"]) for r in cells] == [
        ("inflight", False, True), ("sequential", False, True)]


def test_a_ratio_names_the_rounds_in_which_either_of_its_cells_was_disturbed():
    """in-flight vs one-at-a-time at c16 (score): round 1's one-at-a-time cell ran with 20 % steal, round 2's
    in-flight cell beside another process; round 0 was quiet. A ratio with no value in a round (a cell missing, or
    its metric) names no disturbed round there."""
    quiet = {"steal_pct": 0.4, "others_cpu_pct": 1.0}
    runs = {Cell("score", "inflight", 16): [summary(0, 2.0, 10, **quiet), summary(1, 2.0, 10, **quiet),
                                            summary(2, 2.0, 10, steal_pct=0.0, others_cpu_pct=40.0)],
            Cell("score", "sequential", 16): [summary(0, 1.0, 10, **quiet), summary(1, 1.0, 10, steal_pct=20.0),
                                              summary(2, 1.0, 10, **quiet)],
            Cell("score", "inflight", 1): [summary(0, 1.0, 10, steal_pct=50.0)]}
    rounds = disturbed_ratio_rounds(runs, 3)
    assert rounds["inflight_vs_sequential_throughput_c16_score"] == [1, 2]
    assert rounds["inflight_vs_sequential_p95_c16_score"] == [1, 2]
    assert "kv_reuse_on_vs_off_latency" not in rounds  # its other cell never ran
    assert "context_hit_vs_miss_latency" not in rounds  # its cell ran (disturbed) without the metric: no value


def test_a_round_whose_cell_answered_nothing_gives_no_ratio_and_no_nan_median(tmp_path):
    """Round 1's in-flight cell failed every request: NaN percentiles, 0 throughput. Its round gives no value (NaN
    is truthy; it used to enter the median, whose result then depended on the NaN's position)."""
    nan = float("nan")
    failed = {**summary(1, 0.0, nan), "errors": {"EngineError": 16}}
    runs = {Cell("score", "inflight", 16): [summary(0, 2.0, 10), failed, summary(2, 3.0, 12)],
            Cell("score", "sequential", 16): [summary(0, 1.0, 20), summary(1, 1.0, 20), summary(2, 1.0, 20)]}
    ratios = round_ratios(runs, 3)
    assert ratios["inflight_vs_sequential_throughput_c16_score"] == [2.0, 3.0]
    assert ratios["inflight_vs_sequential_p95_c16_score"] == [0.5, 0.6]
    rows = cell_rows(runs)
    row = next(r for r in rows if r["strategy"] == "inflight")
    assert row["p95_ms"] == 11.0 and row["errors"] == 16
    assert row["throughput_rps"] == 2.5  # over the same two rounds as its latencies (was 2.0: the 0 counted)
    from loadtest.plots import spread

    assert spread(row, "throughput_rps") == (2.5, 2.0, 3.0)  # its bar too (it reached down to the failed round's 0)
    pytest.importorskip("matplotlib")
    from loadtest.bench_all import plot

    assert plot({"cells": rows}, tmp_path) == ["bench_score.png", "bench_score_concurrency.png"]  # NaN's spread raised


def test_a_round_in_which_a_cell_lost_requests_gives_no_ratio_and_the_table_shows_the_errors(tmp_path):
    """Round 1's in-flight cell had 5 of 16 requests refused: its p95 was its survivors' and entered the headline
    ratios and the vs-one-at-a-time columns (the tables now show each cell's errors). Plots skip a cell with nothing
    to draw (they failed on None before the report was written)."""
    from loadtest.bench_all import plot

    lossy = {**summary(1, 2.0, 5), "errors": {"EngineOverloaded": 5}}
    runs = {Cell("score", "inflight", 16): [summary(0, 2.0, 10), lossy, summary(2, 3.0, 12)],
            Cell("score", "sequential", 16): [summary(0, 1.0, 20), summary(1, 1.0, 20), summary(2, 1.0, 20)]}
    assert round_ratios(runs, 3)["inflight_vs_sequential_p95_c16_score"] == [0.5, 0.6]
    row = next(r for r in cell_rows(runs) if r["strategy"] == "inflight")
    assert row["vs_rounds"] == [0, 2] and row["errors"] == 5
    nan = float("nan")
    failed_everywhere = {Cell("generate", "inflight", 16): [{**summary(0, 0.0, nan), "errors": {"EngineError": 16}}]}
    rows = cell_rows(runs) + cell_rows(failed_everywhere)
    report = {"cells": rows}
    pytest.importorskip("matplotlib")
    assert plot(report, tmp_path) == ["bench_score.png", "bench_score_concurrency.png"]  # no generate-mode plots


def test_vs_within_rounds_without_a_shared_round_gives_nothing():
    assert vs_within_rounds([summary(1, 1.0, 10)], [summary(0, 1.0, 10)]) == {}


def test_concurrency_plot_with_the_spread_over_rounds(tmp_path):
    pytest.importorskip("matplotlib")
    from loadtest.plots import by_concurrency, spread

    runs = {Cell("generate", s, c): [summary(r, base * c ** 0.5 * (1 - 0.2 * r), 100 * c * (1 + 0.3 * r))
                                     for r in range(3 if c == 16 else 1)]
            for s, base in (("sequential", 1.0), ("static", 1.5), ("inflight", 2.0)) for c in (1, 4, 16)}
    rows = cell_rows(runs)
    row = next(r for r in rows if r["strategy"] == "inflight" and r["concurrency"] == 16)
    assert spread(row, "p95_ms") == (row["p95_ms"], 1600, pytest.approx(2560))
    once = next(r for r in rows if r["concurrency"] == 4)
    assert spread(once, "throughput_rps")[1] == spread(once, "throughput_rps")[2] == once["throughput_rps"]
    path = by_concurrency(rows, "synthetic", tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_run_reports_utilisation_side_by_side(tiny_llm_bundle, tmp_path):
    """The whole code path on the tiny bundle: the section is there with fp32, the reference decoder (its own
    parameters, the same prompt length) and the engine's cell."""
    import json

    from loadtest.bench_all import BenchConfig, run

    run(BenchConfig(bundle=tiny_llm_bundle, out=tmp_path, concurrency=[1], strategies=["inflight"], modes=["score"],
                    requests=2, repeats=1, candidates=6, skip_retrieval=True, utilisation_repeats=2,
                    utilisation_reference_width=128))
    section = json.loads((tmp_path / "bench.json").read_text())["utilisation"]
    assert section["chosen"] == "fp32" and section["chosen_from"].startswith("no engine:hf-cpu build")
    direct, reference, engine = section["rows"]
    assert direct["dtype"] == "fp32" and direct["source"] == "direct forward" and engine["source"].startswith("engine")
    assert reference["source"] == "reference: random-weight decoder, hidden 128, MLP 384, 2 layers"
    assert reference["prompt_tokens"] == direct["prompt_tokens"]
    # 2 layers: attention 4 x 128^2 (q, o: 128 x 128; k, v: 128 x 64 with 2 heads over 1 KV head) -> 3 x 128 x 128,
    # MLP 3 x 128 x 384, two norms of 128; plus the final norm
    assert reference["parameters"] == 2 * (3 * 128 * 128 + 3 * 128 * 384 + 2 * 128) + 128
    assert direct["parameters"] == engine["parameters"] == section["parameters"]
    for row in (direct, reference, engine):
        assert row["peak_gflops"] > 0 and row["prefill_gflops"] > 0 and row["utilisation"] > 0
        assert row["prefill_gflops"] == pytest.approx(
            2 * row["parameters"] * row["prompt_tokens"] / (row["prefill_ms"] / 1e3) / 1e9, rel=0.01, abs=0.01)
    for row in (direct, reference):  # per repeat (its peak and prefill back to back), median over repeats
        assert len(row["utilisation_runs"]) == 2 and row["utilisation"] == pytest.approx(
            statistics.median(row["utilisation_runs"]), abs=1e-3)
    assert "## Utilisation" in (tmp_path / "bench.md").read_text()
    assert "reference: random-weight decoder, hidden 128" in (tmp_path / "bench.md").read_text()


def test_bench_measures_the_bundles_hf_cpu_build_beside_the_fp32_model(hf_cpu_bundle, tmp_path):
    """With a build for this machine, the score cell runs on it too and the default-vs-fp32 ratio is
    taken within the round (the fp32 cell without context reuse is the issue-12 baseline)."""
    import json

    from loadtest.bench_all import BenchConfig, run
    from palr.bundle import Bundle

    run(BenchConfig(bundle=hf_cpu_bundle, out=tmp_path, concurrency=[1], strategies=["inflight"], modes=["score"],
                    requests=2, repeats=1, candidates=6, skip_retrieval=True, utilisation_repeats=0))
    report = json.loads((tmp_path / "bench.json").read_text())
    dtype = str(Bundle.open(hf_cpu_bundle).artifact("engine:hf-cpu").get("dtype"))
    assert report["workload"]["build_dtype"] == dtype
    models = {(c["model"], c["context_reuse"]) for c in report["cells"] if c["mode"] == "score"}
    assert {("hf-cpu build", True), ("fp32 merged", True), ("fp32 merged", False)} <= models
    assert report["ratios"]["default_vs_fp32_prefix_only_latency"] > 0
    # these cells last milliseconds, under what /proc/stat's ticks resolve: each has both shares or neither
    assert all(("others_cpu_pct" in run) == ("steal_pct" in run) for c in report["cells"] for run in c["runs"])
    text = (tmp_path / "bench.md").read_text()
    assert "hf-cpu build" in text and "CPU taken by other work during the cells" in text
    assert "disturbed rounds" in text and isinstance(report["ratio_disturbed_rounds"], dict)


def test_the_retrieval_comparison_leaves_torchs_thread_count_as_it_found_it(tiny_bundle):
    """It runs torch at 1 thread between the LLM cells of the full report: the cells after it (and the
    utilisation section) must keep the process's own thread count (they ran at half speed when it leaked)."""
    import torch

    from loadtest.bench_retrieval import RetrievalBenchConfig, model_latency
    from palr.bundle import Bundle

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        rows = model_latency(Bundle.open(tiny_bundle), RetrievalBenchConfig(bundle=tiny_bundle, threads=1,
                                                                            batch_sizes=[1], model_calls=10))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert {r["engine"] for r in rows} == {"onnxruntime", "torch eager"} and rows[0]["top_k_ids_equal"]


def test_a_failed_retrieve_is_counted_and_the_rpc_cell_still_reports(server_loop, tiny_bundle):
    """One failed Retrieve raised out of the closed loop and lost the whole retrieval benchmark; an RPC cell with no
    answered call crashed computing percentiles of nothing. Against the real retrieval server on port 0."""
    import asyncio
    import math

    from loadtest.bench_retrieval import closed_loop
    from loadtest.report import percentiles_ms
    from tests.ranking_server.test_server import start_retrieval

    retrieval = start_retrieval(server_loop, tiny_bundle)
    try:
        target = retrieval.server.address
        latencies, errors, seconds = asyncio.run(closed_loop(target, ["1", "2"], 10 ** 6, 2, 0.3))  # k too large
        assert latencies == [] and errors["INVALID_ARGUMENT"] > 0 and seconds > 0
        latencies, errors, _ = asyncio.run(closed_loop(target, ["1", "2"], 5, 2, 0.3))
        assert latencies and not errors
    finally:
        server_loop.run(retrieval.drain())
    assert all(math.isnan(v) for v in percentiles_ms([]).values())


def test_a_report_with_nan_is_written_as_strict_json(tmp_path):
    """A cell that answered nothing has NaN percentiles; json.dumps wrote the bare NaN token, which strict readers
    refuse."""
    import json

    from loadtest.report import write_report

    json_path, _ = write_report(tmp_path, "r", {"rows": [{"p50_ms": float("nan"), "ok": 1.5}], "x": (float("inf"),)},
                                "# r")
    assert "NaN" not in json_path.read_text() and "Infinity" not in json_path.read_text()
    assert json.loads(json_path.read_text()) == {"rows": [{"p50_ms": None, "ok": 1.5}], "x": [None]}


@pytest.mark.parametrize("argv, named", [
    (["mixed", "--loads", "2", "--bundle", "no-such-bundle"], "mixed: "),
    (["retrieval", "--modes", "micro batching", "--bundle", "no-such-bundle"], "--modes: unknown"),
    (["gpu", "--generate-k", "1", "--device", "cpu"], "--generate-k must be >= 2"),  # crashed after the whole run
    (["--pattern", "zipf", "--zipf-exponent", "0", "--bundle", "no-such-bundle"], "--zipf-exponent must be > 0"),
    (["--pattern", "zipf", "--zipf-exponent", "nan", "--bundle", "no-such-bundle"], "--zipf-exponent must be > 0"),
])
def test_a_refused_option_is_one_line_and_exit_2_before_anything_runs(argv, named, capsys):
    from loadtest.bench import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert named in error and "Traceback" not in error


@pytest.mark.parametrize("argv, usage", [(["--quick", "--bundle", "b", "--help"], "python -m loadtest.bench all "),
                                         (["mixed", "--quick", "--bundle", "b", "--help"], "python -m loadtest.bench mixed "),
                                         (["--help"], "python -m loadtest.bench [-h] BENCHMARK")])
def test_help_is_the_named_benchmarks_or_alls_when_options_come_first(argv, usage, capsys):
    """`make bench BENCH_ARGS=...` passes the options, then --bundle: `--quick --help` is all's help (it was
    the top-level one, and then `--bundle` was read as the benchmark's name)."""
    from loadtest.bench import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0 and usage in capsys.readouterr().out


def test_the_zipf_exponent_is_checked_only_for_the_zipf_pattern():
    from loadtest.bench_all import BenchConfig

    assert BenchConfig(pattern="uniform", zipf_exponent=0).zipf_exponent == 0  # unused: not refused
    with pytest.raises(ValueError, match="--zipf-exponent must be > 0"):
        BenchConfig(pattern="zipf", zipf_exponent=0)


def test_a_context_hit_is_compared_with_the_same_request_computing_its_context():
    """context_hit_vs_miss_latency pairs request i of the context-reuse cell (a hit) with request i of the
    prefix-only cell (the same prompt, its context computed), median over the hits; the requests that missed give
    the cost of storing a context. Before, a hit (a Zipf head user's repeat) was set against other users' misses."""
    flags = [False, True, True, False, True, True, True, False]
    reuse = [30.0, 10.0, 12.0, 33.0, 9.0, 11.0, 10.0, 36.0]
    prefix_only = [30.0, 25.0, 24.0, 30.0, 30.0, 22.0, 25.0, 30.0]
    top, bottom = summary(0, 1.0, 40, request_ms=reuse, context_hit=flags), summary(0, 1.0, 40, request_ms=prefix_only)
    hits = [10 / 25, 12 / 24, 9 / 30, 11 / 22, 10 / 25]
    assert paired_ratio(top, bottom, Paired("context_hit", True)) == (round(statistics.median(hits), 4), 5)
    assert paired_ratio(top, bottom, Paired("context_hit", False)) == (None, 3)  # under MIN_SPLIT requests
    assert paired_ratio(top, summary(0, 1.0, 40, request_ms=prefix_only[:-1]), Paired("context_hit", True)) == (None, 0)
    runs = {Cell("score", "inflight", 1): [top], Cell("score", "inflight", 1, context_reuse=False): [bottom]}
    assert round_ratios(runs, 1)["context_hit_vs_miss_latency"] == [0.4]
    assert ratio_pairs(runs, 1)["context_hit_vs_miss_latency"] == [5]
    assert "context_store_vs_prefix_only_latency" not in round_ratios(runs, 1)


def test_the_utilisation_goal_reads_the_models_own_prefill_in_the_chosen_precision():
    rows = [{"dtype": "fp32", "source": "direct forward", "utilisation_runs": [0.7, 0.75]},
            {"dtype": "int8", "source": "direct forward", "utilisation_runs": [0.3, 0.29]},
            {"dtype": "int8", "source": "reference decoder", "utilisation_runs": [0.6, 0.61]}]
    assert prefill_vs_peak({"chosen": "int8", "rows": rows}) == [0.3, 0.29]
    assert prefill_vs_peak({"chosen": "bf16", "rows": rows}) == []
    assert goals({PREFILL_RATIO: 0.296})[PREFILL_RATIO]["met"] is False


def test_a_goal_most_of_whose_rounds_were_disturbed_is_not_judged():
    ratios = {"inflight_vs_sequential_throughput_c16_score": 1.2}
    assert goals(ratios, disturbed={})["inflight_vs_sequential_throughput_c16_score"]["met"] is True
    assert goals(ratios, disturbed={"inflight_vs_sequential_throughput_c16_score": 1 / 3})[
        "inflight_vs_sequential_throughput_c16_score"]["met"] is True
    busy = goals(ratios, disturbed={"inflight_vs_sequential_throughput_c16_score": 2 / 3})
    assert busy["inflight_vs_sequential_throughput_c16_score"]["met"] is None
    assert "other work" in busy["inflight_vs_sequential_throughput_c16_score"]["why"]


@pytest.mark.parametrize("benchmark", ["all", "retrieval", "mixed"])
def test_a_missing_bundle_is_one_line_and_exit_1_not_a_traceback(benchmark, tmp_path, capsys):
    from loadtest.bench import main

    with pytest.raises(SystemExit) as exit_:
        main([benchmark, "--bundle", str(tmp_path / "no-such-bundle")])
    assert exit_.value.code == 1
    error = capsys.readouterr().err
    assert "no manifest.json" in error and "Traceback" not in error
