"""The bench workload like real traffic, on synthetic inputs: which user each request is for (uniform
or Zipf repeats), the mixed cell's modes and its per-mode percentiles, and which cells a bench runs."""

from __future__ import annotations

from collections import Counter

import pytest

from loadtest.bench_all import BenchConfig, cell_rows, headline_cells, pattern_summary, sweep_cells
from loadtest.bench_ranking import MIXED, Cell, mixed_modes, per_mode, request_order


def test_uniform_order_is_every_user_in_turn():
    assert request_order(4, 10) == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


def test_zipf_order_repeats_the_top_ranked_users_and_is_reproducible():
    order = request_order(100, 2000, "zipf", 1.1, seed=3)
    assert order == request_order(100, 2000, "zipf", 1.1, seed=3) != request_order(100, 2000, "zipf", 1.1, seed=4)
    counts = Counter(order)
    assert counts.most_common(1)[0][0] == 0 and counts[0] > 3 * counts[9] > 0  # ~ 10^1.1 = 12.6x
    assert set(order) <= set(range(100))
    steeper = request_order(100, 2000, "zipf", 2.0, seed=3)
    assert len(set(steeper)) < len(set(order))  # a larger exponent concentrates on fewer users
    with pytest.raises(ValueError, match="unknown request pattern"):
        request_order(10, 5, "pareto")
    with pytest.raises(ValueError, match="exponent"):
        request_order(10, 5, "zipf", 0.0)


def test_mixed_modes_spread_the_generate_share_evenly():
    modes = mixed_modes(20, 0.2)
    assert [i for i, m in enumerate(modes) if m == "generate"] == [4, 9, 14, 19]
    assert Counter(mixed_modes(16, 0.2)) == {"score": 13, "generate": 3}
    with pytest.raises(ValueError):
        mixed_modes(10, 1.0)


def test_per_mode_percentiles_follow_request_order():
    modes = ["score", "score", "generate", "score", "generate"]
    out = per_mode([100.0, 200.0, 5000.0, 300.0, 7000.0], modes)
    assert out["score_p50_ms"] == 200.0 and out["score_requests"] == 3
    assert out["generate_p50_ms"] == 6000.0 and out["generate_p95_ms"] == 6900.0 and out["generate_requests"] == 2
    assert per_mode(None, modes)["score_p95_ms"] is None  # errors: latencies no longer line up


def test_every_strategy_at_concurrency_1_and_16_runs_every_round():
    """Only the ratio cells ran again: static and one-at-a-time at c=1 (and static at c=16) were measured in round 0
    alone, so the strategy plots' bars and medians compared rounds with one another."""
    config = BenchConfig(concurrency=[1, 4, 16], repeats=3, modes=["score", "generate"])
    again = set(headline_cells(config))
    for mode in ("score", "generate"):
        for c in (1, 16):
            assert {Cell(mode, s, c) for s in config.strategies} <= again
        assert not {Cell(mode, s, 4) for s in config.strategies} & again  # the sweep's other levels: round 0


def test_mixed_cells_run_every_round_when_both_modes_run():
    config = BenchConfig(concurrency=[1, 16], repeats=2)
    mixed = [c for c in headline_cells(config) if c.mode == MIXED]
    assert mixed == [Cell(MIXED, "inflight", 16), Cell(MIXED, "static", 16)]
    assert set(mixed) <= set(sweep_cells(config))
    assert not [c for c in headline_cells(BenchConfig(concurrency=[1, 16], modes=["score"])) if c.mode == MIXED]
    assert not [c for c in headline_cells(BenchConfig(concurrency=[1, 16], mixed_share=0)) if c.mode == MIXED]
    with pytest.raises(ValueError, match="mixed-share"):
        BenchConfig(mixed_share=1.0)


