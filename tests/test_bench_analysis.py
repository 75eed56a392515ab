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
