"""Bar chart of msda's speedup over the reference per shape (forward, forward+backward, memory).

matplotlib is imported only when a chart is drawn: the benchmarks measure and
write their JSON and markdown without it.
"""

from __future__ import annotations

from typing import Any


def plot_speedups(rows: list[dict[str, Any]], path: str, title: str) -> bool:
    """One group of bars per (case, device): fwd speedup, fwd+bwd speedup, memory reduction; log scale.

    Returns False (and writes nothing) when matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")  # no display on the benchmark machines
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in rows if "speedup_forward" in r]
    labels = [r["case"] + ("" if r["device"] == "cpu" else f"\n({r['device']})") for r in rows]
    series = [
        ("forward", [r["speedup_forward"] for r in rows]),
        ("forward+backward", [r["speedup_forward_backward"] for r in rows]),
        ("peak memory (ref / msda)", [r["memory_reduction"] for r in rows]),
    ]
    x = np.arange(len(rows))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.5))
    for i, (name, values) in enumerate(series):
        bars = ax.bar(x + (i - 1) * width, values, width, label=name)
        ax.bar_label(bars, labels=[f"{v:.0f}" if v >= 10 else f"{v:.2g}" for v in values], fontsize=7, padding=1)
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("msda advantage over the reference (x, log scale)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