def test_mixed_rows_carry_each_modes_percentiles():
    def run(round_, score_p95):
        return {"round": round_, "requests": 16, "throughput_rps": 1.0, "p50_ms": 1.0, "p95_ms": 2.0, "p99_ms": 2.0,
                "mean_ms": 1.0, "mean_batch": 2.0, "errors": {}, "score_p50_ms": 1.0, "score_p95_ms": score_p95,
                "generate_p50_ms": 5.0, "generate_p95_ms": 9.0}
    rows = cell_rows({Cell(MIXED, "inflight", 16): [run(0, 100.0), run(1, 300.0)],
                      Cell("score", "inflight", 16): [{**run(0, 1.0), "score_p95_ms": None}]})
    mixed = next(r for r in rows if r["mode"] == MIXED)
    assert mixed["score_p95_ms"] == 200.0 and mixed["generate_p95_ms"] == 9.0
    assert "score_p95_ms" not in next(r for r in rows if r["mode"] == "score")


def test_mixed_ratios_name_the_rounds_a_busy_machine_measured():
    from loadtest.bench_mixed import ratios

    def row(round_, strategy, p95, **share):
        return {"round": round_, "arrivals": "open", "load": 0.8, "strategy": strategy, "score_p95_ms": p95, **share}

    rows = [row(0, "static", 200.0, steal_pct=0.0), row(0, "inflight", 100.0, steal_pct=0.0),
            row(1, "static", 200.0, others_cpu_pct=30.0), row(1, "inflight", 400.0)]
    assert ratios(rows) == {"open 0.8 x capacity": {"inflight_vs_static_score_p95": 1.25, "rounds": [0.5, 2.0],
                                                    "disturbed_rounds": [1]}}


def test_pattern_summary_counts_repeats():
    config = BenchConfig(requests=4, concurrency=[1, 4], pattern="zipf", zipf_exponent=1.5)
    assert pattern_summary([0, 0, 1, 0, 9, 9], config) == {"pattern": "zipf", "distinct_users": 2,
                                                           "repeat_share": 0.5, "zipf_exponent": 1.5}


def test_zipf_weights_fall_with_rank():
    from loadtest.patterns import zipf_weights

    weights = zipf_weights(4, 1.0)
    assert weights == [1.0, 0.5, 1 / 3, 0.25]
    with pytest.raises(ValueError, match="exponent"):
        zipf_weights(3, 0)


def test_the_mixed_benchmark_runs_closed_and_open_loops_for_both_strategies(tiny_llm_bundle, tmp_path):
    """`python -m loadtest.bench mixed --quick` on the tiny bundle: every cell answered every request, the open
    loop's rate is its share of static batching's closed-loop throughput in the same round."""
    import json

    from loadtest.bench import main

    assert main(["mixed", "--bundle", str(tiny_llm_bundle), "--quick", "--out", str(tmp_path), "--requests", "10",
                 "--loads", "0.5", "0.9"]) == 0
    report = json.loads((tmp_path / "bench_mixed.json").read_text())
    rows = report["rows"]
    assert {(r["arrivals"], r["load"], r["strategy"]) for r in rows} == {
        (arrivals, load, s) for arrivals, load in (("closed", None), ("open", 0.5), ("open", 0.9))
        for s in ("static", "inflight")}
    for row in rows:
        assert row["ok"] == 10 and row["errors"] == {} and row["score_requests"] == 8 and row["generate_requests"] == 2
        assert row["score_p95_ms"] >= row["score_p50_ms"] > 0
    capacity = next(r["throughput_rps"] for r in rows if r["arrivals"] == "closed" and r["strategy"] == "static")
    assert {r["rate_rps"] for r in rows if r["arrivals"] == "open"} == {round(0.5 * capacity, 3), round(0.9 * capacity, 3)}
    assert set(report["ratios"]) == {"closed c16", "open 0.5 x capacity", "open 0.9 x capacity"}
    # what else ran, per cell: both shares, or neither for a cell shorter than /proc/stat's ticks resolve
    assert all(("others_cpu_pct" in row) == ("steal_pct" in row) for row in rows)
    assert all(0 <= row["others_cpu_pct"] <= 100 and 0 <= row["steal_pct"] <= 100 for row in rows if "steal_pct" in row)
    text = (tmp_path / "bench_mixed.md").read_text()
    assert "In-flight / static" in text and "CPU taken by other work during the cells" in text


