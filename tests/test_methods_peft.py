"""``--form block`` and ``--method safe-lora`` on real PEFT adapters: what PEFT loads and merges from the
written folder equals DESIGN.md §4 (block) and §5 (Safe LoRA), computed densely from the input adapter's
own merged delta."""

from __future__ import annotations

import json

import pytest
import torch

from csulora import Settings, sanitize
from csulora.io.adapters import CONFIG
from tests import oracle
from tests.conftest import TARGETS, load_llama, make_peft_adapter


def _weights(model) -> dict[str, torch.Tensor]:
    return {
        name: module.weight.detach().double().clone()
        for name, module in model.named_modules()
        if name.split(".")[-1] in TARGETS
    }


def merged_deltas(aligned, adapter) -> dict[str, torch.Tensor]:
    """``merge_and_unload()`` weights minus the aligned ones, per module; both key lists empty on load."""
    from peft import PeftModel

    model = load_llama(aligned)
    before = _weights(model)
    peft_model = PeftModel.from_pretrained(model, adapter)
    result = peft_model.load_adapter(adapter, adapter_name="check")
    assert result.missing_keys == [] and result.unexpected_keys == []
    peft_model.delete_adapter("check")
    after = _weights(peft_model.merge_and_unload())
    return {name: after[name] - before[name] for name in before}


@pytest.fixture(scope="module")
def displacements(llama_pair) -> dict[str, torch.Tensor]:
    aligned, base = _weights(load_llama(llama_pair["aligned"])), _weights(load_llama(llama_pair["base"]))
    return {name: aligned[name] - base[name] for name in aligned}


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * scale)


ADAPTERS = {
    "plain": {},
    "rslora": {"use_rslora": True, "r": 4, "lora_alpha": 6},
    "patterns": {
        "rank_pattern": {"q_proj": 6, "layers.1.mlp.down_proj": 2},
        "alpha_pattern": {"v_proj": 3, "o_proj": 20},
    },
}


@pytest.mark.parametrize("kind, lam", [("plain", 1.0), ("rslora", 4.0), ("patterns", 2.0)])
def test_block_form_loads_in_peft_and_equals_the_block_formula(tmp_path, llama_pair, displacements, kind, lam):
    adapter = make_peft_adapter(tmp_path / "adapter", llama_pair["aligned"], seed=3, **ADAPTERS[kind])
    settings = Settings(method="csulora", form="block", lam=lam, exact_svd=True)
    result = sanitize(adapter, str(llama_pair["aligned"]), output=tmp_path / "out", settings=settings)
    config = json.loads((result.output / CONFIG).read_text())
    assert config["use_rslora"] is False and config["r"] == config["lora_alpha"]
    assert result.report.rank_changed
    d_in, d_out = merged_deltas(llama_pair["aligned"], adapter), merged_deltas(llama_pair["aligned"], result.output)
    rows = {row.module: row for row in result.report.modules}
    for name, D in displacements.items():
        assert rows[name].rank_after == 2 * rows[name].rank
        P, Q = oracle.projectors(D, rows[name].k)
        _close(d_out[name], oracle.block_delta(d_in[name], P, Q, lam))
    # the doubled rank is said wherever a person or a serving engine looks
    card = (result.output / "README.md").read_text()
    assert "rank changed" in card and "max_lora_rank" in card
    assert "rank changed" in (result.output / "csulora_report.md").read_text()
    assert json.loads((result.output / "csulora_report.json").read_text())["rank_changed"] is True


def test_block_config_of_a_plain_adapter_needs_no_patterns(tmp_path, llama_pair):
    adapter = make_peft_adapter(tmp_path / "adapter", llama_pair["aligned"])
    settings = Settings(method="csulora", form="block")
    out = sanitize(adapter, str(llama_pair["aligned"]), output=tmp_path / "out", settings=settings).output
    config, original = json.loads((out / CONFIG).read_text()), json.loads((adapter / CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]) == (8, 8, {}, {})
    assert {k: v for k, v in config.items() if k not in ("r", "lora_alpha")} == {
        k: v for k, v in original.items() if k not in ("r", "lora_alpha")
    }
    assert (out / CONFIG).read_text() == json.dumps(config, indent=2, sort_keys=True)  # as PEFT writes it


