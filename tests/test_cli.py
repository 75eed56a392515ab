"""The ``csulora`` command on bad input (exit 2, one line, nothing written, inputs untouched), existing outputs,
``--debug``, the Hub path through an offline cache, and the demo."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from csulora.cli import app
from tests.conftest import OUTPUT_FILES, make_peft_adapter, run_cli


@pytest.fixture(scope="module")
def template_adapter(llama_pair, tmp_path_factory) -> Path:
    """One PEFT adapter for the module; each test works on its own copy."""
    return make_peft_adapter(tmp_path_factory.mktemp("cli") / "adapter", llama_pair["aligned"], seed=3)


@pytest.fixture
def adapter(template_adapter, tmp_path) -> Path:
    return Path(shutil.copytree(template_adapter, tmp_path / "adapter"))


def tree_hashes(*folders: Path) -> dict[str, str]:
    """sha256 of every file under the folders (absent folders contribute nothing)."""
    return {
        str(f): hashlib.sha256(f.read_bytes()).hexdigest()
        for folder in folders if folder.exists() for f in sorted(folder.rglob("*")) if f.is_file()
    }  # fmt: skip


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    config = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def edit_tensors(file: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def first_key(tensors: dict, suffix: str) -> str:
    return sorted(k for k in tensors if k.endswith(suffix))[0]


def copy_checkpoint(src: Path, dst: Path, card: str | None = None) -> Path:
    shutil.copytree(src, dst)
    if card is None:
        (dst / "README.md").unlink(missing_ok=True)
    else:
        (dst / "README.md").write_text(card)
    return dst


def shard_of(folder: Path, key: str) -> Path:
    return folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][key]


Q0 = "model.layers.0.self_attn.q_proj.weight"


# Each bad input: build it in tmp_path, return (extra CLI args, the file or folder the message must name).
def truncated_adapter(tmp, adapter, pair):
    f = adapter / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return [], f


def empty_adapter_file(tmp, adapter, pair):
    f = adapter / "adapter_model.safetensors"
    f.write_bytes(b"")
    return [], f


def adapter_not_safetensors(tmp, adapter, pair):
    f = adapter / "adapter_model.safetensors"
    torch.save({"x": torch.zeros(3)}, f)  # a pickle zip under the safetensors name
    return [], f


def adapter_text_file(tmp, adapter, pair):
    f = adapter / "adapter_model.safetensors"
    f.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")  # an LFS pointer
    return [], f


def truncated_base_shard(tmp, adapter, pair):
    base = shutil.copytree(pair["base"], tmp / "base")
    shard = shard_of(base, Q0)
    shard.write_bytes(shard.read_bytes()[:-100])
    return ["--base", base], shard


def missing_config(tmp, adapter, pair):
    (adapter / "adapter_config.json").unlink()
    return [], adapter


def missing_adapter_folder(tmp, adapter, pair):
    shutil.rmtree(adapter)
    return [], adapter


def missing_aligned_folder(tmp, adapter, pair):
    return ["--aligned", tmp / "no-such-model"], tmp / "no-such-model"


def nan_in_adapter(tmp, adapter, pair):
    f = adapter / "adapter_model.safetensors"
    edit_tensors(f, lambda t: t[first_key(t, "lora_B.weight")].__setitem__((0, 0), float("nan")))
    return [], f


def inf_in_adapter(tmp, adapter, pair):
    f = adapter / "adapter_model.safetensors"
    edit_tensors(f, lambda t: t[first_key(t, "lora_A.weight")].__setitem__((1, 2), float("-inf")))
    return [], f


def adapter_shape_mismatch(tmp, adapter, pair):
    """A module whose lora_A has another input width than the checkpoint's weight."""
    f = adapter / "adapter_model.safetensors"

    def widen(t):
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        t[key] = torch.cat([t[key], torch.ones(t[key].shape[0], 8)], dim=1)

    edit_tensors(f, widen)
    return [], adapter