def test_the_router_benchmark_compares_one_engine_with_a_router_at_once_and_in_turns(tiny_llm_bundle, tmp_path):
    """`python -m loadtest.bench router` on the tiny bundle: every setup answered every request in both loops; the
    open loop arrives at its share of the one engine's closed-loop throughput in that round."""
    import json

    from loadtest.bench import main

    assert main(["router", "--bundle", str(tiny_llm_bundle), "--out", str(tmp_path), "--requests", "10",
                 "--repeats", "1", "--load", "0.5"]) == 0
    rows = json.loads((tmp_path / "bench_router.json").read_text())["rows"]
    assert sorted((r["arrivals"], r["setup"]) for r in rows) == sorted(
        (arrivals, s) for arrivals in ("closed c16", "open") for s in ("one engine", "router, at once", "router, in turns"))
    for row in rows:
        assert row["ok"] == 10 and row["errors"] == {} and row["score_requests"] == 8 and row["generate_requests"] == 2
    capacity = next(r["throughput_rps"] for r in rows if r["arrivals"] == "closed c16" and r["setup"] == "one engine")
    assert {r["rate_rps"] for r in rows if r["arrivals"] == "open"} == {round(0.5 * capacity, 3)}
    assert "in turns" in (tmp_path / "bench_router.md").read_text()


def test_the_answer_cache_cell_answers_each_users_repeats_from_the_cache(tiny_llm_bundle):
    """The cell the server's default runs as: on the real workload of the tiny bundle, requests for users 0, 1, 0,
    0, 1: the model runs the first of each user (its warm-up, without the cache, answered nothing ahead). A p50 is
    reported over MIN_SPLIT requests or more only."""
    from loadtest.bench_ranking import MIN_SPLIT, load_workload, measure
    from ranking_server.engines.config import EngineConfig

    workload = load_workload(tiny_llm_bundle, MIN_SPLIT, candidates=6, generate_k=2)
    cell = Cell("score", "inflight", 1, answer_cache=True)
    summary = measure(cell, workload, EngineConfig(max_batch_size=2), requests=5, order=[0, 1, 0, 0, 1])
    assert summary["ok"] == 5 and summary["errors"] == {}
    assert (summary["answer_hits"], summary["answer_misses"]) == (3, 2)
    assert summary["answer_hit_p50_ms"] is None and summary["answer_miss_p50_ms"] is None  # too few to compare
    users = list(range(MIN_SPLIT))
    summary = measure(cell, workload, EngineConfig(max_batch_size=2), requests=2 * MIN_SPLIT, order=users + users)
    assert (summary["answer_hits"], summary["answer_misses"]) == (MIN_SPLIT, MIN_SPLIT)
    assert summary["answer_hit_p50_ms"] is not None and summary["answer_miss_p50_ms"] is not None


def test_the_first_round_measures_both_sides_of_every_ratio_a_few_cells_apart():
    """Round 0 ran the ratio-only cells (reuse off, answer cache, the build) after the whole sweep, half an hour
    after the in-flight c1 cell they are divided by; with --quick (one round) that was the only value."""
    from loadtest.bench_all import RATIOS

    cells = sweep_cells(BenchConfig(concurrency=[1, 16], build_cells=True))
    assert len(cells) == len(set(cells))
    gaps = {name: abs(cells.index(top) - cells.index(bottom)) for name, (top, bottom, _) in RATIOS.items()
            if top in cells and bottom in cells}
    assert len(gaps) >= 10 and max(gaps.values()) <= len(cells) // 3, gaps