@pytest.mark.parametrize("rule", [{"top_n": 5}, {"threshold": "median"}])
def test_safe_lora_loads_in_peft_and_equals_its_formula(tmp_path, llama_pair, displacements, rule):
    adapter = make_peft_adapter(tmp_path / "adapter", llama_pair["aligned"], seed=4, use_rslora=True)
    d_in = merged_deltas(llama_pair["aligned"], adapter)
    scores = {name: oracle.safe_lora_score(d_in[name], D) for name, D in displacements.items()}
    if rule.get("threshold") == "median":  # a τ between two scores that splits the modules in two
        ordered = sorted(scores.values())
        rule = {"threshold": (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2}
        chosen = {name for name, s in scores.items() if s <= rule["threshold"]}
    else:
        chosen = set(sorted(scores, key=scores.get)[: rule["top_n"]])
    assert 0 < len(chosen) < len(scores)
    settings = Settings(method="safe-lora", exact_svd=True, **rule)
    result = sanitize(adapter, str(llama_pair["aligned"]), output=tmp_path / "out", settings=settings)
    assert (result.output / CONFIG).read_bytes() == (adapter / CONFIG).read_bytes()
    d_out = merged_deltas(llama_pair["aligned"], result.output)
    rows = {row.module: row for row in result.report.modules}
    for name, D in displacements.items():
        assert rows[name].safe_lora_score == pytest.approx(scores[name], abs=1e-5)
        assert rows[name].safe_lora_projected == (name in chosen)
        expected = oracle.safe_lora_matrix(D) @ d_in[name] if name in chosen else d_in[name]
        _close(d_out[name], expected)
        # the report's "after" energies are those of the merged update, in the CSULoRA subspace
        P, Q = oracle.projectors(D, rows[name].k)
        parts = oracle.components(d_out[name], P, Q)
        total = float((d_out[name] ** 2).sum())  # the written update's own energy
        for c, x in parts.items():
            assert rows[name].rho_after[c] == pytest.approx(float((x**2).sum()) / total, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("form", ["factored", "block"])
@pytest.mark.parametrize("kind, lam, beta", [("plain", float("inf"), 0.25), ("rslora", 3.0, 0.0),
                                             ("patterns", 1.0, 0.5)])  # fmt: skip
def test_realign_loads_in_peft_and_equals_its_formula(tmp_path, llama_pair, displacements, form, kind, lam, beta):
    """§5b through PEFT: block merges to X* = ΔW − c(F − βD_k) exactly; factored to its best rank-r approximation,
    with the input's config and the report's truncation loss."""
    adapter = make_peft_adapter(tmp_path / "adapter", llama_pair["aligned"], seed=5, **ADAPTERS[kind])
    settings = Settings(method="realign", form=form, lam=lam, beta=beta, subspace_rank=2, exact_svd=True)
    result = sanitize(adapter, str(llama_pair["aligned"]), output=tmp_path / "out", settings=settings)
    d_in, d_out = merged_deltas(llama_pair["aligned"], adapter), merged_deltas(llama_pair["aligned"], result.output)
    rows = {row.module: row for row in result.report.modules}
    config = json.loads((result.output / CONFIG).read_text())
    if form == "factored":
        assert (result.output / CONFIG).read_bytes() == (adapter / CONFIG).read_bytes()
        assert not result.report.rank_changed
    else:
        assert result.report.rank_changed and config["use_rslora"] is False
    for name, D in displacements.items():
        row = rows[name]
        assert row.k == 2 and row.c == (1.0 if lam == float("inf") else lam / (1 + lam)) and row.beta == beta
        X = oracle.realign_delta(d_in[name], D, 2, lam, beta)
        if form == "block":
            assert row.output_rank == row.rank + 2
            _close(d_out[name], X)
        else:
            X_r = oracle.best_rank(X, row.rank)
            _close(d_out[name], X_r)
            loss = float(((X - X_r) ** 2).sum() / (d_in[name] ** 2).sum())
            assert row.truncation_loss == pytest.approx(loss, rel=1e-4, abs=1e-9)
        assert row.erosion == pytest.approx(oracle.erosion(d_in[name], D, 2), rel=1e-4)
        assert row.erosion_after == pytest.approx(oracle.erosion(d_out[name], D, 2), rel=1e-3, abs=1e-5)
    if lam == float("inf") and form == "block":  # F replaced by β D_k exactly
        assert result.report.totals()["erosion_after"] == pytest.approx(beta, abs=1e-4)
