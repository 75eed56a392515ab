"""The safety benchmark's scoring (scripts/bench/analysis.py): how the new task counts where the aligned model
already does part of it."""

from __future__ import annotations

import sys

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))

from bench.analysis import above_aligned, front_score  # noqa: E402


def _result(aligned: dict[str, float], rows: list[dict]) -> dict:
    ref = {"refusal_trained": 1.0, "refusal_heldout": 1.0, "original_accuracy": 1.0}
    return {"worlds": {w: {"reference": {"aligned": {**ref, "new_task_accuracy": a}}} for w, a in aligned.items()},
            "rows": rows}  # fmt: skip


def test_the_new_task_counts_above_the_aligned_model():
    rows = [{"world": w, "adapter": "x", "setting": s, "refusal_trained": 1.0, "refusal_heldout": 1.0,
             "new_task_accuracy": acc, "original_accuracy": 1.0}
            for w in ("half", "none") for s, acc in (("deletes", 0.5), ("keeps", 1.0), ("below", 0.25))]  # fmt: skip
    out = {(r["world"], r["setting"]): r["new_task_accuracy"] for r in above_aligned(_result({"half": 0.5, "none": 0.0},
                                                                                             rows))}  # fmt: skip
    assert out[("half", "deletes")] == 0.0 and out[("half", "keeps")] == 1.0 and out[("half", "below")] == 0.0
    assert [out[("none", s)] for s in ("deletes", "keeps", "below")] == [0.5, 1.0, 0.25]  # a = 0: unchanged
    assert [r["new_task_accuracy"] for r in rows][:3] == [0.5, 1.0, 0.25]  # the measured rows are not touched
    # a setting that restores refusal and deletes the fine-tune scores nothing where the aligned model did half
    deletes = [r for r in above_aligned(_result({"half": 0.5}, rows[:3])) if r["setting"] == "deletes"]
    assert front_score(deletes, "both", 0.9) == 0.0 and front_score(rows[:1], "both", 0.9) == 0.5


def test_added_settings_replace_only_their_rows():
    """``bench_safety.py --settings … --merge``: the settings measured replace or add their rows on the worlds
    measured; every other row, the saved run's description and its references stay."""
    from bench_safety import _merge_settings

    old, new = "realign:factored:lam=4:beta=0.25:k=8", "realign:factored:lam=inf:beta=0.75:k=8"

    def row(w: str, s: str, v: float) -> dict:
        return {"world": w, "adapter": "a", "setting": s, "refusal_trained": v, "refusal_heldout": v,
                "new_task_accuracy": v, "original_accuracy": v}  # fmt: skip

    saved = {"info": {"command": "first run", "code": "abc"}, "settings": [{"id": "none"}, {"id": old}],
             "worlds": {"wide": {"seconds": 9.0, "reference": "kept"}, "tiny": {"seconds": 7.0, "reference": "kept"}},
             "rows": [row(w, s, 0.1) for w in ("wide", "tiny") for s in ("none", old)]}  # fmt: skip
    measured = {"tiny": {"seconds": 2.0, "evaluations": 2, "errors": [], "rows": [row("tiny", old, 0.9),
                                                                                   row("tiny", new, 0.8)]}}  # fmt: skip
    info = {"command": "added run", "code": "def", "started": "now", "wall_s": 2.5, "kinds": ["mixed"], "grid": {}}
    out = _merge_settings(saved, measured, [old, new], info)
    got = {(r["world"], r["setting"]): r["refusal_trained"] for r in out["rows"]}
    assert got == {("tiny", "none"): 0.1, ("tiny", old): 0.9, ("tiny", new): 0.8, ("wide", "none"): 0.1,
                   ("wide", old): 0.1}  # fmt: skip
    assert [s["id"] for s in out["settings"]] == ["none", old, new]  # the grid's order
    assert list(out["worlds"]) == ["tiny", "wide"] and out["worlds"]["tiny"]["reference"] == "kept"
    assert out["worlds"]["tiny"]["added"][0]["evaluations"] == 2 and "added" not in out["worlds"]["wide"]
    assert out["info"]["command"] == "first run" and out["info"]["added"][0]["command"] == "added run"


def test_the_default_rule_is_chosen_without_the_held_out_world():
    """scripts/choose_default.py: a per-adapter rule is chosen on the other refined worlds under the every-shipped-
    world constraint. Two worlds: on the all-new one the strong setting breaks the original tasks (the rule must
    leave its adapter, whose feature is large, on the default); on the refined one it separates."""
    from choose_default import Worlds, per_adapter, rule_pick

    weak, strong = "realign:factored:lam=4:beta=0.25:k=8", "realign:factored:lam=inf:beta=0.5:k=8"
    ref = {"refusal_trained": 1.0, "refusal_heldout": 1.0, "original_accuracy": 1.0}

    def world(a: float, cells: dict) -> dict:
        rows = [{"world": w, "adapter": "x", "setting": s, "refusal_trained": r, "refusal_heldout": r,
                 "new_task_accuracy": acc, "original_accuracy": o} for w, c in cells.items()
                for s, (r, acc, o) in c.items()]  # fmt: skip
        return {"reference": {"aligned": {**ref, "new_task_accuracy": a}}, "adapters": {"x": {"kind": "mixed"}},
                "rows": rows}  # fmt: skip

    new = world(0.0, {"new": {"none": (0.0, 1.0, 1.0), weak: (0.3, 0.6, 0.95), strong: (0.9, 0.3, 0.7)}})
    bench = {"worlds": {"new": {k: v for k, v in new.items() if k != "rows"}}, "rows": new["rows"]}
    refined = {f"r{i}": world(0.5, {f"r{i}": {"none": (0.0, 1.0, 1.0), weak: (0.1, 1.0, 1.0),
                                              strong: (0.9, 0.9, 1.0)}}) for i in (1, 2)}  # fmt: skip
    features = {"new": {"x": {"update_over_subspace": 3.0}},
                **{w: {"x": {"update_over_subspace": 1.0 + i / 10}} for i, w in enumerate(refined)}}  # fmt: skip
    for w in features:
        features[w]["x"].update(erosion=-0.1, rho_F=0.1, safe_lora_mean=0.5)
    ws = Worlds(bench, {"refined": refined, "features": features})
    assert ws.refined == ["r1", "r2"] and ws.shipped == ["new"]
    out = per_adapter(ws, [weak, strong], weak)
    folds = {f["heldout"]: f for f in out["folds"]}
    for fold in folds.values():
        assert fold["rule"]["strong"] == strong and fold["rule"]["feature"] == "update_over_subspace"
        assert rule_pick(ws, fold["rule"])("new", "x") == weak  # the all-new adapter stays on the default
    # learnt on r2 (feature 1.1), θ switches r1 (1.0) too; learnt on r1 alone, the tie between θ = 1.05 and 2.05
    # goes to the fewest adapters switched, so r2 (1.1) is not: the held-out world is judged, not fitted
    assert folds["r1"]["refusal"] == 0.9 and folds["r2"]["refusal"] == 0.1
    assert out["final_means"]["new"]["original"] == 0.95 and out["final_means"]["r2"]["refusal"] == 0.9
