"""Benchmark figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

from loadtest.report import answered


def latency_vs_throughput(rows: list[dict], title: str, path: Path) -> Path:
    """One line per strategy through its concurrency levels: throughput (x) against p95 latency
    (solid) and p50 latency (dashed), each point labelled with its concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        points = sorted((r for r in rows if r["strategy"] == strategy), key=lambda r: r["concurrency"])
        x = [r["throughput_rps"] for r in points]
        (line,) = ax.plot(x, [r["p95_ms"] / 1e3 for r in points], marker="o", label=f"{strategy} p95")
        ax.plot(x, [r["p50_ms"] / 1e3 for r in points], marker=".", linestyle="--", color=line.get_color(),
                alpha=0.6, label=f"{strategy} p50")
        for r in points:
            ax.annotate(f"c={r['concurrency']}", (r["throughput_rps"], r["p95_ms"] / 1e3), textcoords="offset points",
                        xytext=(4, 4), fontsize=7, color=line.get_color())
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("latency (s, log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def spread(row: dict, metric: str) -> tuple[float, float, float]:
    """(median, low, high) of `metric` over the rounds a cell was compared in (`row["runs"]`, `compared_rounds`) that answered (a round that
    answered nothing has NaN percentiles and 0 throughput, left out of the median too); a cell measured once has no
    spread (low = high = its value)."""
    compared = row.get("compared_rounds")  # the rounds every strategy of its setting ran in (bench_all.cell_rows)
    rounds = [r for r in row.get("runs", []) if answered(r) and (compared is None or r.get("round") in compared)]
    values = sorted(v for r in rounds if (v := r.get(metric)) is not None and math.isfinite(v)) or [row[metric]]
    return row[metric], values[0], values[-1]


def by_concurrency(rows: list[dict], title: str, path: Path) -> Path:
    """Two panels, one line per strategy through its concurrency levels: throughput (left) and p95
    latency (right) against concurrency; the bars span the lowest to the highest round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        points = sorted((r for r in rows if r["strategy"] == strategy), key=lambda r: r["concurrency"])
        x = [r["concurrency"] for r in points]
        for ax, metric, scale in ((left, "throughput_rps", 1.0), (right, "p95_ms", 1e-3)):
            mid, low, high = zip(*(spread(r, metric) for r in points))
            y = [m * scale for m in mid]
            errors = [[(m - lo) * scale for m, lo in zip(mid, low)], [(hi - m) * scale for m, hi in zip(mid, high)]]
            ax.errorbar(x, y, yerr=errors, marker="o", capsize=3, label=strategy)
    for ax, label in ((left, "throughput (requests/s)"), (right, "p95 latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (closed-loop callers)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
