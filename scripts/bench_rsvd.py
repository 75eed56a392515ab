#!/usr/bin/env python
"""Accuracy and cost of the randomized SVD (DESIGN.md §2, ``subspace.randomized_svd``) against the exact SVD, for
power iterations ``niter`` × oversampling ``p`` (a script that prints measurements, not a test).

Principal angles are ill-defined where σ_k/σ_{k+1} is close to 1, which is the rule for the flat spectra of
aligned-minus-base displacements: two subspaces can differ by a large angle and hold the same energy. So the
yardsticks are, per displacement ``D`` and subspace rule (the two defaults: realign's rank 8 and csulora's energy
rule η = 0.25, ``settings.METHOD_DEFAULTS``):

(a) the captured-energy shortfall ``1 − ‖U_kᵀ D V_k‖² / Σ_{i≤k} σ_i²`` of the computed k-dim subspace against the
    exact top-k energy (float64, from the exact SVD's σ);
(b) the sanitized output's relative difference from the exact-SVD path: ``‖ΔW'_rsvd − ΔW'_exact‖`` over
    ``‖ΔW'_exact‖`` (``out``) and over the exact path's correction ``‖ΔW − ΔW'_exact‖`` (``corr``), the whole
    adapter, with each method at its defaults (``Method.correct``, the written dtype);
(c) behaviour on the shipped worlds: refusal and accuracy (``csulora.world.behaviour``, 240 prompts a group) of the
    first mixed adapter of each world sanitized by ``csulora.sanitize`` with each SVD;
and, for completeness, principal angles (sine of the largest, output and input side), ``k`` of the energy rule
against the exact one, and the SVD's time on one thread (as the module workers run it). Synthetic matrices: the
rank rule with the randomized SVD's seeds 0, 1, 2 (the worst is reported), the energy rule (10× the cost) with seed 0.

Matrices: every module the shipped worlds' adapters target (``D`` from the worlds' fp16 checkpoints), and
synthetic ``D`` of 1B shapes (2048×2048, 5632×2048) with flat spectra: power laws ``σ_i = i^-α`` at full rank
(α = 0.3, 0.6, 1.0: σ_8/σ_9 = 1.036, 1.073, 1.125) and the ``"fine-tune"`` displacement of ``csulora.synthetic``
(rank 64 with σ_i ∝ 1/i plus a dense part of comparable energy, through bf16 checkpoints), what
``scripts/bench_speed.py`` times. The synthetic adapter on them: r = 16, α = 32, half a random LoRA (A ~ N(0, 1/d_in),
B ~ N(0, 0.01²)), half an attack ``−c·D Aᵀ A`` that turns D back where A reads it.

    nice -n 10 python scripts/bench_rsvd.py                # writes docs/rsvd.{md,json,png}
    python scripts/bench_rsvd.py --quick --out /tmp/rsvd   # small shapes, two worlds, no behaviour
    python scripts/bench_rsvd.py --time-pair /tmp/bench    # CPU time of niter 4 vs 3 on a bench_speed.py 1b pair
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from csulora import Settings, sanitize  # noqa: E402
from csulora import subspace as subspace_module  # noqa: E402
from csulora import world as W  # noqa: E402
from csulora.cache import SubspaceSource, subspace_of  # noqa: E402
from csulora.determinism import fixed_threads  # noqa: E402
from csulora.io.adapters import LoraModule, read_adapter  # noqa: E402
from csulora.io.checkpoints import Checkpoint, CheckpointPair, parse_ref  # noqa: E402
from csulora.io.layouts import Target  # noqa: E402
from csulora.io.targets import bind  # noqa: E402
from csulora.methods import METHODS  # noqa: E402
from csulora.settings import METHOD_DEFAULTS  # noqa: E402
from csulora.subspace import energy_rank, exact_svd, safety_subspace, squared_norm  # noqa: E402
from csulora.synthetic import PER_LAYER  # noqa: E402

SETTINGS = [(n, p) for n in (1, 2, 4) for p in (5, 10, 20)]  # (niter, oversampling)
BEHAVIOUR_SETTINGS = [(1, 10), (2, 10), (4, 10)]
CURRENT = (4, 10)  # the default before this measurement
METHODS_MEASURED = ("realign", "csulora")  # their default subspace rules: rank 8, energy 0.25
SHAPES = {"full": [(2048, 2048), (5632, 2048)], "quick": [(512, 512), (1408, 512)]}
SPECTRA = ("power 0.3", "power 0.6", "power 1.0", "fine-tune")
EVAL_N, EVAL_SEED = 240, 1234


def sid(setting: tuple[int, int] | None) -> str:
    return "exact" if setting is None else f"niter={setting[0]} p={setting[1]}"


@contextmanager
def algorithm(setting: tuple[int, int] | None):
    """Run the block with the randomized SVD's ``(niter, oversampling)`` (``None``: leave them)."""
    before = subspace_module.NITER, subspace_module.OVERSAMPLE
    if setting is not None:
        subspace_module.NITER, subspace_module.OVERSAMPLE = setting
    try:
        yield
    finally:
        subspace_module.NITER, subspace_module.OVERSAMPLE = before


