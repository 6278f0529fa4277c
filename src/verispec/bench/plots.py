"""PNG plots of a benchmark summary (matplotlib, Agg backend: no display needed).

- speedup_by_category.png: median speedup over plain, per category, one bar per configuration;
- acceptance_by_position.png: P(draft token i kept | drafted), per verispec drafting configuration;
- speedup_vs_k.png: measured and predicted speedup, and tokens per pass, against k (draft-k*).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from verispec.bench.runner import BenchConfig


def write_plots(out: Path, configs: list[BenchConfig], summary: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    stats = summary["configs"]
    groups = summary["groups"]
    paths: list[Path] = []

    # 1. Speedup by category.
    others = [c.name for c in configs if c.name != "plain"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(others)) ** 0.5), 4))
    width = 0.8 / max(1, len(others))
    for j, name in enumerate(others):
        values = [stats[name][g]["speedup_median"] or 0.0 for g in groups]
        ax.bar(
            [i + (j - (len(others) - 1) / 2) * width for i in range(len(groups))],
            values,
            width=width,
            label=name,
        )
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_ylabel("median speedup over plain")
    ax.set_title("Speedup by category")
    if others:
        ax.legend(fontsize="small")
    fig.tight_layout()
    paths.append(out / "speedup_by_category.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    # 2. Acceptance by draft position.
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in configs:
        rates = stats[c.name]["all"]["acceptance_by_position"]
        if c.engine == "verispec" and c.speculative and rates:
            ax.plot(range(1, len(rates) + 1), rates, marker="o", label=c.name)
    ax.set_xlabel("draft position")
    ax.set_ylabel("P(kept | drafted)")
    ax.set_ylim(0, 1.05)
    ax.set_title("Acceptance by draft position")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.tight_layout()
    paths.append(out / "acceptance_by_position.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    # 3. Speedup and tokens per pass against k.
    fixed = sorted(
        (
            c
            for c in configs
            if c.drafter == "model" and c.engine == "verispec" and isinstance(c.k, int)
        ),
        key=lambda c: int(c.k),
    )
    ks = [int(c.k) for c in fixed]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    left.plot(
        ks,
        [stats[c.name]["all"]["speedup_median"] or 0.0 for c in fixed],
        marker="o",
        label="measured (median)",
    )
    predicted = [stats[c.name]["all"]["predicted_speedup"] for c in fixed]
    if any(p is not None for p in predicted):
        left.plot(ks, [p or 0.0 for p in predicted], marker="x", linestyle="--", label="predicted")
    left.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    left.set_xticks(ks)
    right.set_xticks(ks)
    left.set_xlabel("draft length k")
    left.set_ylabel("speedup over plain")
    left.legend(fontsize="small")
    right.plot(ks, [stats[c.name]["all"]["tokens_per_pass"] or 0.0 for c in fixed], marker="o")
    right.set_xlabel("draft length k")
    right.set_ylabel("tokens per target pass")
    fig.suptitle("Draft model: speedup and tokens per pass against k")
    fig.tight_layout()
    paths.append(out / "speedup_vs_k.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
