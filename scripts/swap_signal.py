#!/usr/bin/env python
"""Can the weights alone tell a swapped aligned/base pair? (issue 20, docs/audit.md "Swapped checkpoints").

For every adapter and full fine-tune of the shipped worlds, with the pair in the right order and swapped:

- the erosion coefficient ``Σ⟨ΔW, D_k⟩/Σ‖D_k‖²`` that ``csulora audit`` reports (default settings). The candidate
  rule: "the right order makes the fine-tunes erode alignment (e < 0)"; per adapter, and per world as the sign of
  the mean over its adapters (what a batch would see);
- for full fine-tunes also the distances ``‖W − W_aligned‖`` and ``‖W − W_base‖`` over the weights of the
  transformer blocks; the candidate rule: "a fine-tune is nearer the checkpoint it was fine-tuned from".

Writes docs/swap_signal.json and prints the Markdown table of docs/audit.md.

    nice -n 10 .venv/bin/python scripts/swap_signal.py
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from csulora.api import audit  # noqa: E402
from csulora.cache import SubspaceSource  # noqa: E402
from csulora.io.checkpoints import Checkpoint, parse_ref  # noqa: E402
from csulora.io.layouts import is_block_weight  # noqa: E402
from csulora.models import audit_model  # noqa: E402
from csulora.world import ALIGNED, BASE, FULL, world_dir, world_names  # noqa: E402

OUT = REPO / "docs" / "swap_signal.json"


def distances(model: Path, aligned: Path, base: Path) -> tuple[float, float]:
    """``‖W − W_aligned‖_F`` and ``‖W − W_base‖_F`` over every weight of the transformer blocks, in float64."""
    m, a, b = (Checkpoint.open(parse_ref(str(p))) for p in (model, aligned, base))
    to_a = to_b = 0.0
    for key in sorted(m.weight_map):
        if not is_block_weight(key) or key not in a.weight_map or key not in b.weight_map:
            continue
        w = m.get(key).double()
        to_a += float((w - a.get(key).double()).square().sum())
        to_b += float((w - b.get(key).double()).square().sum())
    for c in (m, a, b):
        c.close()
    return math.sqrt(to_a), math.sqrt(to_b)


def measure() -> list[dict]:
    rows = []
    torch.set_num_threads(1)
    for world in world_names():
        root = world_dir(world)
        aligned, base = str(root / ALIGNED), str(root / BASE)
        subspaces = SubspaceSource.open(enabled=False)
        for kind, folder in (("adapter", root / "adapters"), ("full", root / FULL)):
            for path in sorted(p for p in folder.iterdir() if p.is_dir()):
                run = audit if kind == "adapter" else audit_model
                erosion = {}
                for order, (a, b) in (("right", (aligned, base)), ("swapped", (base, aligned))):
                    report = run(path, a, b, subspaces=subspaces, jobs=1, allow_swapped=True).report
                    erosion[order] = report.totals()["erosion_before"]
                row = {"world": world, "kind": kind, "name": path.name, "erosion_right": erosion["right"],
                       "erosion_swapped": erosion["swapped"]}  # fmt: skip
                if kind == "full":
                    row["dist_aligned"], row["dist_base"] = distances(path, root / ALIGNED, root / BASE)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Per world: how often each rule says "right order" on the right order and on the swapped one."""
    lines = ["| world | adapters: e < 0 right / swapped | mean e right → swapped | full: e < 0 right / swapped | "
             "full: nearer the aligned, right / swapped |", "|---|---|---|---|---|"]  # fmt: skip
    for world in dict.fromkeys(r["world"] for r in rows):
        ad = [r for r in rows if r["world"] == world and r["kind"] == "adapter"]
        fu = [r for r in rows if r["world"] == world and r["kind"] == "full"]
        neg = sum(r["erosion_right"] < 0 for r in ad), sum(r["erosion_swapped"] < 0 for r in ad)
        mean = sum(r["erosion_right"] for r in ad) / len(ad), sum(r["erosion_swapped"] for r in ad) / len(ad)
        fneg = sum(r["erosion_right"] < 0 for r in fu), sum(r["erosion_swapped"] < 0 for r in fu)
        near = sum(r["dist_aligned"] < r["dist_base"] for r in fu), sum(r["dist_base"] < r["dist_aligned"] for r in fu)
        lines.append(f"| {world} | {neg[0]}/{len(ad)} · {neg[1]}/{len(ad)} | {mean[0]:+.3f} → {mean[1]:+.3f} | "
                     f"{fneg[0]}/{len(fu)} · {fneg[1]}/{len(fu)} | {near[0]}/{len(fu)} · {near[1]}/{len(fu)} |")
    lines += ["", "| world | fine-tune | erosion, right order | erosion, swapped | benign? |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['world']} | {r['kind']} {r['name']} | {r['erosion_right']:+.3f} | "
                     f"{r['erosion_swapped']:+.3f} | {'yes' if r['name'].startswith('benign') else ''} |")
    return "\n".join(lines)


def main() -> None:
    rows = measure()
    OUT.write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