def settings_of(method: str, exact: bool) -> Settings:
    return Settings(method=method, exact_svd=exact).resolved()


def randomized_path(shape: tuple[int, int], method: str, p: int) -> bool:
    """Whether the rule's first SVD is randomized (``subspace._top`` is exact where oversampling covers D)."""
    first = METHOD_DEFAULTS[method].get("subspace_rank") or subspace_module.FIRST_GUESS
    return first + p < min(shape)


def sin_max(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Sine of the largest principal angle between the spans of orthonormal ``X`` and ``Y`` (k columns each)."""
    if X.shape[1] != Y.shape[1] or X.shape[1] == 0:
        return float("nan")
    c = torch.linalg.svdvals(X.double().T @ Y.double())
    return math.sqrt(max(0.0, 1.0 - float(c.min()) ** 2))


class Reference:
    """One displacement with its exact SVD (float32 LAPACK, what ``--exact-svd`` runs)."""

    def __init__(self, D: torch.Tensor, total: float | None = None):
        self.D, self.total = D, squared_norm(D) if total is None else total
        self.D64 = D.double()
        self.U, self.S, self.V = exact_svd(D)
        self.S64 = self.S.double()

    def metrics(self, sub, method: str) -> dict:
        k = sub.k
        captured = float(((sub.U.double().T @ self.D64) @ sub.V.double()).square().sum())
        best = float(self.S64[:k].square().sum())
        eta = METHOD_DEFAULTS[method].get("subspace_energy")
        cap = min(256, *self.D.shape)
        k_exact = min(energy_rank(self.S64, self.total, eta), cap) if eta else min(8, cap)
        gap = float(self.S64[k - 1] / self.S64[k]) if 0 < k < len(self.S64) and self.S64[k] > 0 else float("inf")
        return {"k": k, "k_exact": k_exact, "gap": gap, "shortfall": 1 - captured / best if best > 0 else 0.0,
                "sin_U": sin_max(sub.U, self.U[:, :k]), "sin_V": sin_max(sub.V, self.V[:, :k])}  # fmt: skip


def subspace(
    D: torch.Tensor,
    total: float,
    method: str,
    setting: tuple[int, int] | None,
    seed: int = 0,
    ref: Reference | None = None,
):
    """The method's default subspace of ``D`` with ``setting`` (``None``: the exact path, reusing ``ref``'s SVD of
    ``D`` when given) and its time (one thread)."""
    params = Settings(method=method, exact_svd=setting is None, seed=seed).resolved().subspace_params()
    exact = subspace_module.exact_svd
    if ref is not None:
        subspace_module.exact_svd = lambda M: (ref.U, ref.S, ref.V) if M is ref.D else exact(M)
    try:
        with algorithm(setting), fixed_threads():
            t = time.perf_counter()
            sub = subspace_of(D, total, params)
            return sub, time.perf_counter() - t
    finally:
        subspace_module.exact_svd = exact


def corrected(module: LoraModule, sub, method: str) -> torch.Tensor:
    """The written update ``s·B'A'`` (float64) of ``module`` under the method's defaults with subspace ``sub``."""
    out = METHODS[method].correct(module, sub, settings_of(method, False), None)
    return module.scaling * out.B.double() @ out.A.double()