def base_shape_mismatch(tmp, adapter, pair):
    base = shutil.copytree(pair["base"], tmp / "other-base")
    edit_tensors(shard_of(base, Q0), lambda t: t.__setitem__(Q0, torch.zeros(64, 48)))
    return ["--base", base], base


def base_is_aligned(tmp, adapter, pair):
    return ["--base", pair["aligned"]], pair["aligned"]


def base_is_a_copy_of_aligned(tmp, adapter, pair):
    copy = copy_checkpoint(pair["aligned"], tmp / "llama-tiny-chat-copy")
    return ["--base", copy], copy


def lora_variant(tmp, adapter, pair):
    """A LoRA variant whose layers compute more than W + s·B·A (DoRA is read; block-diagonal LoRA is not)."""
    edit_config(adapter, use_bdlora=True)
    return [], adapter / "adapter_config.json"


def unknown_lora_tensor(tmp, adapter, pair):
    f = adapter / "adapter_model.safetensors"
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_E"
    edit_tensors(f, lambda t: t.__setitem__(key, torch.ones(4, 1)))
    return [], f


def another_tuner(tmp, adapter, pair):
    edit_config(adapter, peft_type="VERA")
    return [], adapter / "adapter_config.json"


def base_rewriting_init(tmp, adapter, pair):
    edit_config(adapter, init_lora_weights="pissa_niter_4")
    return [], adapter / "adapter_config.json"


def unresolved_base(tmp, adapter, pair):
    """The adapter names the aligned model as its base, and that model's card names no base_model."""
    chat = copy_checkpoint(pair["aligned"], tmp / "chat-without-card", card="---\nlicense: mit\n---\n# chat\n")
    edit_config(adapter, base_model_name_or_path=str(chat))
    return ["--aligned", chat], adapter


def nan_in_aligned(tmp, adapter, pair):
    aligned = copy_checkpoint(pair["aligned"], tmp / "chat", card=f"---\nbase_model: {pair['base']}\n---\n")
    shard = shard_of(aligned, Q0)
    edit_tensors(shard, lambda t: t[Q0].__setitem__((3, 3), float("nan")))
    return ["--aligned", aligned], shard


def missing_shard(tmp, adapter, pair):
    base = shutil.copytree(pair["base"], tmp / "base")
    shard_of(base, Q0).unlink()
    return ["--base", base], shard_of(base, Q0)


def module_not_in_checkpoint(tmp, adapter, pair):
    """An adapter for another architecture: it targets a module the checkpoint does not have."""
    f = adapter / "adapter_model.safetensors"

    def rename(t):
        for side in "AB":
            t[f"base_model.model.model.layers.7.self_attn.q_proj.lora_{side}.weight"] = t.pop(
                f"base_model.model.model.layers.1.self_attn.q_proj.lora_{side}.weight"
            )

    edit_tensors(f, rename)
    return [], pair["aligned"]


def no_base_model_in_config(tmp, adapter, pair):
    edit_config(adapter, base_model_name_or_path=None)
    return [], adapter / "adapter_config.json"


def negative_lambda(tmp, adapter, pair):
    return ["--lambda", "-0.5"], "--lambda"


def seed_out_of_range(tmp, adapter, pair):
    return ["--seed", str(2**64)], "--seed"


def output_under_a_file(tmp, adapter, pair):
    """-o inside something that is not a folder: the write cannot start (root ignores permission bits, so
    a read-only folder would not test this here)."""
    (tmp / "a-file").write_text("x")
    return ["-o", tmp / "a-file" / "out"], tmp / "a-file" / "out"


