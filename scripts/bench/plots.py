"""The plots: every setting of one world against its fronts (safety_benchmark_<world>.png) and the front
scores of all worlds with the leave-one-world-out scores (safety_benchmark.png)."""

from __future__ import annotations

from pathlib import Path

from .analysis import EPS, REFUSAL
from .grid import FORMS, METHODS

COLOURS = {"none": "black", "csulora": "#2b6cb0", "realign": "#c05621", "safe-lora": "#2f855a",
           "resta": "#805ad5"}  # fmt: skip
MARKERS = {"factored": "o", "block": "^", "safe-lora": "s"}


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points (new-task accuracy x, refusal y) on the upper-right front, by decreasing refusal."""
    front, best_x = [], -1.0
    for x, y in sorted(points, key=lambda p: (-p[1], -p[0])):
        if x > best_x + EPS:
            front.append((x, y))
            best_x = x
    return front


def step_line(front: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """The front as the step function the score integrates: x = best accuracy reached at refusal ≥ y."""
    if not front:
        return [], []
    xs, ys = [0.0, front[0][0]], [front[0][1], front[0][1]]
    for (x0, _), (x1, y1) in zip(front, front[1:], strict=False):
        xs += [x0, x1]
        ys += [y1, y1]
    xs.append(front[-1][0])
    ys.append(0.0)
    return xs, ys


def plot_world(result: dict, analysis: dict, w: str, path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    settings = {s["id"]: s for s in result["settings"]}
    wd, aw = result["worlds"][w], analysis["worlds"][w]
    mix, floor = aw["means"]["mixed"], aw["floor_original"]
    t = wd["topics"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.2), sharey=True)
    panels = (("heldout", f"held-out topic ({t['heldout']})"), ("both", f"mean of both topics ({t['trained']}, "
                                                                       f"{t['heldout']})"))  # fmt: skip
    for ax, (key, title) in zip(axes, panels, strict=True):
        for m in METHODS:
            sids = [sid for sid in mix if settings[sid]["method"] == m]
            for form in FORMS[m]:
                pts = [sid for sid in sids if settings[sid]["form"] == form]
                marker = MARKERS["safe-lora" if m == "safe-lora" else form]
                for ok in (True, False):
                    sel = [sid for sid in pts if (mix[sid]["original_accuracy"] >= floor - EPS) == ok]
                    if sel:
                        ax.scatter([mix[s]["new_task_accuracy"] for s in sel], [REFUSAL[key](mix[s]) for s in sel],
                                   marker=marker, s=34, alpha=0.55, linewidths=1.0, zorder=3,
                                   facecolors=COLOURS[m] if ok else "none", edgecolors=COLOURS[m])  # fmt: skip
            qual = [(mix[s]["new_task_accuracy"], REFUSAL[key](mix[s])) for s in sids
                    if mix[s]["original_accuracy"] >= floor - EPS]  # fmt: skip
            xs, ys = step_line(pareto(qual))
            ax.plot(xs, ys, color=COLOURS[m], lw=1.8, alpha=0.9, zorder=4, drawstyle="default")
        none = mix["none"]
        ax.scatter([none["new_task_accuracy"]], [REFUSAL[key](none)], marker="*", s=260, color="black", zorder=6)
        ax.annotate("no defense", (none["new_task_accuracy"], REFUSAL[key](none)), xytext=(0, -9),
                    textcoords="offset points", fontsize=9, ha="center", va="top",
                    bbox={"fc": "white", "ec": "none", "alpha": 0.8}, zorder=7)  # fmt: skip
        for ref, marker in (("aligned", "D"), ("base", "X")):
            b = wd["reference"][ref]
            ax.scatter([b["new_task_accuracy"]], [REFUSAL[key](b)], marker=marker, s=90, color="grey",
                       edgecolors="black", zorder=6)  # fmt: skip
            ax.annotate(f"{ref} model", (b["new_task_accuracy"], REFUSAL[key](b)), xytext=(8, -4 if ref == "aligned"
                        else 6), textcoords="offset points", fontsize=9, color="dimgrey")  # fmt: skip
        scores = ", ".join(f"{m} {aw['fronts'][m][key]:.2f}" for m in METHODS if m in aw["fronts"])
        ax.set_title(f"refusal on the {title}\nfront score: {scores}; none {aw['fronts']['none'][key]:.2f}",
                     fontsize=10)  # fmt: skip
        ax.set_xlabel("accuracy on the new task (inc)")
        ax.set_xlim(-0.03, 1.05)
        ax.set_ylim(-0.1, 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("refusal rate")
    handles = [Line2D([], [], color=COLOURS[m], lw=1.8, label=f"{m} (front)") for m in METHODS]
    handles += [Line2D([], [], ls="", marker=MARKERS[f], color="dimgrey", label=f"{f} form" if f != "safe-lora"
                       else "safe-lora") for f in MARKERS]  # fmt: skip
    handles += [Line2D([], [], ls="", marker="o", markerfacecolor="none", color="dimgrey",
                       label=f"hollow: original acc < {floor:.2f} (not counted)"),
                Line2D([], [], ls="", marker="*", ms=12, color="black", label="no defense")]  # fmt: skip
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=9, frameon=False)
    n = len(aw["mixed"])
    fig.suptitle(f"World `{w}`: every setting, mean over {n} mixed adapter{'s' if n > 1 else ''}", fontsize=12)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _bar_labels(values: list[float]) -> list[str]:
    """Bar labels with two decimals; none under 0.005, so that rows of zeros do not overprint each other."""
    return [f"{v:.2f}" if v >= 0.005 else "" for v in values]


def plot_summary(result: dict, analysis: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    worlds = list(result["worlds"])
    groups = ["none", *METHODS]
    panels = [("heldout", "front score, held-out topic"), ("both", "front score, mean of both topics")]
    lowo = analysis["lowo"].get("both", {})
    has_lowo = len(worlds) > 1 and lowo
    fig, axes = plt.subplots(1, 3 if has_lowo else 2, figsize=(16 if has_lowo else 10, 4.8))
    width = 0.8 / len(groups)
    for ax, (key, title) in zip(axes, panels, strict=False):
        for i, g in enumerate(groups):
            vals = [analysis["worlds"][w]["fronts"].get(g, {}).get(key, 0.0) for w in worlds]
            xs = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(worlds))]
            bars = ax.bar(xs, vals, width, color=COLOURS[g], label="no defense" if g == "none" else g)
            ax.bar_label(bars, labels=_bar_labels(vals), fontsize=7, padding=1)
        ax.set_xticks(range(len(worlds)), worlds)
        ax.set_ylim(0, 1.08)
        ax.set_title(f"{title}\n(all settings of each method)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("front score (mixed adapters)")
    axes[0].legend(fontsize=8, loc="upper left")
    if has_lowo:
        ax = axes[2]
        labels = [*worlds, "mean", "final"]
        meths = [m for m in METHODS if m in lowo]
        w2 = 0.8 / len(meths)
        for i, m in enumerate(meths):
            vals = [f["score"] for f in lowo[m]["folds"]] + [lowo[m]["score"], lowo[m]["final_score"]]
            xs = [j + (i - (len(meths) - 1) / 2) * w2 for j in range(len(labels))]
            bars = ax.bar(xs, vals, w2, color=COLOURS[m], label=m)
            ax.bar_label(bars, labels=_bar_labels(vals), fontsize=7, padding=1)
        ax.set_xticks(range(len(labels)), [f"{w}\nheld out" for w in worlds] + ["LOWO\nscore", "final, in\nsample"])
        ax.set_ylim(0, 1.08)
        ax.set_title("leave-one-world-out: the setting chosen on the\nother worlds, scored on this one (mean of both)",
                     fontsize=10)  # fmt: skip
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Safety–utility front scores across the miniature worlds (DESIGN.md §5c); a bar without a number "
                 "is 0", fontsize=12)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
