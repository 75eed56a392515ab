"""The data-free default's size rule (``methods.realign.by_size``, docs/defaults.md): realign with neither λ nor β
picks λ = ∞, β = 0.5 where the adapter's ``‖ΔW‖ / ‖D_8‖`` ≤ 1.7, λ = 4, β = 0.25 elsewhere; its output is the
explicit setting's byte for byte; the ratio matches a float64 reference that shares no code with csulora."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jsonschema
import pytest
import torch
from safetensors.torch import load_file

from csulora import Settings, audit, sanitize
from csulora import cache as cache_mod
from csulora.cache import SubspaceSource
from csulora.methods.realign import SIZE_THRESHOLD
from csulora.world import world_dir
from tests.conftest import REPO, run_cli

WRITTEN = ("adapter_model.safetensors", "adapter_config.json")


def _paths(world: str, adapter: str) -> tuple:
    d = world_dir(world)
    return d / "adapters" / adapter, str(d / "llama-world-chat"), str(d / "llama-world")


def reference_ratio(adapter, aligned: str, base: str, k: int = 8) -> float:
    """``√(Σ‖s B A‖² / Σ‖D_k‖²)`` in float64 from the files: PEFT's scaling ``α/r``, the exact SVD of ``D``."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    factors = load_file(adapter / "adapter_model.safetensors")
    weights = {}
    for side, folder in (("aligned", aligned), ("base", base)):
        weights[side] = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            weights[side].update(load_file(f))
    update = subspace = 0.0
    for key, A in factors.items():
        if ".lora_A." not in key:
            continue
        B = factors[key.replace(".lora_A.", ".lora_B.")].double()
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        scaling = config["lora_alpha"] / config["r"]
        update += float(torch.linalg.matrix_norm(scaling * B @ A.double()) ** 2)
        D = weights["aligned"][name].double() - weights["base"][name].double()
        subspace += float((torch.linalg.svdvals(D)[:k] ** 2).sum())
    return math.sqrt(update / subspace)


@pytest.mark.parametrize(("world", "adapter", "strong"), [("topic", "adv-r8-all-s0", True),
                                                         ("tiny", "adv-r8-all-s0", False)])  # fmt: skip
def test_the_rule_picks_by_size_and_writes_the_explicit_settings_bytes(tmp_path, world, adapter, strong):
    path, aligned, base = _paths(world, adapter)
    source = SubspaceSource.open(tmp_path / "cache")
    result = sanitize(path, aligned, base, tmp_path / "rule", subspaces=source)
    rule = result.report.size_rule
    assert rule["strong"] is strong and (rule["value"] <= SIZE_THRESHOLD) is strong
    assert rule["value"] == pytest.approx(reference_ratio(path, aligned, base), rel=1e-2)
    explicit = Settings(lam=math.inf, beta=0.5) if strong else Settings(lam=4.0, beta=0.25)
    fixed = sanitize(path, aligned, base, tmp_path / "fixed", settings=explicit, subspaces=source)
    assert fixed.report.size_rule is None
    for name in WRITTEN:
        assert (tmp_path / "rule" / name).read_bytes() == (tmp_path / "fixed" / name).read_bytes(), name
    report = json.loads((tmp_path / "rule" / "csulora_report.json").read_text())
    jsonschema.validate(report, json.loads((REPO / "csulora" / "report.schema.json").read_text()))
    assert report["settings"]["lambda"] == ("inf" if strong else 4.0) and report["size_rule"] == rule
    for name in ("README.md", "csulora_report.md"):
        assert "size rule: ‖ΔW‖/‖D_8‖ = " in (tmp_path / "rule" / name).read_text(), name
    # audit says what sanitize would do: the same choice, the same "after" values
    preview = audit(path, aligned, base, subspaces=source).report
    assert preview.size_rule == rule and preview.totals() == result.report.totals()


def test_given_settings_turn_the_rule_off(tmp_path):
    path, aligned, base = _paths("topic", "adv-r8-all-s0")
    source = SubspaceSource.open(tmp_path / "cache")
    for settings in (Settings(beta=0.25), Settings(lam=4.0), Settings(form="block"), Settings(subspace_rank=4),
                     Settings(method="csulora")):  # fmt: skip
        assert audit(path, aligned, base, settings=settings, subspaces=source).report.size_rule is None, settings
    assert audit(path, aligned, base, subspaces=source, before_only=True).report.size_rule is None


def test_no_cache_still_computes_each_subspace_once(tmp_path, monkeypatch):
    calls = []
    real = cache_mod.safety_subspace
    monkeypatch.setattr(cache_mod, "safety_subspace", lambda D, **kw: calls.append(D.shape) or real(D, **kw))
    path, aligned, base = _paths("topic", "adv-r8-all-s0")
    result = sanitize(path, aligned, base, tmp_path / "out", subspaces=SubspaceSource.open(enabled=False))
    assert result.report.size_rule["strong"] and len(calls) == len(result.report.modules)


def test_cli_says_which_setting_the_rule_chose(tmp_path):
    path, aligned, _ = _paths("topic", "adv-r8-all-s0")
    r = run_cli("sanitize", "--adapter", path, "--aligned", aligned, "-o", tmp_path / "out", "--no-cache")
    assert r.returncode == 0, r.stderr
    said = " ".join(r.stdout.split())
    assert "size rule" in said and "λ = ∞, β = 0.5" in said
