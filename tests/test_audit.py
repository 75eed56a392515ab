"""``csulora audit`` (the gate), ``--json`` on stdout, the JSON Schema, the HTML report, the CI example."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import jsonschema
import pytest

from csulora import Settings, audit, sanitize
from csulora.errors import CsuloraError
from csulora.reports.gate import Thresholds, violations
from csulora.reports.report_html import to_html
from tests.conftest import REPO, make_peft_adapter, run_cli


@pytest.fixture(scope="module")
def schema() -> dict:
    """The schema as the installed package ships it (package data)."""
    text = resources.files("csulora").joinpath("report.schema.json").read_text()
    schema = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, llama_pair) -> Path:
    """A folder of two PEFT adapters."""
    root = tmp_path_factory.mktemp("adapters")
    make_peft_adapter(root / "one", llama_pair["aligned"], seed=1)
    make_peft_adapter(root / "two", llama_pair["aligned"], seed=2, r=2, lora_alpha=4)
    return root


@pytest.fixture(scope="module")
def report(adapters, llama_pair):
    return audit(adapters / "one", str(llama_pair["aligned"])).report


def test_thresholds_compare_the_documented_values(report):
    """Each threshold against the value docs/audit.md names, just above and just below it."""
    off = report.totals()["off_energy_before"]
    assert violations(report, Thresholds(max_off_energy=off + 1e-9)) == []
    [v] = violations(report, Thresholds(max_off_energy=off - 1e-9))
    assert v["value"] == off and sum(m["value"] for m in v["modules"]) == pytest.approx(off)
    worst = max(report.modules, key=lambda m: m.off_before)
    assert violations(report, Thresholds(max_layer_off_energy=worst.off_before)) == []
    [v] = violations(report, Thresholds(max_layer_off_energy=worst.off_before - 1e-9))
    assert [m["module"] for m in v["modules"]] == [worst.module]
    lowest = min(report.modules, key=lambda m: m.safe_lora_score)
    assert violations(report, Thresholds(min_safe_lora_score=lowest.safe_lora_score)) == []
    [v] = violations(report, Thresholds(min_safe_lora_score=lowest.safe_lora_score + 1e-9))
    assert v["modules"] == [{"module": lowest.module, "value": lowest.safe_lora_score}]
    erosion = report.totals()["erosion_before"]
    assert violations(report, Thresholds(min_erosion=erosion)) == []
    [v] = violations(report, Thresholds(min_erosion=erosion + 1e-9))
    assert v["value"] == erosion and all(m["value"] < 0 for m in v["modules"])
    shares = [m["value"] for m in v["modules"]]
    assert shares == sorted(shares)  # worst first


def eroding_adapter(folder: Path, llama_pair, coefficient: float) -> Path:
    """A PEFT adapter whose update is ``coefficient · D_4`` in every module: it turns the alignment back."""
    import torch
    from safetensors.torch import load_file, save_file

    from tests.test_methods_peft import _weights, load_llama

    make_peft_adapter(folder, llama_pair["aligned"], seed=9)
    aligned, base = _weights(load_llama(llama_pair["aligned"])), _weights(load_llama(llama_pair["base"]))
    tensors = load_file(folder / "adapter_model.safetensors")
    for name in aligned:
        U, S, Vh = torch.linalg.svd(aligned[name] - base[name], full_matrices=False)
        scaling = 8 / 4  # lora_alpha / r of make_peft_adapter
        B = coefficient / scaling * U[:, :4] * S[:4]
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.float().contiguous()
        tensors[f"base_model.model.{name}.lora_A.weight"] = Vh[:4].float().contiguous()
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return folder


def test_min_erosion_fails_an_eroding_adapter_until_realign_fixes_it(tmp_path, llama_pair, schema):
    """audit --min-erosion: an update along −D fails the gate; re-aligned (λ = ∞, β = 0) it passes."""
    adapter = eroding_adapter(tmp_path / "eroding", llama_pair, -0.5)
    base = ["audit", "--aligned", str(llama_pair["aligned"]), "--subspace-rank", "4", "--min-erosion", "-0.1"]
    bad = run_cli(*base, "--adapter", str(adapter), "--json")
    assert bad.returncode == 1, bad.stderr
    document = json.loads(bad.stdout)
    jsonschema.validate(document, schema)
    [v] = document["violations"]
    assert v["threshold"] == "min_erosion" and v["value"] == pytest.approx(-0.5, abs=1e-3)
    assert "erosion coefficient -0.500 < -0.100" in bad.stderr and "model.layers." in bad.stderr
    out = tmp_path / "fixed"
    fixed = run_cli("sanitize", "--adapter", str(adapter), "--aligned", str(llama_pair["aligned"]), "-o", str(out),
                    "--method", "realign", "--lambda", "inf", "--beta", "0", "--subspace-rank", "4", "-q")  # fmt: skip
    assert fixed.returncode == 0, fixed.stderr
    report = json.loads((out / "csulora_report.json").read_text())
    assert report["totals"]["erosion_before"] == pytest.approx(-0.5, abs=1e-3)
    assert abs(report["totals"]["erosion_after"]) < 1e-3
    ok = run_cli(*base, "--adapter", str(out))
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize(
    "settings",
    [Settings(method="csulora"), Settings(method="csulora", form="block"), Settings(method="safe-lora", top_n=3),
     Settings(method="realign"), Settings(method="realign", form="block", lam=float("inf"), beta=0.5)],
    ids=["factored", "block", "safe-lora", "realign", "realign-block"],
)
def test_every_report_validates_against_the_schema(tmp_path, adapters, llama_pair, schema, settings):
    out = sanitize(adapters / "two", str(llama_pair["aligned"]), output=tmp_path / "out", settings=settings).output
    document = json.loads((out / "csulora_report.json").read_text())
    jsonschema.validate(document, schema)
    assert document["method"] == settings.method and document["form"] == settings.form
    with pytest.raises(jsonschema.ValidationError):  # the schema does constrain: a row without its energies
        del document["modules"][0]["rho"]
        jsonschema.validate(document, schema)


def test_html_report_is_self_contained_with_chart_and_table(tmp_path, adapters, llama_pair):
    settings = Settings(method="csulora")
    out = sanitize(adapters / "one", str(llama_pair["aligned"]), output=tmp_path / "out", settings=settings).output
    html = (out / "csulora_report.html").read_text()
    report = json.loads((out / "csulora_report.json").read_text())
    # nothing fetched at view time: no URL, no external resource, no script
    assert not re.search(r"https?:|//[a-z0-9.-]+\.[a-z]{2,}/|\bsrc\s*=|<link|<script|@import|url\(", html, re.I)
    assert html.startswith("<!doctype html>") and html.count("<svg") == 1 and "</html>" in html
    n = len(report["modules"])
    # one labelled row of bars per module; the four components have their colours; one table row per module
    assert html.count('class="which">before<') == n and html.count('class="which">after<') == n
    for color in ("#2f855a", "#d4a017", "#e07b24", "#c53030"):
        assert f'fill="{color}"' in html
    assert html.count("<tr>") == n + 1  # header + modules
    for m in report["modules"]:
        assert f"{m['gamma_in']:.3f}" in html and m["module"] in html


def test_html_of_block_and_safe_lora_reports(report):
    adapter, aligned = report.inputs["adapter"]["path"], report.inputs["aligned"]["ref"]
    block = to_html(audit(adapter, aligned, settings=Settings(method="csulora", form="block")).report)
    assert "rank changed: 4 → 8" in block and "maximum LoRA rank" in block
    assert "rank changed" not in to_html(report)
    safe = audit(adapter, aligned, settings=Settings(method="safe-lora", top_n=2)).report
    assert to_html(safe).count(">C·B</text>") == 2  # the projected modules are marked in the chart


def test_realign_report_shows_what_it_did(report):
    """c, ρ_F after, the truncation loss and the erosion coefficient before → after, in every rendering."""
    from rich.console import Console

    from csulora.reports.report import to_markdown, to_table

    adapter, aligned = report.inputs["adapter"]["path"], report.inputs["aligned"]["ref"]
    realigned = audit(adapter, aligned, settings=Settings(method="realign", lam=3.0, beta=0.5)).report
    m = realigned.modules[0]
    assert m.c == 0.75 and m.beta == 0.5 and m.truncation_loss is not None and m.erosion_after != m.erosion
    erosion = f"{m.erosion:+.3f} → {m.erosion_after:+.3f}"
    html = to_html(realigned)
    assert f"{m.erosion:+.3f}</text>" in html and f"{m.erosion_after:+.3f}</text>" in html and erosion in html
    markdown = to_markdown(realigned)
    assert "| c | ρ_F after | trunc. loss |" in markdown and erosion in markdown and "re-alignment" in markdown
    console = Console(width=250, record=True)
    console.print(to_table(realigned, wide=True))  # --wide: every column
    text = console.export_text()
    assert "trunc. loss" in text and erosion in text and "erosion coefficient" in text


def test_audit_cli_json_passes_and_fails(adapters, llama_pair, schema):
    base = ["audit", "--adapter", str(adapters / "one"), "--adapter", str(adapters / "two")]
    base += ["--aligned", str(llama_pair["aligned"]), "--json"]
    ok = run_cli(*base, "--max-off-energy", "1", "--max-layer-off-energy", "1", "--min-safe-lora-score", "-1")
    assert ok.returncode == 0, ok.stderr
    document = json.loads(ok.stdout)  # stdout is the JSON and nothing else
    jsonschema.validate(document, schema)
    assert document["passed"] and len(document["reports"]) == 2 and "csulora audit" in ok.stderr

    bad = run_cli(*base, "--max-layer-off-energy", "0.5")
    assert bad.returncode == 1
    document = json.loads(bad.stdout)
    jsonschema.validate(document, schema)
    assert not document["passed"]
    worst = {v["adapter"]: v["modules"][0]["module"] for v in document["violations"]}
    assert worst and all(module in bad.stderr and adapter in bad.stderr for adapter, module in worst.items())
    assert "Traceback" not in bad.stderr


def test_audit_cli_bad_input_exits_2(tmp_path, llama_pair):
    result = run_cli("audit", "--adapter", "nowhere", "--aligned", str(llama_pair["aligned"]), "--json", cwd=tmp_path)
    assert result.returncode == 2 and "no such adapter folder" in result.stderr and result.stdout == ""
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "limits", [Thresholds(max_off_energy=1.5), Thresholds(max_layer_off_energy=-0.1), Thresholds(min_safe_lora_score=2)]
)
def test_thresholds_out_of_range_are_bad_input(limits):
    with pytest.raises(CsuloraError, match="must be"):
        limits.validate()


def test_sanitize_cli_json_prints_the_report_only(tmp_path, adapters, llama_pair, schema):
    out = tmp_path / "out"
    result = run_cli("sanitize", "--adapter", str(adapters / "one"), "--aligned", str(llama_pair["aligned"]),
                     "-o", str(out), "--form", "block", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    jsonschema.validate(document, schema)
    assert document == json.loads((out / "csulora_report.json").read_text())
    assert "rank changed" in result.stderr and f"wrote {out}" in result.stderr
    assert (out / "csulora_report.html").is_file()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_ci_example_fails_over_threshold_and_sanitizes_otherwise(tmp_path, adapters, llama_pair):
    script = REPO / "examples" / "ci" / "audit-then-sanitize.sh"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "CSULORA": f"{sys.executable} -m csulora",
           "ADAPTERS_DIR": str(adapters), "ALIGNED": str(llama_pair["aligned"])}  # fmt: skip

    def run(out: Path, **limits: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(script)], env={**env, "OUT_DIR": str(out), **limits},
                              capture_output=True, text=True, timeout=300)  # fmt: skip

    failed = run(tmp_path / "gate-failed", MAX_LAYER_OFF_ENERGY="0.3", MIN_EROSION="1")
    assert failed.returncode == 1 and "nothing sanitized" in failed.stderr
    document = json.loads((tmp_path / "gate-failed" / "audit.json").read_text())
    assert not document["passed"]
    assert {v["threshold"] for v in document["violations"]} == {"max_layer_off_energy", "min_erosion"}
    assert not (tmp_path / "gate-failed" / "one").exists()

    passed = run(tmp_path / "gate-passed", MAX_OFF_ENERGY="0.99")
    assert passed.returncode == 0, passed.stderr
    for name in ("one", "two"):
        assert (tmp_path / "gate-passed" / name / "adapter_model.safetensors").is_file()
        assert (tmp_path / "gate-passed" / name / "csulora_report.html").is_file()


@pytest.mark.parametrize("settings", [Settings(method="safe-lora", top_n=3), Settings(method="csulora", form="block")],
                         ids=["safe-lora", "csulora-block"])  # fmt: skip
def test_before_only_from_the_checkpoints(adapters, llama_pair, schema, settings, monkeypatch):
    """From the checkpoints too: the full audit's "before" values (Safe LoRA's exact score where the method reads
    ``D``), "after" values null; the second adapter of a batch loads no cache entry from disk again."""
    from csulora.cache import SubspaceCache, SubspaceSource

    loads = []
    load = SubspaceCache.load
    monkeypatch.setattr(SubspaceCache, "load", lambda self, *a: loads.append(a[0]) or load(self, *a))
    source = SubspaceSource.open(adapters.parent / f"cache-{settings.method}")
    full = audit(adapters / "two", str(llama_pair["aligned"]), settings=settings, subspaces=source).report
    fast = audit(adapters / "two", str(llama_pair["aligned"]), settings=settings, subspaces=source,
                 before_only=True).report  # fmt: skip
    assert len(loads) == len(full.modules) and source.computed == len(full.modules)  # the first run only
    for a, b in zip(full.modules, fast.modules, strict=True):
        assert (a.module, a.rho, a.erosion, a.safe_lora_score, a.update_norm) == \
            (b.module, b.rho, b.erosion, b.safe_lora_score, b.update_norm)  # fmt: skip
    document = fast.to_dict()
    jsonschema.validate(document, schema)
    assert document["totals"]["erosion_after"] is None and document["modules"][0]["rho_after"] is None
    r = run_cli("audit", "--model", str(llama_pair["aligned"]), "--aligned", str(llama_pair["aligned"]),
                "--before-only")  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--before-only" in r.stderr