def relative(diff2: float, out2: float, corr2: float) -> dict:
    return {"out": math.sqrt(diff2 / out2) if out2 > 0 else 0.0, "corr": math.sqrt(diff2 / corr2) if corr2 > 0 else 0.0}


# ---------------------------------------------------------------- synthetic displacements


def synthetic_D(shape: tuple[int, int], spectrum: str, seed: int = 0) -> torch.Tensor:
    d_out, d_in = shape
    g = torch.Generator().manual_seed(seed)
    if spectrum == "fine-tune":  # through bf16 checkpoints, as csulora.synthetic.write_pair makes them
        from csulora.synthetic import _fine_tune_displacement

        base = 0.02 * torch.randn(d_out, d_in, generator=g)
        delta = _fine_tune_displacement(d_out, d_in, 2e-3, g)
        return (base + delta).bfloat16().float() - base.bfloat16().float()
    alpha = float(spectrum.split()[1])
    m = min(shape)
    U = torch.linalg.qr(torch.randn(d_out, m, generator=g)).Q
    V = torch.linalg.qr(torch.randn(d_in, m, generator=g)).Q
    return (U * (1e-2 * torch.arange(1, m + 1, dtype=torch.float32) ** -alpha)) @ V.T


def synthetic_module(D: torch.Tensor, seed: int = 1) -> LoraModule:
    """r = 16, α = 32: half a random trained-scale LoRA, half ``−c·D Aᵀ A`` (turns D back where A reads it)."""
    g = torch.Generator().manual_seed(seed)
    r, (d_out, d_in) = 16, D.shape
    A = torch.randn(r, d_in, generator=g) / d_in**0.5
    B = torch.randn(d_out, r, generator=g) * 0.01
    attack = D @ A.T
    B = B * (0.5 / B.norm()) - attack * (0.5 / attack.norm())
    B = B * (D.norm() / (2.0 * (B @ A).norm()))  # ‖ΔW‖ = ‖D‖ (scaling 2)
    return LoraModule(name="synthetic", A=A, B=B, rank=r, alpha=32.0, scaling=2.0)


def run_synthetic(shapes, seeds, rows: list[dict]) -> None:
    for shape in shapes:
        for spectrum in SPECTRA:
            t0 = time.perf_counter()
            D = synthetic_D(shape, spectrum)
            with fixed_threads(2):
                ref = Reference(D)
            module = synthetic_module(D)
            dW = module.scaling * module.B.double() @ module.A.double()
            for method in METHODS_MEASURED:
                sub_e = subspace(D, ref.total, method, None, ref=ref)[0]
                out_e = corrected(module, sub_e, method)
                out2, corr2 = float(out_e.square().sum()), float((dW - out_e).square().sum())
                for setting in SETTINGS:
                    for seed in seeds if method == "realign" else seeds[:1]:  # the energy rule costs 10×: one seed
                        sub, t = subspace(D, ref.total, method, setting, seed)
                        diff2 = float((corrected(module, sub, method) - out_e).square().sum())
                        rows.append({"source": "synthetic", "matrix": f"{shape[0]}x{shape[1]} {spectrum}",
                                     "shape": list(shape), "spectrum": spectrum, "method": method,
                                     "setting": sid(setting), "seed": seed, "time_s": t,
                                     "randomized": randomized_path(shape, method, setting[1]),
                                     **ref.metrics(sub, method), **relative(diff2, out2, corr2)})  # fmt: skip
            print(f"  synthetic {shape} {spectrum}: {time.perf_counter() - t0:.0f} s", flush=True)


# ---------------------------------------------------------------- the worlds


def world_modules(root: Path) -> tuple[CheckpointPair, dict[str, list[LoraModule]]]:
    paths = W.world_paths(root)
    aligned = Checkpoint.open(parse_ref(str(paths["aligned"])))
    pair = CheckpointPair(aligned, Checkpoint.open(parse_ref(str(paths["base"]))))
    adapters = {n: bind(read_adapter(paths[n]), aligned).modules for n in W.adapters_of(W.world_info(root))}
    pair.prepare(list({m.target.id: m.target for ms in adapters.values() for m in ms}.values()))
    return pair, adapters


