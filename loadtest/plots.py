"""Benchmark figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path


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
