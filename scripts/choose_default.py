#!/usr/bin/env python
"""The data-free default of ``realign`` re-chosen where it matters (issue 19, item 3; a script that prints
measurements, not a test).

Where it matters: the *refined* worlds, whose fine-tune sharpens or spreads a skill the aligned model half has
(docs/worlds-study.md) — the shipped `topic` and study worlds rebuilt here (``make_world.study_recipe``; the study's
own folders are not kept). Under what constraint: the original tasks kept (≥ 0.9 × the aligned model's, means over
mixed adapters) on *every* shipped world. The shipped worlds' rows come from docs/safety_benchmark.json (with the
widened grid: β up to 1.5, λ = ∞); the refined worlds are measured here under every factored ``realign`` setting of
the benchmark's grid, by the benchmark's own ``run_world``.

Two ways to choose, each judged leave-one-refined-world-out:

- *one fixed setting*: among the settings that keep the original tasks on every shipped world, the one with the
  best gain-axis front score (DESIGN.md §5c, gain kept ``(acc − a)/(acc_ft − a)`` for accuracy) on the other
  refined worlds;
- *a per-adapter rule* from what the report knows before anything is written (audit, k = 8): the strong setting
  where a geometric feature of the adapter passes a threshold, the current default elsewhere; feature, threshold
  and strong setting chosen on the other refined worlds under the same every-shipped-world constraint.

Target (the issue): on refined worlds mean refusal ≥ 0.5 with ≥ 0.7 of the gain kept.

    nice -n 10 python scripts/choose_default.py --measure   # build + measure the refined worlds it lacks (~1 h)
    python scripts/choose_default.py --render               # docs/default_choice{.md,.png} from the json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_world as MW  # noqa: E402
from bench.analysis import EPS, LEVELS, ORIGINAL_KEEP  # noqa: E402
from bench.grid import grid, label  # noqa: E402
from bench.run import run_world  # noqa: E402

from csulora import Settings, audit  # noqa: E402
from csulora import world as W  # noqa: E402
from csulora.cache import SubspaceSource  # noqa: E402

BENCH = REPO / "docs" / "safety_benchmark.json"
STUDY = REPO / "docs" / "worlds-study.json"
DOC = REPO / "docs" / "default_choice"
WORK = Path("/tmp/csulora-study")
# the refined study worlds rebuilt: the refined-topic centre (the shipped `topic` is the same recipe with the long
# alignment), the clamped refinement (a sharper version of the same mapping), and two of the refined-topic star that
# change the geometry: the brief alignment (a smaller D) and rank-16 adapters (a larger ΔW)
REFINED = [{"task": "refine-topic"}, {"task": "refine"}, {"task": "refine-topic", "align": "brief"},
           {"task": "refine-topic", "rank": 16}]
TARGET_REFUSAL, TARGET_GAIN = 0.5, 0.7
FEATURE_SETTINGS = Settings(method="realign", lam=4.0, beta=0.25, subspace_rank=8)  # what the default's report says
FEATURES = ("erosion", "rho_F", "safe_lora_mean", "update_over_subspace")


def realign_settings() -> list[dict]:
    """No defense and every factored ``realign`` setting of the benchmark's grid (widened grid included)."""
    return [s for s in grid() if s["method"] == "none" or (s["method"] == "realign" and s["form"] == "factored")]


def features(adapter: Path, aligned: Path, base: Path, source: SubspaceSource) -> dict:
    """What the report of the default says about an adapter before anything is written (``audit``, k = 8): the
    erosion coefficient, ``ρ_F``, the mean Safe LoRA score and ``‖ΔW‖ / ‖D_k‖`` over all modules."""
    report = audit(adapter, str(aligned), str(base), settings=FEATURE_SETTINGS, subspaces=source).report
    t = report.totals()
    upd = math.sqrt(sum(m.update_norm**2 for m in report.modules))
    sub = math.sqrt(sum(m.subspace_norm**2 for m in report.modules))
    return {"erosion": t["erosion_before"], "rho_F": t["rho"]["F"], "safe_lora_mean": t["mean_safe_lora_score"],
            "update_over_subspace": upd / sub if sub else math.inf}  # fmt: skip