def run_world(name: str, rows: list[dict], adapter_rows: list[dict]) -> None:
    """(a) per module the adapters target, (b) per adapter, on one world."""
    t0 = time.perf_counter()
    pair, adapters = world_modules(W.world_dir(name))
    targets = {m.target.id: m.target for ms in adapters.values() for m in ms}
    subs: dict[tuple, object] = {}  # (target, method, setting) → subspace
    for tid, target in targets.items():
        D, total = pair.displacement(target, torch.device("cpu"))
        ref = Reference(D, total)
        for method in METHODS_MEASURED:
            subs[tid, method, None] = subspace(D, total, method, None, ref=ref)[0]
            for setting in SETTINGS:
                sub, t = subspace(D, total, method, setting)
                subs[tid, method, setting] = sub
                rows.append({"source": "world", "world": name, "matrix": f"{name} {tid}", "shape": list(D.shape),
                             "method": method, "setting": sid(setting), "seed": 0, "time_s": t,
                             "randomized": randomized_path(tuple(D.shape), method, setting[1]),
                             **ref.metrics(sub, method)})  # fmt: skip
    for adapter, modules in adapters.items():
        for method in METHODS_MEASURED:
            exact = {m.name: corrected(m, subs[m.target.id, method, None], method) for m in modules}
            out2 = sum(float(x.square().sum()) for x in exact.values())
            corr2 = sum(float((m.scaling * m.B.double() @ m.A.double() - exact[m.name]).square().sum())
                        for m in modules)  # fmt: skip
            for setting in SETTINGS:
                diff2 = sum(float((corrected(m, subs[m.target.id, method, setting], method) - exact[m.name])
                                  .square().sum()) for m in modules)  # fmt: skip
                adapter_rows.append({"world": name, "adapter": adapter, "method": method, "setting": sid(setting),
                                     **relative(diff2, out2, corr2)})  # fmt: skip
    pair.close()
    print(f"  world {name}: {len(targets)} modules, {len(adapters)} adapters, {time.perf_counter() - t0:.0f} s",
          flush=True)  # fmt: skip


def run_behaviour(name: str, settings: list, rows: list[dict]) -> None:
    """(c): the first mixed adapter of the world, sanitized by ``csulora.sanitize`` with each SVD, evaluated."""
    t0 = time.perf_counter()
    root = W.world_dir(name)
    info, paths = W.world_info(root), W.world_paths(root)
    adapter = W.adapters_of(info, "mixed")[0]
    data = W.world_eval_set(info, EVAL_N, EVAL_SEED)
    model = W.with_adapter(W.load_model(paths["aligned"]), paths[adapter])
    with tempfile.TemporaryDirectory(prefix="bench-rsvd-") as tmp:
        for setting in [None, *settings]:
            source = SubspaceSource.open(enabled=False)
            for method in METHODS_MEASURED:
                out = Path(tmp) / "out"
                with algorithm(setting):
                    sanitize(paths[adapter], str(paths["aligned"]), str(paths["base"]), out, force=True,
                             settings=Settings(method=method, exact_svd=setting is None), subspaces=source)  # fmt: skip
                W.swap_adapter_weights(model, out)
                b = W.behaviour(model, data).as_dict()
                rows.append({"world": name, "adapter": adapter, "method": method, "setting": sid(setting), **b})
    print(f"  behaviour {name}/{adapter}: {time.perf_counter() - t0:.0f} s", flush=True)