BAD_INPUTS = [
    truncated_adapter, empty_adapter_file, adapter_not_safetensors, adapter_text_file, truncated_base_shard,
    missing_config, missing_adapter_folder, missing_aligned_folder, nan_in_adapter, inf_in_adapter,
    adapter_shape_mismatch, base_shape_mismatch, base_is_aligned, base_is_a_copy_of_aligned, lora_variant,
    unknown_lora_tensor, another_tuner, base_rewriting_init, unresolved_base, negative_lambda, nan_in_aligned,
    missing_shard, module_not_in_checkpoint, no_base_model_in_config, seed_out_of_range, output_under_a_file,
]  # fmt: skip


def prepare(make, tmp_path: Path, adapter: Path, pair: dict) -> tuple[list[str], list[str], str]:
    extra, named = make(tmp_path, adapter, pair)
    args = ["sanitize", "--adapter", str(adapter), "--aligned", str(pair["aligned"]), "-q", *map(str, extra)]
    # a later --aligned wins in click, so a case can replace the default one
    return args, [str(x) for x in extra], str(named)


@pytest.mark.parametrize("make", BAD_INPUTS, ids=lambda f: f.__name__)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(make, tmp_path, adapter, llama_pair):
    args, _, named = prepare(make, tmp_path, adapter, llama_pair)
    inputs = [tmp_path, llama_pair["base"], llama_pair["aligned"]]
    before, listing = tree_hashes(*inputs), sorted(os.listdir(tmp_path))
    result = invoke(*args)
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and named in lines[0], lines[0]
    assert "Traceback" not in result.output and result.stdout == ""
    assert sorted(os.listdir(tmp_path)) == listing, "no output folder (or temp folder) left behind"
    assert tree_hashes(*inputs) == before, "inputs untouched"


@pytest.mark.parametrize("make", [truncated_adapter, base_is_a_copy_of_aligned], ids=lambda f: f.__name__)
def test_bad_input_in_a_real_process(make, tmp_path, adapter, llama_pair):
    args, _, named = prepare(make, tmp_path, adapter, llama_pair)
    listing = sorted(os.listdir(tmp_path))
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(os.listdir(tmp_path)) == listing


def test_debug_shows_the_traceback(tmp_path, adapter, llama_pair):
    (adapter / "adapter_config.json").unlink()
    proc = run_cli("sanitize", "--adapter", str(adapter), "--aligned", str(llama_pair["aligned"]), "--debug")
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr and "CsuloraError" in proc.stderr
    assert not (tmp_path / "adapter-sanitized").exists()


def test_path_with_brackets_is_named_verbatim(tmp_path, llama_pair):
    """Rich markup must not eat ``[...]`` in a user's path, nor crash on ``[/...]``."""
    for name in ("run[lr=1e-4]", "run[/x]"):
        result = invoke("sanitize", "--adapter", tmp_path / name, "--aligned", llama_pair["aligned"])
        assert result.exit_code == 2, result.output
        assert f"{tmp_path / name}: no such adapter folder" in result.stderr


def test_existing_output_needs_force(tmp_path, adapter, llama_pair):
    out = tmp_path / "adapter-sanitized"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["sanitize", "--adapter", adapter, "--aligned", llama_pair["aligned"], "-q"]
    result = invoke(*args)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: {out}: already exists; pass --force to replace it, "
                                                  "or choose another -o"]  # fmt: skip
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"

    result = invoke(*args, "--force")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == OUTPUT_FILES
    assert sorted(os.listdir(tmp_path)) == ["adapter", "adapter-sanitized"], "no temp or old folder left behind"


def test_output_may_not_overwrite_an_input(tmp_path, adapter, llama_pair):
    before = tree_hashes(adapter)
    for out in (adapter, adapter / "inner", llama_pair["aligned"]):
        result = invoke("sanitize", "--adapter", adapter, "--aligned", llama_pair["aligned"], "-o", out, "--force")
        assert result.exit_code == 2 and "overwrite the input" in result.stderr, result.output
    assert tree_hashes(adapter) == before