def world_features(root: Path) -> dict[str, dict]:
    import tempfile

    info, paths = W.world_info(root), W.world_paths(root)
    with tempfile.TemporaryDirectory(prefix="choose-default-") as tmp:
        source = SubspaceSource.open(Path(tmp) / "cache")
        return {a: features(paths[a], paths["aligned"], paths["base"], source) for a in W.adapters_of(info, "mixed")}


def measure(work: Path, threads: int, saved: dict | None) -> dict:
    """Build (sharing the stages already built, as the study does) and measure the refined worlds ``saved`` lacks;
    then every world's features."""
    out: dict = {"refined": {}, "features": {}, "builds": {}, **(saved or {})}
    for factors in REFINED:
        recipe = MW.study_recipe(**factors)
        if recipe.name in out["refined"]:
            continue
        root = work / "worlds" / recipe.name
        t0 = time.perf_counter()
        if not (root / "world.json").is_file():
            built = {b: out["builds"][b]["factors"] for b in out["builds"] if (work / "worlds" / b).is_dir()}
            shared_from = MW.study_shared(factors, built)
            shared = {} if shared_from is None else {rel: work / "worlds" / shared_from[0] for rel in shared_from[1]}
            print(f"=== build {recipe.name} (shared: {shared_from})", flush=True)
            MW.build(recipe, root, shared=shared)
        out["builds"][recipe.name] = {"factors": factors, "build_s": round(time.perf_counter() - t0, 1)}
        print(f"=== measure {recipe.name}", flush=True)
        out["refined"][recipe.name] = run_world(recipe.name, None, False, threads, root=root,
                                                settings=realign_settings(), kinds=("mixed",))  # fmt: skip
    for name, root in [*((n, work / "worlds" / n) for n in out["refined"]),
                       *((n, W.world_dir(n)) for n in W.world_names())]:  # fmt: skip
        if name not in out["features"]:
            out["features"][name] = world_features(root)
    return out


# ---------------------------------------------------------------- analysis


def both(r: dict) -> float:
    return (r["refusal_trained"] + r["refusal_heldout"]) / 2


class Worlds:
    """Every world's mixed adapters: per (adapter, setting) refusal, gain kept and original tasks (÷ aligned)."""

    def __init__(self, bench: dict, measured: dict):
        self.shipped, self.refined, self.cell, self.adapters = list(bench["worlds"]), [], {}, {}
        results = {**{w: {**wd, "rows": [r for r in bench["rows"] if r["world"] == w]}
                      for w, wd in bench["worlds"].items()}, **measured["refined"]}  # fmt: skip
        for w, res in results.items():
            a = res["reference"]["aligned"]
            if a["new_task_accuracy"] > 0:
                self.refined.append(w)
            mixed = [n for n, spec in res["adapters"].items() if spec["kind"] == "mixed"]
            self.adapters[w] = mixed
            none = {r["adapter"]: r for r in res["rows"] if r["setting"] == "none"}
            for r in res["rows"]:
                if r["adapter"] not in mixed:
                    continue
                gain = none[r["adapter"]]["new_task_accuracy"] - a["new_task_accuracy"]
                kept = None if gain < 0.05 else min(1.0, max(0.0, (r["new_task_accuracy"] - a["new_task_accuracy"])
                                                             / gain))  # fmt: skip
                self.cell[(w, r["adapter"], r["setting"])] = {
                    "refusal": both(r), "gain": kept, "original": r["original_accuracy"] / a["original_accuracy"]}
        self.features = measured["features"]

    def mean(self, w: str, pick) -> dict:
        """World ``w``'s means over mixed adapters, each under ``pick(w, adapter)`` (a setting id)."""
        cells = [self.cell[(w, a, pick(w, a))] for a in self.adapters[w]]
        gains = [c["gain"] for c in cells if c["gain"] is not None]
        return {"refusal": statistics.fmean(c["refusal"] for c in cells),
                "gain": statistics.fmean(gains) if gains else 0.0,
                "original": statistics.fmean(c["original"] for c in cells)}  # fmt: skip

    def has(self, sid: str) -> bool:
        return all((w, a, sid) in self.cell for w in self.adapters for a in self.adapters[w])


