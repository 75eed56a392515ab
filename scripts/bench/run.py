"""Measuring one world: its references, then every adapter under every setting of the grid (and each adapter's
geometry). ``run_world`` runs in a worker process."""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from csulora import Settings, audit, sanitize
from csulora import world as W
from csulora.cache import SubspaceSource
from csulora.models import sanitize_model

from .grid import METRICS, for_models, grid, subspace_kwargs, to_settings

EVAL_N, EVAL_SEED = 240, 1234
GEOMETRY_SUBSPACES = ["k=1", "k=2", "k=4", "k=8", "eta=0.25", "eta=0.5"]


def geometry(adapter: Path, aligned: Path, base: Path, source: SubspaceSource) -> dict:
    """The adapter's relation to the alignment displacement: per subspace rule the erosion coefficient
    ``e = ⟨ΔW, D_k⟩/‖D_k‖²`` and ``ρ_F`` of the whole adapter (``audit``'s totals) and the mean rank ``k``
    chosen; the exact Safe LoRA scores (min and mean over modules)."""
    out: dict = {"subspaces": {}}
    for sub in GEOMETRY_SUBSPACES:
        report = audit(adapter, str(aligned), str(base), settings=Settings(method="csulora", lam=1.0,
                       **subspace_kwargs(sub)), subspaces=source).report  # fmt: skip
        totals = report.totals()
        out["subspaces"][sub] = {"erosion": totals["erosion_before"], "rho_F": totals["rho"]["F"],
                                 "k_mean": statistics.fmean(m.k for m in report.modules)}  # fmt: skip
    totals = audit(adapter, str(aligned), str(base), settings=Settings(method="safe-lora"), subspaces=source)
    totals = totals.report.totals()
    out["safe_lora_score_min"], out["safe_lora_score_mean"] = totals["min_safe_lora_score"], totals[
        "mean_safe_lora_score"]  # fmt: skip
    return out


def _round(d: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else _round(v) if isinstance(v, dict) else v for k, v in d.items()}


def run_world(name: str, setting_ids: list[str] | None, one_adapter: bool, threads: int,
              root: Path | None = None, settings: list[dict] | None = None, kinds: tuple[str, ...] = W.KINDS) -> dict:
    """Measure one world: references, then every adapter under every setting (in a worker process). ``root``: the
    world's folder (default: the shipped world ``name``; the study's worlds live elsewhere); ``settings``: settings
    of the grid's form to measure instead of the grid's (``setting_ids`` then picks among them); ``kinds``: the
    adapter kinds measured (full fine-tunes only with all of them)."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    root = W.world_dir(name) if root is None else Path(root)
    info, paths = W.world_info(root), W.world_paths(root)
    aligned, base = paths["aligned"], paths["base"]
    data = W.world_eval_set(info, EVAL_N, EVAL_SEED)
    settings = [s for s in (grid() if settings is None else settings) if setting_ids is None or s["id"] in setting_ids]
    names = W.adapters_of(info, "mixed")[:1] if one_adapter else [n for k in kinds for n in W.adapters_of(info, k)]
    reference = {k: W.behaviour(W.load_model(paths[k]), data).as_dict() for k in ("base", "aligned")}
    rows, adapters, evaluations, recorded_diff, errors = [], {}, 0, 0.0, []
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        source = SubspaceSource.open(Path(tmp) / "cache")  # each subspace computed once for the whole world
        for a_i, adapter in enumerate(names):
            spec = info["adapters"][adapter]
            adapters[adapter] = {"kind": W.adapter_kind(spec), "rank": spec.get("rank"),
                                 "targets": spec.get("target_modules"),
                                 "geometry": geometry(paths[adapter], aligned, base, source)}  # fmt: skip
            model = W.with_adapter(W.load_model(aligned), paths[adapter])
            for s in settings:
                if s["method"] == "none":
                    b = W.behaviour(model, data).as_dict()
                    recorded = info["behaviour"].get(adapter, {})
                    recorded_diff = max([recorded_diff] + [abs(b[m] - recorded[m]) for m in METRICS if m in recorded])
                else:
                    out = Path(tmp) / "out"
                    try:
                        result = sanitize(paths[adapter], str(aligned), str(base), out, settings=to_settings(s),
                                          force=True, subspaces=source)  # fmt: skip
                    except Exception as e:  # noqa: BLE001 — recorded and reported; the other settings go on
                        errors.append(f"{adapter} {s['id']}: {type(e).__name__}: {e}")
                        print(f"  [{name}] FAILED {errors[-1]}", flush=True)
                        continue
                    if result.report.rank_changed:  # block forms: another rank, so a fresh PEFT wrap
                        b = W.behaviour(W.with_adapter(W.load_model(aligned), out), data).as_dict()
                    else:  # same rank and config: swap the factors into the wrapped model
                        W.swap_adapter_weights(model, out)
                        b = W.behaviour(model, data).as_dict()
                    shutil.rmtree(out)
                evaluations += 1
                rows.append({"world": name, "adapter": adapter, "setting": s["id"], **_round(b)})
            print(f"  [{name}] {a_i + 1}/{len(names)} {adapter}: {len(settings)} settings, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
        every_kind = set(kinds) == set(W.KINDS)
        fulls = {n: W.full_paths(root)[n] for n in W.full_finetunes_of(info)} if every_kind and not one_adapter else {}
        for full, path in fulls.items():
            for s in (s for s in settings if for_models(s)):
                if s["method"] == "none":
                    b = W.behaviour(W.load_model(path), data).as_dict()
                else:
                    out = Path(tmp) / "model"
                    try:
                        sanitize_model(path, str(aligned), str(base), out, settings=to_settings(s), force=True,
                                       subspaces=source)  # fmt: skip
                    except Exception as e:  # noqa: BLE001 — recorded and reported; the other settings go on
                        errors.append(f"{full} {s['id']}: {type(e).__name__}: {e}")
                        print(f"  [{name}] FAILED {errors[-1]}", flush=True)
                        continue
                    b = W.behaviour(W.load_model(out), data).as_dict()
                    shutil.rmtree(out)
                evaluations += 1
                rows.append({"world": name, "adapter": full, "setting": s["id"], **_round(b)})
            print(f"  [{name}] full fine-tune {full}: {time.perf_counter() - t0:.0f} s", flush=True)
        subspaces = {"computed": source.computed, "loaded": source.loaded}
    trained, heldout = W.topics(info)
    return {
        "world": name,
        "description": info.get("description", ""),
        "topics": {"trained": trained, "heldout": heldout},
        "reference": {k: _round(v) for k, v in reference.items()},
        "adapters": {k: _round(v) for k, v in adapters.items()},
        "full": {n: {"kind": info["full"][n]["kind"]} for n in fulls},
        "none_vs_world_json": round(recorded_diff, 4),
        "evaluations": evaluations,
        "errors": errors,
        "subspace_cache": subspaces,
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