def test_identical_inputs_give_identical_bytes(tmp_path, adapter, llama_pair):
    """DESIGN.md §7: byte-identical output for identical inputs and options (the report's timings aside)."""
    outs = [tmp_path / "one", tmp_path / "two"]
    for out in outs:
        result = invoke("sanitize", "--adapter", adapter, "--aligned", llama_pair["aligned"], "-o", out, "-q")
        assert result.exit_code == 0, result.output
    same = [name for name in OUTPUT_FILES if (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()]
    assert {"adapter_model.safetensors", "adapter_config.json", "csulora_report.json"} <= set(same)


# --- the Hub path, offline ----------------------------------------------------------------------------------------


def add_to_hub_cache(hub: Path, repo_id: str, files: dict[str, Path]) -> str:
    """Lay files out as huggingface_hub's cache does: blobs/<sha256>, snapshots/<commit>/<name> → blob symlinks,
    refs/main holding the commit. Returns the commit hash."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name, src in files.items():
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return commit


@pytest.fixture(scope="module")
def hub_cache(llama_pair, tmp_path_factory) -> dict:
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    home = tmp_path_factory.mktemp("hf_home")
    hub = home / "hub"
    commits = {}
    for repo_id, folder, card in (
        ("org/llama-tiny", llama_pair["base"], None),
        ("org/llama-tiny-chat", llama_pair["aligned"], "---\nbase_model: org/llama-tiny\nlicense: mit\n---\n# chat\n"),
    ):
        files = {f.name: f for f in folder.iterdir() if f.suffix in (".json", ".safetensors")}
        if card is not None:
            (home / "card.md").write_text(card)
            files["README.md"] = home / "card.md"
        commits[repo_id] = add_to_hub_cache(hub, repo_id, files)
    # the installed huggingface_hub reads this layout as its own cache
    info = {r.repo_id: r for r in scan_cache_dir(hub).repos}
    assert set(info) == set(commits)
    for repo_id, commit in commits.items():
        (revision,) = info[repo_id].revisions
        assert revision.commit_hash == commit and revision.refs == {"main"}
        path = try_to_load_from_cache(repo_id, "config.json", cache_dir=hub)
        assert path is not None and Path(path).parent.name == commit
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    if "HF_HUB_CACHE" in os.environ or "HUGGINGFACE_HUB_CACHE" in os.environ:
        env["HF_HUB_CACHE"] = str(hub)  # an inherited cache location would win over HF_HOME
    return {"env": env, "commits": commits}


def test_hub_ids_offline_as_in_the_users_example(hub_cache, template_adapter, llama_pair, tmp_path):
    """``csulora sanitize --adapter ./out --aligned org/llama-tiny-chat``: the adapter was trained on the chat
    model, whose cached card names the base; the output goes to ./out-sanitized."""
    shutil.copytree(template_adapter, tmp_path / "out")
    edit_config(tmp_path / "out", base_model_name_or_path="org/llama-tiny-chat")
    proc = run_cli("sanitize", "--adapter", "./out", "--aligned", "org/llama-tiny-chat", cwd=tmp_path,
                   env=hub_cache["env"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out-sanitized"
    assert sorted(p.name for p in out.iterdir()) == OUTPUT_FILES
    report = json.loads((out / "csulora_report.json").read_text())
    assert report["inputs"]["base"]["ref"] == "org/llama-tiny"
    assert report["inputs"]["base"]["source"] == "aligned model card"
    assert report["inputs"]["aligned"]["revision"] == hub_cache["commits"]["org/llama-tiny-chat"]
    assert report["inputs"]["base"]["revision"] == hub_cache["commits"]["org/llama-tiny"]
    # the same files through local folders give the same tensors
    local = invoke("sanitize", "--adapter", tmp_path / "out", "--aligned", llama_pair["aligned"],
                   "--base", llama_pair["base"], "-o", tmp_path / "local", "-q")  # fmt: skip
    assert local.exit_code == 0, local.output
    hub_tensors, local_tensors = (
        load_file(out / "adapter_model.safetensors"),
        load_file(tmp_path / "local" / "adapter_model.safetensors"),
    )
    assert hub_tensors.keys() == local_tensors.keys()
    assert all(torch.equal(hub_tensors[k], local_tensors[k]) for k in hub_tensors)
    original = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert any(not torch.equal(original[k], hub_tensors[k]) for k in original), "the adapter was corrected"


def test_uncached_hub_id_offline_is_one_line(hub_cache, template_adapter, tmp_path):
    shutil.copytree(template_adapter, tmp_path / "out")
    edit_config(tmp_path / "out", base_model_name_or_path="org/llama-tiny-chat")
    proc = run_cli("sanitize", "--adapter", "./out", "--aligned", "org/not-cached", "--base", "org/llama-tiny",
                   cwd=tmp_path, env=hub_cache["env"])  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "org/not-cached" in lines[0] and "cache" in lines[0], proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["out"]


# --- the demo -------------------------------------------------------------------------------------------------------


def test_layer_without_displacement_warns_and_is_attenuated(tmp_path, adapter, llama_pair):
    """DESIGN.md §2: D = 0 gives an empty subspace (P = Q = 0), so by §3–§4 the whole update is off-subspace
    (ρ_O = 1) and is scaled by γ² = 1/(1 + λ)²; the layer is reported and warned about."""
    base = shutil.copytree(llama_pair["base"], tmp_path / "base")
    aligned_q0 = load_file(shard_of(llama_pair["aligned"], Q0))[Q0]
    edit_tensors(shard_of(base, Q0), lambda t: t.__setitem__(Q0, aligned_q0))
    out = tmp_path / "out"
    result = invoke("sanitize", "--adapter", adapter, "--aligned", llama_pair["aligned"], "--base", base, "-o", out,
                    "--method", "csulora", "--lambda", "1")
    assert result.exit_code == 0, result.output
    assert "warning: model.layers.0.self_attn.q_proj: base and aligned weights are equal" in result.stderr
    report = json.loads((out / "csulora_report.json").read_text())
    rows = {m["module"]: m for m in report["modules"]}
    q0 = rows["model.layers.0.self_attn.q_proj"]
    assert (q0["k"], q0["rho"]["O"], q0["gamma_in"], q0["gamma_out"]) == (0, 1.0, 0.5, 0.5)  # λ = 1
    assert abs(q0["retained_norm"] - 0.25) < 1e-12
    assert "empty subspace" in q0["notes"] and len(report["warnings"]) == 1
    before, after = load_file(adapter / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    for side in ("A", "B"):
        key = f"{prefix}.lora_{side}.weight"
        torch.testing.assert_close(after[key], 0.5 * before[key])
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert len(changed) > 20, "the other layers are corrected"


def test_audit_reports_and_writes_nothing(tmp_path, adapter, llama_pair):
    listing = sorted(os.listdir(tmp_path))
    result = invoke("audit", "--adapter", adapter, "--aligned", llama_pair["aligned"], "--exact-svd")
    assert result.exit_code == 0, result.output
    assert "layers.1.mlp.down_proj" in result.stdout and "csulora audit" in result.stdout
    assert "module names under model." in result.stdout  # the narrow table leaves the common prefix out
    assert sorted(os.listdir(tmp_path)) == listing


def test_audit_html_into_a_folder_exits_2(tmp_path, adapter, llama_pair):
    result = invoke("audit", "--adapter", adapter, "--aligned", llama_pair["aligned"], "--html", tmp_path, "-q")
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "is a folder" in result.stderr and "Traceback" not in result.output


def test_failed_run_with_force_keeps_the_existing_output(tmp_path, adapter, llama_pair):
    out = tmp_path / "adapter-sanitized"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    truncated_adapter(tmp_path, adapter, llama_pair)
    result = invoke("sanitize", "--adapter", adapter, "--aligned", llama_pair["aligned"], "--force")
    assert result.exit_code == 2, result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["adapter", "adapter-sanitized"]