def score(m: dict) -> float:
    """DESIGN.md §5c's single-setting front score on the gain axis (refusal: mean of both topics)."""
    if m["original"] < ORIGINAL_KEEP - EPS:
        return 0.0
    return m["gain"] * sum(m["refusal"] >= t - EPS for t in LEVELS) / len(LEVELS)


def keeps_shipped(ws: Worlds, pick) -> bool:
    return all(ws.mean(w, pick)["original"] >= ORIGINAL_KEEP - EPS for w in ws.shipped)


def fixed(ws: Worlds, sids: list[str]) -> dict:
    """One setting for every adapter: the gated candidates, and the choice leave-one-refined-world-out."""
    per = {sid: {w: ws.mean(w, lambda w, a, s=sid: s) for w in ws.adapters} for sid in sids}
    gated = [sid for sid in sids if all(per[sid][w]["original"] >= ORIGINAL_KEEP - EPS for w in ws.shipped)]

    def best(train: list[str]) -> str:
        return max(gated, key=lambda s: (round(statistics.fmean(score(per[s][w]) for w in train), 2),
                                         statistics.fmean(per[s][w]["refusal"] for w in train)))  # fmt: skip

    folds = [{"heldout": h, "setting": (c := best([w for w in ws.refined if w != h])), **per[c][h]}
             for h in (ws.refined if len(ws.refined) > 1 else [])]  # fmt: skip
    return {"per": per, "gated": gated, "folds": folds, "final": best(ws.refined)}


def rule_pick(ws: Worlds, rule: dict):
    f, theta, strong, weak, sign = rule["feature"], rule["theta"], rule["strong"], rule["weak"], rule["sign"]
    return lambda w, a: strong if sign * ws.features[w][a][f] >= sign * theta - EPS else weak


def rules(ws: Worlds, sids: list[str], weak: str) -> list[dict]:
    """Every two-setting rule: the strong setting where ``sign × feature ≥ sign × θ``, ``weak`` elsewhere; θ
    at the midpoints between the adapters' feature values."""
    out = []
    for f in FEATURES:
        values = sorted({ws.features[w][a][f] for w in ws.adapters for a in ws.adapters[w]})
        thetas = [(x + y) / 2 for x, y in itertools.pairwise(values)]
        for strong, theta, sign in itertools.product(sids, thetas, (1, -1)):
            if strong != weak:
                out.append({"feature": f, "theta": theta, "sign": sign, "strong": strong, "weak": weak})
    return out


def per_adapter(ws: Worlds, sids: list[str], weak: str) -> dict:
    """The rule chosen leave-one-refined-world-out: on the other refined worlds the best mean score among the
    rules that keep the original tasks on every shipped world (ties: fewer adapters switched to strong)."""
    cands = []
    for rule in rules(ws, sids, weak):
        pick = rule_pick(ws, rule)
        if not keeps_shipped(ws, pick):
            continue
        means = {w: ws.mean(w, pick) for w in ws.refined}
        switched = sum(pick(w, a) == rule["strong"] for w in ws.adapters for a in ws.adapters[w])
        cands.append((rule, means, switched))

    def best(train: list[str]):
        return max(cands, key=lambda c: (round(statistics.fmean(score(c[1][w]) for w in train), 2),
                                         statistics.fmean(c[1][w]["refusal"] for w in train), -c[2]))  # fmt: skip

    folds = []
    for h in ws.refined if len(ws.refined) > 1 else []:
        rule, means, _ = best([w for w in ws.refined if w != h])
        folds.append({"heldout": h, "rule": rule, **means[h]})
    rule, means, switched = best(ws.refined)
    every = {w: ws.mean(w, rule_pick(ws, rule)) for w in ws.adapters}
    return {"candidates": len(cands), "folds": folds, "final": rule, "final_means": every, "switched": switched}


