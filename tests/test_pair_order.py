"""Issue 20: a swapped aligned/base pair is refused on every command and every shipped world; reports and cards
say which checkpoint was which and where each came from; the merged-model gate of the README passes on what
``sanitize --model`` wrote. Issue 23: cards show no local path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_cli

from csulora.world import ALIGNED, BASE, FULL, world_dir, world_names

WORLDS = world_names()


def first_adapter(root: Path) -> Path:
    return sorted(p for p in (root / "adapters").iterdir() if p.is_dir())[0]


def swapped_commands(root: Path, out: Path) -> dict[str, list]:
    """Every command that reads a pair, with --aligned and --base swapped (the pretrained model as --aligned)."""
    pair = ["--aligned", root / BASE, "--base", root / ALIGNED]
    adapter, model = first_adapter(root), root / FULL / "full-mixed-s0"
    return {
        "audit": ["audit", "--adapter", adapter, *pair, "--min-erosion", "-0.1"],
        "sanitize": ["sanitize", "--adapter", adapter, *pair, "-o", out / "sanitized"],
        "batch": ["sanitize", "--adapter", root / "adapters", *pair, "-o", out / "batch"],
        "sweep": ["sweep", "--adapter", adapter, *pair, "-o", out / "sweep", "--lambdas", "1"],
        "subspace": ["subspace", *pair],
        "audit --model": ["audit", "--model", model, *pair],
        "sanitize --model": ["sanitize", "--model", model, *pair, "-o", out / "model"],
        "sweep --model": ["sweep", "--model", model, *pair, "-o", out / "model-sweep", "--lambdas", "1"],
        # the base comes from the adapter's config, which names the chat model (a folder beside it: run there)
        "no --base": ["audit", "--adapter", adapter, "--aligned", BASE],
    }


@pytest.mark.parametrize("world", WORLDS)
def test_a_swapped_pair_is_refused_on_every_command(world, tmp_path):
    root = world_dir(world)
    for what, args in swapped_commands(root, tmp_path).items():
        result = run_cli(*args, "-q", in_process=True, cwd=root if what == "no --base" else None)
        line = assert_one_line_error(result, "look swapped", "--allow-swapped")
        assert BASE in line and ALIGNED in line, (what, line)  # both checkpoints named
        assert "the model card of llama-world-chat says base_model" in line, (what, line)  # the evidence
        if what in ("audit", "sanitize", "sweep", "no --base"):  # what the adapter itself says
            assert "base_model_name_or_path is 'llama-world-chat', the checkpoint given as --base" in line or \
                what == "no --base", (what, line)  # fmt: skip
        if what.endswith("--model"):
            assert "the base_model of full-mixed-s0's card is 'llama-world-chat'" in line, line
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_allow_swapped_runs_and_the_report_says_so(tmp_path):
    root = world_dir("tiny")
    adapter = root / "adapters" / "adv-r8-all-s0"
    right = run_cli("audit", "--adapter", adapter, "--aligned", root / ALIGNED, "--json", "-q", in_process=True)
    swapped = run_cli("audit", "--adapter", adapter, "--aligned", root / BASE, "--base", root / ALIGNED,
                      "--allow-swapped", "--json", "-q", in_process=True)  # fmt: skip
    assert swapped.returncode == 0, swapped.stderr
    before = json.loads(right.stdout)["reports"][0]
    after = json.loads(swapped.stdout)["reports"][0]
    assert before["inputs"]["pair_order"]["verdict"] == "agrees"
    assert after["inputs"]["pair_order"]["verdict"] == "swapped, allowed by --allow-swapped"
    assert any("given as --base" in e for e in after["inputs"]["pair_order"]["evidence"])
    # what a swap does: D changes sign, and so does the adapter's erosion (its modules are LoRA factors)
    assert before["totals"]["erosion_before"] < 0
    assert after["totals"]["erosion_before"] == pytest.approx(-before["totals"]["erosion_before"], abs=1e-4)


def copy_without_metadata(root: Path, tmp: Path) -> dict[str, Path]:
    """The world's pair and one adapter with no card and no base_model_name_or_path: nothing says which is which."""
    paths = {}
    for name in (BASE, ALIGNED):
        paths[name] = shutil.copytree(root / name, tmp / f"ckpt-{len(paths)}")
        (paths[name] / "README.md").unlink()
    paths["adapter"] = shutil.copytree(root / "adapters" / "adv-r8-all-s0", tmp / "adapter")
    config = json.loads((paths["adapter"] / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (paths["adapter"] / "adapter_config.json").write_text(json.dumps(config))
    return paths


def test_without_metadata_the_weights_only_warn(tmp_path):
    """No metadata: not refused (a weight signal cannot tell a swap from an adapter that strengthens alignment,
    docs/audit.md), but an adapter whose erosion is positive is warned about."""
    paths = copy_without_metadata(world_dir("tiny"), tmp_path)
    common = ["audit", "--adapter", paths["adapter"], "--json", "-q"]
    right = run_cli(*common, "--aligned", paths[ALIGNED], "--base", paths[BASE], in_process=True)
    swapped = run_cli(*common, "--aligned", paths[BASE], "--base", paths[ALIGNED], in_process=True)
    assert right.returncode == swapped.returncode == 0, swapped.stderr
    reports = [json.loads(r.stdout)["reports"][0] for r in (right, swapped)]
    assert [r["inputs"]["pair_order"]["verdict"] for r in reports] == ["no metadata says"] * 2
    assert "as a swapped pair would look" not in right.stderr
    assert "as a swapped pair would look" in swapped.stderr and "erosion is +0.2" in swapped.stderr


@pytest.mark.parametrize("world", WORLDS)
def test_reports_name_each_checkpoint_and_where_it_came_from(world, tmp_path):
    root = world_dir(world)
    out = tmp_path / "out"
    result = run_cli("sanitize", "--adapter", first_adapter(root), "--aligned", root / ALIGNED, "-o", out, "-q",
                     in_process=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    inputs = json.loads((out / "csulora_report.json").read_text())["inputs"]
    assert inputs["aligned"]["source"] == "--aligned" and inputs["base"]["source"] == "aligned model card"
    assert inputs["pair_order"] == {"verdict": "agrees", "evidence": [
        "the adapter's base_model_name_or_path names the aligned checkpoint",
        "the aligned model's card names the base as its base_model"]}  # fmt: skip
    words = "(from --aligned), base `"
    for name in ("csulora_report.md", "README.md"):
        text = (out / name).read_text()
        assert words in text and "(from aligned model card)" in text and "their order: agrees" in text, name
    html = (out / "csulora_report.html").read_text()
    assert "(from --aligned)" in html and "(from aligned model card)" in html


def assert_no_local_path(card: str, *paths: Path) -> None:
    for path in paths:
        for folder in (path, *path.parents[:-1]):
            if len(folder.parts) > 1:
                assert str(folder) not in card, (folder, card)


def test_cards_show_no_local_path_and_a_full_models_card_names_the_aligned_model(tmp_path):
    root = world_dir("tiny")
    adapter, model, out = first_adapter(root), root / FULL / "full-mixed-s0", tmp_path / "out"
    pair = ["--aligned", root / ALIGNED, "--base", root / BASE]
    from huggingface_hub import metadata_load

    from csulora import sanitize
    from csulora.models import sanitize_model

    for kind, run, subject in (("adapter", sanitize, adapter), ("model", sanitize_model, model)):
        command = ["csulora", "sanitize", f"--{kind}", str(subject), *map(str, pair), "-o", str(out / kind)]
        run(subject, str(root / ALIGNED), str(root / BASE), out / kind, command=command)

    for kind in ("adapter", "model"):
        card = (out / kind / "README.md").read_text()
        assert_no_local_path(card, adapter, model, root, out)
        assert f"-o {kind}" in card and f"--aligned {ALIGNED} --base {BASE}" in card  # the command, by folder names
        assert metadata_load(out / kind / "README.md")["base_model"] == ALIGNED
    card = (out / "model" / "README.md").read_text()
    assert "This model is `full-mixed-s0`" in card and "adapter" not in card.lower()


def test_the_readme_merged_model_gate_passes_on_what_sanitize_wrote(tmp_path):
    """docs/models.md: ``audit --model M … --min-erosion -0.1 --fail-on-kept || sanitize --model M …``; the
    fine-tune fails the gate, its sanitized copy passes it (its changed norms are listed, not failed)."""
    root = world_dir("tiny")
    gate = ["--aligned", root / ALIGNED, "--min-erosion", "-0.1", "--fail-on-kept", "-q"]
    model, out = root / FULL / "full-mixed-s0", tmp_path / "merged-sanitized"
    failed = run_cli("audit", "--model", model, *gate, in_process=True)
    assert failed.returncode == 1 and "erosion coefficient" in failed.stderr
    done = run_cli("sanitize", "--model", model, "--aligned", root / ALIGNED, "-o", out, "-q", in_process=True)
    assert done.returncode == 0, done.stderr
    passed = run_cli("audit", "--model", out, *gate, "--json", in_process=True)
    assert passed.returncode == 0, passed.stderr
    report = json.loads(passed.stdout)["reports"][0]
    assert report["totals"]["erosion_before"] > -0.1
    kept = report["kept"]
    assert kept and all(k["kind"] == "outside-method" and not k["identical_to_aligned"] for k in kept)
    # what the fine-tune changed and no method corrects (DESIGN.md §10): norms, embeddings, the head
    assert {k["key"] for k in kept} >= {"model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"}