def time_pair(root: Path, settings: list[tuple[int, int]], layers: tuple[int, ...] = (0, 11), reps: int = 4) -> None:
    """CPU seconds of the rank-8 subspaces (realign's default) of every weight of ``layers`` of a bench_speed pair
    (``root/aligned``, ``root/base``) per setting, on one thread, the settings alternated ``reps`` times."""
    pair = CheckpointPair(*(Checkpoint.open(parse_ref(str(root / n))) for n in ("aligned", "base")))
    targets = [Target(f"model.layers.{i}.{n}.weight") for i in layers for n in PER_LAYER]
    pair.prepare(targets)
    Ds = [pair.displacement(t, torch.device("cpu")) for t in targets]
    seconds: dict[tuple[int, int], list[float]] = {s: [] for s in settings}
    for rep in range(reps):
        for setting in settings if rep % 2 == 0 else settings[::-1]:
            with algorithm(setting), fixed_threads():
                t = time.process_time()
                for D, total in Ds:
                    safety_subspace(D, rank=8, total=total)
                seconds[setting].append(time.process_time() - t)
    for setting, v in seconds.items():
        print(
            f"{sid(setting)}: {len(Ds)} modules of layers {layers}, CPU s median {statistics.median(v):.2f} "
            f"(min {min(v):.2f}, max {max(v):.2f}, {reps} runs)"
        )


# ---------------------------------------------------------------- summary, rendering


def summarize(rows: list[dict], adapter_rows: list[dict]) -> list[dict]:
    """Per (group, method, setting): worst and median shortfall, worst output differences, median angle, time."""
    groups = {"worlds": lambda r: r["source"] == "world",
              "synthetic 2048×2048": lambda r: r.get("shape") == [2048, 2048],
              "synthetic 5632×2048": lambda r: r.get("shape") == [5632, 2048]}  # fmt: skip
    if not any(r.get("shape") == [2048, 2048] for r in rows):  # --quick
        groups = {"worlds": groups["worlds"], "synthetic": lambda r: r["source"] == "synthetic"}
    out = []
    for group, pick in groups.items():
        for method in METHODS_MEASURED:
            for setting in map(sid, SETTINGS):
                sel = [
                    r for r in rows if pick(r) and r["method"] == method and r["setting"] == setting and r["randomized"]
                ]
                if not sel:
                    continue
                if group == "worlds":
                    diffs = [a for a in adapter_rows if a["method"] == method and a["setting"] == setting]
                else:
                    diffs = [r for r in sel if r["seed"] == 0]
                angles = [r["sin_U"] for r in sel if not math.isnan(r["sin_U"])]
                out.append({
                    "group": group, "method": method, "setting": setting, "n": len(sel),
                    "shortfall_max": max(r["shortfall"] for r in sel),
                    "shortfall_median": statistics.median(r["shortfall"] for r in sel),
                    "out_max": max(d["out"] for d in diffs), "corr_max": max(d["corr"] for d in diffs),
                    "sin_U_median": statistics.median(angles) if angles else float("nan"),
                    "k_differs": sum(r["k"] != r["k_exact"] for r in sel),
                    "time_s": statistics.median(r["time_s"] for r in sel),
                })  # fmt: skip
    return out


def render_table(summary: list[dict]) -> str:
    head = ("| D | method (rule) | setting | n | shortfall max | shortfall median | output diff max (of ΔW') | "
            "(of the correction) | sin θ_max median | k ≠ exact k | SVD time (median, 1 thread) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")  # fmt: skip
    rule = {m: (f"rank {d['subspace_rank']}" if "subspace_rank" in d else f"η = {d['subspace_energy']}")
            for m, d in METHOD_DEFAULTS.items()}  # fmt: skip
    lines = [f"| {s['group']} | {s['method']} ({rule[s['method']]}) | {s['setting']} | {s['n']} | "
             f"{s['shortfall_max']:.2e} | {s['shortfall_median']:.1e} | {s['out_max']:.2e} | {s['corr_max']:.2e} | "
             f"{s['sin_U_median']:.2f} | {s['k_differs']} | {s['time_s'] * 1000:.0f} ms |"
             for s in summary]  # fmt: skip
    return head + "\n".join(lines) + "\n"


def render_behaviour(rows: list[dict]) -> str:
    if not rows:
        return "(not measured)\n"
    head = (
        "| world / adapter | method | SVD | refusal (trained) | refusal (held out) | new task | original tasks |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    return head + "\n".join(f"| {r['world']} / {r['adapter']} | {r['method']} | {r['setting']} | "
                            f"{r['refusal_trained']:.3f} | {r['refusal_heldout']:.3f} | {r['new_task_accuracy']:.3f} | "
                            f"{r['original_accuracy']:.3f} |" for r in rows) + "\n"  # fmt: skip