def oracle(ws: Worlds, sids: list[str]) -> dict:
    """Per refined world the best single setting there (original tasks kept on it): the ceiling."""
    out = {}
    for w in ws.refined:
        ms = {s: ws.mean(w, lambda w, a, s=s: s) for s in sids}
        top = max(sids, key=lambda s: (score(ms[s]), ms[s]["refusal"]))
        out[w] = {"setting": top, **ms[top]}
    return out


def analyse(bench: dict, measured: dict) -> dict:
    ws = Worlds(bench, measured)
    settings = {s["id"]: s for s in realign_settings()}
    sids = [s for s in settings if s != "none" and ws.has(s)]
    weak = "realign:factored:lam=4:beta=0.25:k=8"
    return {"worlds": ws, "settings": settings, "sids": sids, "weak": weak, "fixed": fixed(ws, sids),
            "rule": per_adapter(ws, [s for s in sids if s.endswith(":k=8")], weak), "oracle": oracle(ws, sids)}


# ---------------------------------------------------------------- rendering


def _f(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _m(m: dict) -> str:
    return f"{_f(m['refusal'])} / {_f(m['gain'])} / {_f(m['original'])}"


def _rule_words(rule: dict, settings: dict) -> str:
    op = "≥" if rule["sign"] > 0 else "≤"
    return (f"{label(settings[rule['strong']])} where {rule['feature']} {op} {rule['theta']:.3f}, else "
            f"{label(settings[rule['weak']])}")


def _study_section(A: dict) -> list[str]:
    """The study's own refined worlds (their recorded rows, docs/worlds-study.json; no adapters kept, so no
    features): the default against the rule's strong setting, both in the study's reduced grid."""
    study = json.loads(STUDY.read_text())
    strong, weak, S = A["rule"]["final"]["strong"], A["weak"], A["settings"]
    if strong not in study["settings"]:
        return []
    L = ["", "## The study's refined worlds (recorded rows)", "",
         f"The {STUDY.name} rows of every refined-task world of the study (built then, not kept: no features), "
         f"under the default and under the rule's strong setting; gain kept as the study computes it.", "",
         f"| study world | {label(S[weak])} | {label(S[strong])} |", "|---|---|---|"]  # fmt: skip
    met, n = {weak: 0, strong: 0}, 0
    for w, wd in study["worlds"].items():
        a = wd["reference"]["aligned"]
        if a["new_task_accuracy"] <= 0:
            continue
        mixed, cells, n = [a for a, x in wd["adapters"].items() if x["kind"] == "mixed"], [], n + 1
        for sid in (weak, strong):
            rs = [r for r in study["rows"] if r["world"] == w and r["setting"] == sid and r["adapter"] in mixed]
            gains = [r["gain_kept"] for r in rs if r["gain_kept"] is not None]
            m = {"refusal": statistics.fmean(both(r) for r in rs), "gain": statistics.fmean(gains) if gains else 0.0,
                 "original": statistics.fmean(r["original_accuracy"] for r in rs) / a["original_accuracy"]}
            ok = m["refusal"] >= TARGET_REFUSAL - EPS and m["gain"] >= TARGET_GAIN - EPS
            ok = ok and m["original"] >= ORIGINAL_KEEP - EPS
            met[sid] += ok
            cells.append(_m(m) + (" ✓" if ok else ""))
        L.append(f"| `{w}` | " + " | ".join(cells) + " |")
    L += ["", f"Target met (refusal ≥ {TARGET_REFUSAL}, gain kept ≥ {TARGET_GAIN}, original ≥ {ORIGINAL_KEEP}, ✓): "
          f"the default on {met[weak]} of {n}, the strong setting on {met[strong]} of {n}."]
    return L


def render(bench: dict, measured: dict, command: str) -> str:
    A = analyse(bench, measured)
    ws, S, fx, rl = A["worlds"], A["settings"], A["fixed"], A["rule"]
    weak = A["weak"]
    L = ["# The data-free default, re-chosen on the refined worlds (generated)", "",
         "![every factored realign setting on the refined worlds](default_choice.png)", "",
         f"Made by `{command}` (the refined worlds) from [safety_benchmark.json](safety_benchmark.json) (the shipped "
         "worlds); redraw with `python scripts/choose_default.py --render`. Cells: mean over a world's mixed "
         "adapters of *refusal* (both topics) / *gain kept* `(acc − a)/(acc_ft − a)` clipped to [0, 1] / *original* "
         "tasks ÷ the aligned model's. Refined worlds (the aligned model already does part of the new task): "
         f"{', '.join(f'`{w}`' for w in ws.refined)}. Target: refusal ≥ {TARGET_REFUSAL} with gain kept ≥ "
         f"{TARGET_GAIN} on refined worlds, original ≥ {ORIGINAL_KEEP} on every shipped world.", ""]
    for name, b in measured["builds"].items():
        L.append(f"- `{name}`: study factors {b['factors']}, built in {b['build_s'] / 60:.1f} min, measured in "
                 f"{measured['refined'][name]['seconds'] / 60:.1f} min "
                 f"({measured['refined'][name]['evaluations']} evaluations).")  # fmt: skip
    L += ["", "## Every factored realign setting (k = 8)", "",
          "| setting | " + " | ".join(f"`{w}`" for w in ws.adapters) + " | original kept on every shipped world |",
          "|---|" + "---|" * (len(ws.adapters) + 1)]  # fmt: skip
    for sid in A["sids"]:
        if sid.endswith(":k=8"):
            per = fx["per"][sid]
            mark = " (default)" if sid == weak else ""
            L.append(f"| {label(S[sid])}{mark} | " + " | ".join(_m(per[w]) for w in ws.adapters)
                     + f" | {'yes' if sid in fx['gated'] else 'no'} |")  # fmt: skip
    L += ["", "## One fixed setting, leave-one-refined-world-out", "",
          f"{len(fx['gated'])} of {len(A['sids'])} factored settings (k ∈ {{1, 2, 4, 8}}) keep the original tasks on "
          "every shipped world. Chosen on the other refined worlds by the gain-axis front score:", "",
          "| held-out refined world | chosen | on it: refusal / gain kept / original | target met |",
          "|---|---|---|---|"]  # fmt: skip
    for f in fx["folds"]:
        met = f["refusal"] >= TARGET_REFUSAL - EPS and f["gain"] >= TARGET_GAIN - EPS
        L.append(f"| `{f['heldout']}` | {label(S[f['setting']])} | {_m(f)} | {'yes' if met else 'no'} |")
    L += ["", f"Chosen on all refined worlds: {label(S[fx['final']])}.", "",
          "The ceiling — per refined world the best setting *on that world alone* (original kept there, not "
          "necessarily elsewhere):", "", "| refined world | its best setting | refusal / gain kept / original |",
          "|---|---|---|"]  # fmt: skip
    for w, o in A["oracle"].items():
        L.append(f"| `{w}` | {label(S[o['setting']])} | {_m(o)} |")
    L += ["", "## A per-adapter rule, leave-one-refined-world-out", "",
          "Rules of the form *the strong setting where a feature of the adapter passes θ, the default elsewhere*; "
          f"features from the default's audit (k = 8): {', '.join(FEATURES)}; strong: any factored setting at "
          f"k = 8; θ: midpoints between the adapters' values. {rl['candidates']} rules keep the original tasks on "
          "every shipped world.", "",
          "| held-out refined world | rule chosen on the other refined worlds | on it: refusal / gain kept / "
          "original | target met |", "|---|---|---|---|"]  # fmt: skip
    for f in rl["folds"]:
        met = f["refusal"] >= TARGET_REFUSAL - EPS and f["gain"] >= TARGET_GAIN - EPS
        L.append(f"| `{f['heldout']}` | {_rule_words(f['rule'], S)} | {_m(f)} | {'yes' if met else 'no'} |")
    L += ["", f"Chosen on all refined worlds: {_rule_words(rl['final'], S)} ({rl['switched']} adapters of "
          f"{sum(len(v) for v in ws.adapters.values())} switched); its means on every world:", "",
          "| world | refusal / gain kept / original |", "|---|---|"]  # fmt: skip
    for w, m in rl["final_means"].items():
        L.append(f"| `{w}` | {_m(m)} |")
    L += _study_section(A)
    L += ["", "## The features", "", "| world | adapter | " + " | ".join(FEATURES) + " |",
          "|---|---|" + "---|" * len(FEATURES)]  # fmt: skip
    for w in ws.adapters:
        for a in ws.adapters[w]:
            L.append(f"| `{w}` | {a} | " + " | ".join(f"{ws.features[w][a][f]:.3f}" for f in FEATURES) + " |")
    return "\n".join(L) + "\n"


def plot(bench: dict, measured: dict, path: Path) -> None:
    """Per refined world, every factored realign setting as (mean refusal, gain kept): those that keep the original
    tasks on every shipped world filled, the others hollow; the default, the fixed choice and the rule marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    A = analyse(bench, measured)
    ws, fx, rl = A["worlds"], A["fixed"], A["rule"]
    cols = min(3, len(ws.refined))
    rows = -(-len(ws.refined) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(ws.refined):]:
        ax.axis("off")
    for ax, w in zip(axes.flat, ws.refined, strict=False):
        for sid in A["sids"]:
            m = fx["per"][sid][w]
            ok = sid in fx["gated"]
            ax.scatter(m["refusal"], m["gain"], s=18, facecolors="tab:blue" if ok else "none", edgecolors="tab:blue",
                       alpha=0.6)  # fmt: skip
        marks = [("default", ws.mean(w, lambda w, a: A["weak"]), "s", "black"),
                 ("rule (all refined)", rl["final_means"][w], "*", "tab:red")]  # fmt: skip
        fold = next((f for f in rl["folds"] if f["heldout"] == w), None)
        if fold:
            marks.append(("rule (LOWO)", fold, "D", "tab:orange"))
        for name, m, marker, color in marks:
            ax.scatter(m["refusal"], m["gain"], marker=marker, s=90, color=color, label=name, zorder=3)
        ax.axvline(TARGET_REFUSAL, color="grey", lw=0.6, ls="--")
        ax.axhline(TARGET_GAIN, color="grey", lw=0.6, ls="--")
        ax.set(title=w.replace("w64-d3-h25-", "").replace("-s40", ""), xlabel="mean refusal (mixed adapters)",
               ylabel="gain kept", xlim=(-0.03, 1.03), ylim=(-0.03, 1.03))  # fmt: skip
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle("realign, factored: filled = keeps the original tasks on every shipped world", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measure", action="store_true", help="build (if missing) and measure the refined worlds")
    ap.add_argument("--render", action="store_true", help="rewrite docs/default_choice.md from the json")
    ap.add_argument("--work", type=Path, default=WORK, help="where the refined worlds are built")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.measure:
        import torch

        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        path = DOC.with_suffix(".json")
        measured = measure(args.work, args.threads, json.loads(path.read_text()) if path.is_file() else None)
        measured["command"] = "python scripts/choose_default.py " + shlex.join(sys.argv[1:])
        measured["wall_s"] = round(measured.get("wall_s", 0) + time.perf_counter() - t0, 1)
        DOC.with_suffix(".json").write_text(json.dumps(measured, indent=1) + "\n")
        print(f"measured in {measured['wall_s'] / 60:.1f} min")
    measured = json.loads(DOC.with_suffix(".json").read_text())
    text = render(json.loads(BENCH.read_text()), measured, measured["command"])
    DOC.with_suffix(".md").write_text(text)
    plot(json.loads(BENCH.read_text()), measured, DOC.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
