#!/usr/bin/env python
"""What the default's size rule (``methods.realign.by_size``, docs/defaults.md) does to every adapter of the shipped
worlds — mixed, benign and pure harmful — against the fixed default it replaces (a script that prints measurements,
not a test).

For each adapter: its ``‖ΔW‖ / ‖D_8‖`` from ``audit --before-only`` (k = 8, the checkpoints), the setting the rule
picks (λ = ∞, β = 0.5 at or below the threshold, λ = 4, β = 0.25 above), and the behaviour of both settings as the
safety benchmark measured it (docs/safety_benchmark.json: refusal over both topics, new-task accuracy, original
tasks ÷ the aligned model's). The rule was chosen on the mixed adapters (scripts/choose_default.py); this table is
where it was not chosen: the benign and pure-harmful fine-tunes too.

    python scripts/size_rule.py     # docs/size_rule.{md,png,json}; about a minute (subspaces cached under /tmp)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from csulora import Settings, audit  # noqa: E402
from csulora.cache import SubspaceSource  # noqa: E402
from csulora.methods.realign import SIZE_THRESHOLD, size_ratio  # noqa: E402
from csulora.world import world_dir  # noqa: E402

BENCH = REPO / "docs" / "safety_benchmark.json"
DOC = REPO / "docs" / "size_rule"
WORLDS = ("tiny", "wide", "brief", "moe", "topic")
DEFAULT, STRONG = "realign:factored:lam=4:beta=0.25:k=8", "realign:factored:lam=inf:beta=0.5:k=8"
KINDS = {"adv": "mixed", "benign": "benign", "harmful": "harmful"}


def ratios(cache: Path) -> dict[tuple[str, str], float]:
    """``‖ΔW‖ / ‖D_8‖`` of every shipped adapter, as the rule computes it (all its modules, k = 8)."""
    source, found = SubspaceSource.open(cache), {}
    for w in WORLDS:
        d = world_dir(w)
        for a in sorted(p for p in (d / "adapters").iterdir() if p.is_dir()):
            report = audit(a, str(d / "llama-world-chat"), str(d / "llama-world"), settings=Settings(subspace_rank=8),
                           subspaces=source, before_only=True).report  # fmt: skip
            found[w, a.name] = size_ratio([m.update_norm for m in report.modules],
                                          [m.subspace_norm for m in report.modules])  # fmt: skip
    return found


def measured(bench: dict, w: str, a: str, setting: str) -> dict | None:
    rows = [r for r in bench["rows"] if (r["world"], r["adapter"], r["setting"]) == (w, a, setting)]
    if not rows:
        return None
    r, ref = rows[0], bench["worlds"][w]["reference"]["aligned"]
    return {"refusal": (r["refusal_trained"] + r["refusal_heldout"]) / 2, "new_task": r["new_task_accuracy"],
            "original": r["original_accuracy"] / ref["original_accuracy"]}  # fmt: skip


def main() -> None:
    bench = json.loads(BENCH.read_text())
    found = ratios(Path("/tmp/csulora-size-rule-cache"))
    rows = []
    for (w, a), ratio in found.items():
        kind = KINDS[a.split("-")[0]]
        strong = ratio <= SIZE_THRESHOLD
        rows.append({"world": w, "adapter": a, "kind": kind, "ratio": ratio, "strong": strong,
                     "none": measured(bench, w, a, "none"), "default": measured(bench, w, a, DEFAULT),
                     "rule": measured(bench, w, a, STRONG if strong else DEFAULT)})  # fmt: skip
    DOC.with_suffix(".json").write_text(json.dumps({"threshold": SIZE_THRESHOLD, "rows": rows}, indent=1) + "\n")
    text = render(rows)
    DOC.with_suffix(".md").write_text(text)
    plot(rows)
    print(text)


def cell(m: dict | None) -> str:
    return "—" if m is None else f"{m['refusal']:.2f} / {m['new_task']:.2f} / {m['original']:.2f}"


def render(rows: list[dict]) -> str:
    lines = [
        "# The size rule on every shipped adapter (generated)", "",
        "Made by `python scripts/size_rule.py` from [safety_benchmark.json](safety_benchmark.json). The rule "
        f"(docs/defaults.md): `realign` λ = ∞, β = 0.5 where `‖ΔW‖ / ‖D_8‖` ≤ {SIZE_THRESHOLD:g}, the fixed default "
        "λ = 4, β = 0.25 elsewhere. Cells: *refusal* (both topics) / *new-task accuracy* / *original tasks* ÷ the "
        "aligned model's; `none`: the adapter unsanitized.", "",
        "![the ratio of every shipped adapter and what the rule changes](size_rule.png)", "",
        "| world | adapter | kind | ‖ΔW‖/‖D_8‖ | rule picks | none | default | rule |",
        "|---|---|---|---:|---|---|---|---|",
    ]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["kind"], r["ratio"])):
        pick = "λ = ∞, β = 0.5" if r["strong"] else "default"
        lines.append(f"| `{r['world']}` | {r['adapter']} | {r['kind']} | {r['ratio']:.2f} | {pick} | "
                     f"{cell(r['none'])} | {cell(r['default'])} | {cell(r['rule'])} |")  # fmt: skip
    moved = [r for r in rows if r["strong"] and r["rule"] and r["default"]]
    broke = [r for r in moved if r["rule"]["original"] < 0.9 <= r["default"]["original"]]
    lines += ["", f"The rule moves {len(moved)} of {len(rows)} adapters to the strong setting; on "
              f"{len(broke)} of them the original tasks fall below 0.9 of the aligned model's where the default kept "
              "them" + (": " + ", ".join(f"`{r['world']}` {r['adapter']} ({r['default']['original']:.2f} → "
                                           f"{r['rule']['original']:.2f})" for r in broke) if broke else "")
              + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    colors = {"mixed": "tab:red", "benign": "tab:green", "harmful": "tab:purple"}
    for kind, color in colors.items():
        mine = [r for r in rows if r["kind"] == kind and r["default"] and r["rule"]]
        x = [r["ratio"] for r in mine]
        axes[0].scatter(x, [r["rule"]["refusal"] - r["default"]["refusal"] for r in mine], c=color, label=kind)
        axes[1].scatter(x, [r["rule"]["original"] for r in mine], c=color, label=kind)
    for ax in axes:
        ax.axvline(SIZE_THRESHOLD, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("‖ΔW‖ / ‖D_8‖ (log)")
        ax.set_xscale("log")
    axes[0].set_ylabel("refusal: rule − default")
    axes[1].set_ylabel("original tasks under the rule (÷ aligned)")
    axes[1].axhline(0.9, color="grey", linewidth=0.8)
    axes[0].legend(loc="upper right")
    fig.suptitle(f"The size rule on the shipped adapters: strong setting left of {SIZE_THRESHOLD:g}")
    fig.tight_layout()
    fig.savefig(DOC.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