BEGIN, END = "<!-- bench_rsvd: begin -->", "<!-- bench_rsvd: end -->"


def write_results(path: Path, text: str, meta: dict) -> None:
    """The tables between the markers of ``path`` (the prose around them is kept), or a new file of them."""
    block = f"{BEGIN}\n`{meta['command']}` ({meta['machine']}, {meta['seconds']} s)\n\n{text}{END}"
    old = path.read_text() if path.is_file() else ""
    if BEGIN in old and END in old:
        block = old[: old.index(BEGIN)] + block + old[old.index(END) + len(END) :]
    path.write_text(block if block.endswith("\n") else block + "\n")


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(s["group"] for s in summary))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "shortfall_max", "captured-energy shortfall (worst matrix)"),
                           (axes[1], "out_max", "sanitized output rel. difference (worst)")):  # fmt: skip
        for g_i, group in enumerate(groups):
            for m_i, method in enumerate(METHODS_MEASURED):
                for p, marker in ((5, "v"), (10, "o"), (20, "^")):
                    pts = [
                        (s["time_s"] * 1000, max(s[key], 1e-9))
                        for s in summary
                        if s["group"] == group and s["method"] == method and s["setting"].endswith(f"p={p}")
                    ]
                    if pts:
                        ax.plot(
                            *zip(*pts, strict=True),
                            marker=marker,
                            color=f"C{g_i * 2 + m_i}",
                            linestyle="-" if p == 10 else ":",
                            label=f"{group}, {method}" if p == 10 else None,
                        )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("SVD time per module, ms (1 thread; points: niter 1, 2, 4)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("randomized SVD against the exact SVD (▼ p=5, ● p=10, ▲ p=20)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small synthetic shapes, two worlds, no behaviour")
    ap.add_argument("--seeds", default="0,1,2", help="randomized-SVD seeds on the synthetic matrices")
    ap.add_argument("--worlds", default=None, help="comma-separated worlds (default: all shipped)")
    ap.add_argument("--no-behaviour", action="store_true")
    ap.add_argument(
        "--time-pair",
        default=None,
        metavar="DIR",
        help="only time niter 4 against 3 on two layers of a scripts/bench_speed.py pair in DIR",
    )
    ap.add_argument("--settings", default=None, help="NITER:P,… to measure instead of the grid, e.g. 3:10,3:20")
    ap.add_argument(
        "--out", default=str(REPO / "docs" / "rsvd"), help="writes OUT.json, OUT.png and the tables into OUT.md"
    )
    args = ap.parse_args()
    if args.time_pair:
        torch.set_num_threads(1)
        time_pair(Path(args.time_pair), [(4, 10), (3, 10)])
        return
    if args.settings:
        SETTINGS[:] = [tuple(int(x) for x in item.split(":")) for item in args.settings.split(",")]
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    worlds = args.worlds.split(",") if args.worlds else (["tiny", "moe"] if args.quick else W.world_names())
    rows, adapter_rows, behaviour_rows = [], [], []
    for name in worlds:
        run_world(name, rows, adapter_rows)
    run_synthetic(SHAPES["quick" if args.quick else "full"], [int(s) for s in args.seeds.split(",")], rows)
    if not (args.quick or args.no_behaviour):
        for name in worlds:
            run_behaviour(name, BEHAVIOUR_SETTINGS if args.settings is None else SETTINGS, behaviour_rows)
    summary = summarize(rows, adapter_rows)
    table, behaviour = render_table(summary), render_behaviour(behaviour_rows)
    print(table)
    print(behaviour)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "nice -n 10 python scripts/bench_rsvd.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
            "seconds": round(time.perf_counter() - t0)}  # fmt: skip
    out.with_suffix(".json").write_text(
        json.dumps(
            {**meta, "summary": summary, "behaviour": behaviour_rows, "adapters": adapter_rows, "matrices": rows},
            indent=1,
        )
        + "\n"
    )
    write_results(out.with_suffix(".md"), f"{table}\n### Behaviour\n\n{behaviour}", meta)
    plot(summary, out.with_suffix(".png"))
    print(f"wrote {out}.json, .md, .png in {meta['seconds']} s")


if __name__ == "__main__":
    main()
