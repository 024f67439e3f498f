"""The report's figures: methods x groups heat maps per split and the accuracy/consistency/personalization trade-off.

PNGs drawn with matplotlib's Agg renderer (no display needed) and saved without Software/date metadata, so the same
results give byte-identical images. `trialign.report.render_plots` names them and the renderers place them.
"""

from __future__ import annotations

import io
from typing import Any

from trialign.errors import TriAlignError
from trialign.report import Report, split_groups

def _colours(methods: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    # No Software/date metadata: the same results give byte-identical images.
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def group_chart(report: Report, split: str) -> bytes:
    """Two methods x groups heat maps with the values in the cells: per-group accuracy, and how often each group's
    answer equals the neutral (reference) user's on the same item (from the per-item rows; left blank without them).
    A grid stays legible with 10 methods x 9 groups, where 90 bars would not."""
    import numpy as np
    from matplotlib.figure import Figure

    from trialign.comparison import read_item_arrays

    evaluations = report.in_split(split)
    groups = split_groups(evaluations)
    accuracy = np.array([[e.metric(f"acc/{g}")[0] if e.metric(f"acc/{g}")[0] is not None else np.nan
                          for g in groups] for e in evaluations], dtype=float)
    agreement = np.full_like(accuracy, np.nan)
    for row, e in enumerate(evaluations):
        reference = e.document.reference
        if reference not in e.groups:
            continue
        try:
            arrays = read_item_arrays(e.path.parent, e.groups)
        except TriAlignError:
            continue
        same = arrays.answers == arrays.answers[:, [e.groups.index(reference)]]
        for col, g in enumerate(groups):
            if g in e.groups:
                agreement[row, col] = same[:, e.groups.index(g)].mean()
    width = 2 * (0.55 * len(groups) + 1.0) + 2.0
    fig = Figure(figsize=(max(7.0, width), 0.45 * len(evaluations) + 2.2))
    reference = {e.document.reference for e in evaluations}
    labels = [f"{g} (ref.)" if g in reference else g for g in groups]
    for k, (values, title) in enumerate(((accuracy, "accuracy"), (agreement, "same answer as the neutral user"))):
        ax = fig.add_subplot(1, 2, k + 1)
        ax.imshow(np.nan_to_num(values, nan=0.0), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, "–" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if not np.isnan(v) and v > 0.6 else "white")
        ax.set_xticks(range(len(groups)), labels, rotation=35, ha="right", fontsize=7)
        ax.set_yticks(range(len(evaluations)), [e.method for e in evaluations] if k == 0 else [], fontsize=8)
        ax.set_title(f"{title}: {split}", fontsize=9)
    fig.subplots_adjust(left=0.18, right=0.98, bottom=0.3, wspace=0.08)
    return _png(fig)


def tradeoff_chart(report: Report) -> bytes:
    """Mean accuracy vs. consistency, colour = personalization; one panel per split, one point per method."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    n = len(report.splits)
    fig = Figure(figsize=(4.2 * n + 1.2, 4.0))
    axes = fig.subplots(1, n, sharex=True, sharey=True, squeeze=False)[0]
    norm, cmap = Normalize(0.0, 1.0), colormaps["viridis"]
    for ax, split in zip(axes, report.splits):
        for e in report.in_split(split):
            (x, xlo, xhi), (y, ylo, yhi) = e.metric("acc_mean"), e.metric("consistency")
            if x is None or y is None:
                continue
            pers = e.metric("personalization_mean")[0]
            if None not in (xlo, xhi, ylo, yhi):
                ax.errorbar([x], [y], xerr=[[max(x - xlo, 0)], [max(xhi - x, 0)]],
                            yerr=[[max(y - ylo, 0)], [max(yhi - y, 0)]], fmt="none", ecolor="#999999",
                            elinewidth=0.8)
            ax.scatter([x], [y], s=70, color=cmap(norm(pers)) if pers is not None else "#cccccc",
                       edgecolors="#222222", linewidths=0.6, zorder=3)
            ax.annotate(e.method, (x, y), xytext=(5, 4), textcoords="offset points", fontsize=8)
        ax.set_title(split, fontsize=10)
        ax.set_xlabel("accuracy (mean over groups)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("consistency")
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), label="personalization", fraction=0.04)
    return _png(fig)
