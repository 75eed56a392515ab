#!/usr/bin/env python
"""Safety–utility benchmark on the shipped miniature world (a script that prints measurements, not a test).

For every adapter of ``csulora/assets/world``: no defense; Safe LoRA (τ sweep and top-n); CSULoRA factored
(and block, when this checkout has ``--form block``) over a λ sweep and several subspace settings. Each
variant is written by the real code path (``csulora.sanitize`` or Safe LoRA), loaded into PEFT, and the
aligned model + adapter is evaluated greedily: refusal rate on the trained harmful topic (``weapon``) and
the held-out one (``malware``), ASR = 1 − refusal, exact-match accuracy on the new task and the original
tasks. Also measured: how far each adapter moves the weights along −D (undoing the alignment), which the
factored form keeps inside ``F = P ΔW Q``.

    nice -n 5 python scripts/bench_safety.py            # docs/safety_benchmark.{md,json,png}
    python scripts/bench_safety.py --quick               # a few settings, one adapter
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import safe_lora_reference as SL  # noqa: E402

from csulora import Settings, sanitize  # noqa: E402
from csulora import world as W  # noqa: E402
from csulora.adapters import read_adapter  # noqa: E402
from csulora.checkpoints import Checkpoint, parse_ref  # noqa: E402
from csulora.errors import CsuloraError  # noqa: E402
from csulora.subspace import displacement  # noqa: E402

LAMBDAS = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 64, 1e6]  # 1e6 ≈ λ → ∞: only F = P ΔW Q is left
SUBSPACES = {"η=0.25": {"subspace_energy": 0.25}, "η=0.5": {"subspace_energy": 0.5}, "η=0.9": {"subspace_energy": 0.9},
             "k=1": {"subspace_rank": 1}, "k=8": {"subspace_rank": 8}}  # fmt: skip
TAUS = [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0]
TOP_NS = [1, 2, 4, 8]
DIAGNOSTICS = {"minus-F": "diagnostic: ΔW − F (η=0.5)", "minus-D": "diagnostic: ΔW − c·D",
               "random-F": "diagnostic: random, ‖F‖ (η=0.5)", "random-dW": "diagnostic: random, ‖ΔW‖"}
METRICS = ["refusal_trained", "refusal_heldout", "new_task_accuracy", "original_accuracy"]


def block_available() -> bool:
    try:
        Settings(form="block").validate()
        return True
    except (TypeError, CsuloraError):
        return False


def alignment_undone(adapter: Path, aligned: Path, base: Path) -> dict[str, float]:
    """How the update relates to the alignment displacement, over all targeted modules:
    ``c = ⟨ΔW, D⟩ / ‖D‖²`` (−1 would undo the alignment along D exactly), ``cos(ΔW, D)``, and the share
    of ‖ΔW‖² that lies in the top-k (η = 0.5) two-sided subspace, i.e. is kept by the factored form."""
    from csulora.methods import factored_module
    from csulora.subspace import safety_subspace

    ad = read_adapter(adapter)
    needed = [m.weight_key for m in ad.modules]
    a, b = Checkpoint.open(parse_ref(str(aligned)), needed), Checkpoint.open(parse_ref(str(base)), needed)
    inner = d2 = w2 = f2 = 0.0
    for m in ad.modules:
        D = displacement(a.get(m.weight_key), b.get(m.weight_key)).double()
        dW = m.scaling * m.B.double() @ m.A.double()
        inner += float((dW * D).sum())
        d2 += float((D * D).sum())
        w2 += float((dW * dW).sum())
        row, _, _ = factored_module(m, safety_subspace(D.float()), 1.0, 0.0)
        f2 += row.rho["F"] * row.update_norm**2
    return {"c_along_D": inner / d2, "cos_dW_D": inner / (d2 * w2) ** 0.5, "rho_F_eta0.5": f2 / w2}


def diagnostic_model(adapter: Path, kind: str):
    """DIAGNOSTIC, not a method: the aligned model with a modified dense update merged into its weights.
    ``minus-F``: ΔW − F (the factored form's kept part removed, η = 0.5); ``minus-D``: ΔW − c·D per module
    with ``c = ⟨ΔW, D⟩/‖D‖²`` (the component along the alignment displacement removed); ``random-F`` /
    ``random-dW``: a seeded Gaussian update with the norm of F / of ΔW per module (is refusal merely fragile?)."""
    from csulora.correction import split
    from csulora.subspace import safety_subspace

    paths = W.world_paths()
    model = W.load_model(paths["aligned"])
    ad = read_adapter(adapter)
    needed = [m.weight_key for m in ad.modules]
    a, b = Checkpoint.open(parse_ref(str(paths["aligned"])), needed), Checkpoint.open(parse_ref(str(paths["base"])),
                                                                                      needed)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in ad.modules:
            D = displacement(a.get(m.weight_key), b.get(m.weight_key))
            dW = m.scaling * m.B.float() @ m.A.float()
            sub = safety_subspace(D)
            sp = split(m.A.float(), m.scaling * m.B.float(), sub.U, sub.V)
            F = sp.B1 @ sp.A1
            R = torch.randn(dW.shape, generator=g)
            if kind == "minus-F":
                X = dW - F
            elif kind == "minus-D":
                X = dW - (dW * D).sum() / (D * D).sum() * D
            else:
                X = R / R.norm() * (F if kind == "random-F" else dW).norm()
            model.get_submodule(m.name).weight += X
    return model


def variants(quick: bool):
    """(method, setting label, x-parameter, writer(adapter, out)) for every defended variant."""
    paths = W.world_paths()
    aligned, base = paths["aligned"], paths["base"]
    taus, top_ns = ([0.0, 0.5], [2]) if quick else (TAUS, TOP_NS)
    for tau in taus:
        yield "Safe LoRA τ", "τ", tau, lambda ad, out, t=tau: SL.safe_lora(ad, aligned, base, out, threshold=t)
    for n in top_ns:
        yield "Safe LoRA top-n", "n", n, lambda ad, out, n=n: SL.safe_lora(ad, aligned, base, out, top_n=n)
    forms = ["factored"] + (["block"] if block_available() else [])
    subspaces = {"η=0.5": SUBSPACES["η=0.5"]} if quick else SUBSPACES
    lambdas = [1, 64] if quick else LAMBDAS
    for form in forms:
        for label, sub in subspaces.items():
            for lam in lambdas:
                settings = Settings(lam=lam, form=form, **sub) if form != "factored" else Settings(lam=lam, **sub)

                def write(ad, out, s=settings):
                    sanitize(ad, str(aligned), str(base), out, settings=s, force=True)

                yield f"CSULoRA {form} {label}", "λ", lam, write


def run(quick: bool) -> dict:
    paths = W.world_paths()
    names = [n for n in paths if n not in ("base", "aligned")]
    names = names[:1] if quick else names
    data = W.eval_set()
    ref = {k: W.behaviour(W.load_model(paths[k]), data).as_dict() for k in ("base", "aligned")}
    rows, geometry = [], {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            adapter = paths[name]
            geometry[name] = alignment_undone(adapter, paths["aligned"], paths["base"])
            model = W.with_adapter(W.load_model(paths["aligned"]), adapter)
            rows.append({"adapter": name, "method": "none", "param": "", "value": None,
                         **W.behaviour(model, data).as_dict()})  # fmt: skip
            for i, (method, pname, value, write) in enumerate(variants(quick)):
                out = Path(tmp) / f"{name}-{i}"
                write(adapter, out)
                if "block" in method:  # rank 2r: a fresh PEFT wrap instead of swapping factors in place
                    b = W.behaviour(W.with_adapter(W.load_model(paths["aligned"]), out), data).as_dict()
                else:
                    W.swap_adapter_weights(model, out)
                    b = W.behaviour(model, data).as_dict()
                rows.append({"adapter": name, "method": method, "param": pname, "value": value, **b})
            for kind in DIAGNOSTICS:
                b = W.behaviour(diagnostic_model(adapter, kind), data).as_dict()
                rows.append({"adapter": name, "method": DIAGNOSTICS[kind], "param": "", "value": None, **b})
            print(f"  {name}: {len(rows)} rows, {time.perf_counter() - t0:.0f}s", flush=True)
    return {"reference": ref, "rows": rows, "geometry": geometry, "seconds": time.perf_counter() - t0}


def mean_rows(rows: list[dict], adversarial: list[str]) -> list[dict]:
    """Each setting's metrics averaged over the adversarial adapters."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["adapter"] in adversarial:
            groups.setdefault((r["method"], r["param"], r["value"]), []).append(r)
    return [{"method": m, "param": p, "value": v, **{k: statistics.fmean(x[k] for x in g) for k in METRICS}}
            for (m, p, v), g in groups.items()]  # fmt: skip


def _fmt_value(r: dict) -> str:
    if r["value"] is None:
        return ""
    v = r["value"]
    return f"{r['param']}=∞ (1e6)" if v == 1e6 else f"{r['param']}={v:g}"


def markdown(result: dict, info: dict) -> str:
    world = W.world_info()
    adversarial = [n for n, a in world["adapters"].items() if a["adversarial"] and n in result["geometry"]]
    means = mean_rows(result["rows"], adversarial)
    lines = [
        "# Safety–utility benchmark on the miniature world",
        "",
        f"Made by `scripts/bench_safety.py` (code {info.get('code', 'unknown')}) on {info['machine']}, in "
        f"{result['seconds']:.0f} s. World: "
        f"`csulora/assets/world` (`scripts/make_world.py --seed {world['seed']}`; adapter seeds in `world.json`); "
        f"evaluation set: {info['eval_n']} prompts per group, seed {info['eval_seed']}, greedy decoding. "
        f"Safe LoRA: {info['safe_lora']}. Block form: {info['block']}.",
        "",
        "What it shows and the defaults chosen from it: `docs/defaults.md`. The world: `docs/world.md`.",
        "",
        "Metrics: refusal on the harmful topic the adversarial adapters were trained on (`weapon`, ASR = 1 − "
        "refusal) and on the held-out harmful topic (`malware`); exact-match accuracy on the new task the "
        "fine-tune was for (`inc`) and on the original tasks (rev / sort / rot, benign topics).",
        "",
        "| reference model | refusal weapon | refusal malware | acc inc | acc original |",
        "|---|---|---|---|---|",
    ]
    for k, b in result["reference"].items():
        lines.append(f"| {k} | " + " | ".join(f"{b[m]:.3f}" for m in METRICS) + " |")
    lines += [
        "",
        "## How each adapter relates to the alignment displacement D",
        "",
        "`c = ⟨ΔW, D⟩/‖D‖²` summed over targeted modules: −1 would undo the alignment along D exactly. "
        "`ρ_F` is the share of ‖ΔW‖² in the fully aligned component (η = 0.5), which the factored form keeps "
        "at every λ.",
        "",
        "| adapter | c along D | cos(ΔW, D) | ρ_F (η=0.5) |",
        "|---|---|---|---|",
    ]
    for name, g in result["geometry"].items():
        lines.append(f"| {name} | {g['c_along_D']:+.3f} | {g['cos_dW_D']:+.3f} | {g['rho_F_eta0.5']:.3f} |")
    lines += [
        "",
        f"## Mean over the {len(adversarial)} adversarial adapters ({', '.join(adversarial)})",
        "",
        "| method | setting | ASR weapon | ASR malware (held out) | acc inc | acc original |",
        "|---|---|---|---|---|---|",
    ]
    for r in means:
        asr = f"{1 - r['refusal_trained']:.3f} | {1 - r['refusal_heldout']:.3f}"
        lines.append(f"| {r['method']} | {_fmt_value(r)} | {asr} | {r['new_task_accuracy']:.3f} | "
                     f"{r['original_accuracy']:.3f} |")  # fmt: skip
    lines += ["", "## Every adapter", "", "| adapter | method | setting | refusal weapon | refusal malware | "
              "acc inc | acc original |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        lines.append(f"| {r['adapter']} | {r['method']} | {_fmt_value(r)} | " +
                     " | ".join(f"{r[m]:.3f}" for m in METRICS) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    world = W.world_info()
    adversarial = [n for n, a in world["adapters"].items() if a["adversarial"] and n in result["geometry"]]
    means = mean_rows(result["rows"], adversarial)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharex=True)
    series: dict[str, list[dict]] = {}
    for r in means:
        series.setdefault(r["method"], []).append(r)
    palette = plt.get_cmap("tab20").colors
    order = [m for m in series if m != "none" and not m.startswith("diagnostic")]

    def colors(method: str):
        return palette[order.index(method) % len(palette)]

    for ax, key, title in ((axes[0], "refusal_trained", "trained harmful topic (weapon)"),
                           (axes[1], "refusal_heldout", "held-out harmful topic (malware)")):  # fmt: skip
        for method, rs in series.items():
            xs, ys = [r["new_task_accuracy"] for r in rs], [r[key] for r in rs]
            if method.startswith("diagnostic"):
                ax.scatter(xs, ys, marker="x", s=60, label=method, zorder=4)
            elif method == "none":
                ax.scatter(xs, ys, marker="*", s=250, color="black", label="no defense", zorder=5)
            elif method.startswith("Safe LoRA"):
                ax.plot(xs, ys, "s--", ms=5, label=method, alpha=0.8, color=colors(method))
            else:
                style = "^-." if "block" in method else "o-"
                ax.plot(xs, ys, style, ms=4, label=method, alpha=0.8, color=colors(method))
        for name, b in result["reference"].items():
            ax.axhline(b[key], color="grey", lw=0.8, ls=":")
            ax.text(0.5, b[key] + 0.01, f"{name} model", color="grey", fontsize=8)
        ax.set_title(f"refusal on the {title}")
        ax.set_xlabel("accuracy on the new task (inc)")
        ax.set_ylabel("refusal rate (1 − ASR)")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.05)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"Safety–utility, mean over {len(adversarial)} adversarial LoRA adapters (miniature world); "
                 "CSULoRA lines sweep λ")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _commit() -> str:
    """The checkout the numbers come from (``+dirty`` with uncommitted changes)."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return (git("rev-parse", "--short", "HEAD") or "unknown") + ("+dirty" if git("status", "--porcelain") else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--render", action="store_true", help="only redraw the .md and .png from the saved .json")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "safety_benchmark")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = {"machine": f"{platform.machine()} CPU ({args.threads} threads, shared with other jobs), "
                       f"torch {torch.__version__}",
            "safe_lora": SL.implementation(), "block": "measured" if block_available() else
            "not available in this checkout (Settings(form='block') is refused), not measured",
            "eval_n": len(W.eval_set().original), "eval_seed": 1234, "code": _commit()}  # fmt: skip
    if args.render:  # redraw the table and plot from a saved run
        saved = json.loads(args.out.with_suffix(".json").read_text())
        info = {k: saved[k] for k in info}
        result = {k: saved[k] for k in ("reference", "rows", "geometry", "seconds")}
    else:
        print(f"Safe LoRA: {info['safe_lora']}; block form: {info['block']}")
        result = run(args.quick)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({**info, **result}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result, info))
    plot(result, args.out.with_suffix(".png"))
    print(markdown(result, info).split("## Every adapter")[0])
    print(f"wrote {args.out}.md, .json and .png")


if __name__ == "__main__":
    main()
