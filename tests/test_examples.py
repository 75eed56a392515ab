"""The batch examples run their own command lines here, with two shards over a folder of five adapters: the
Slurm scripts through ``submit.sh`` and a stand-in ``sbatch``, the Kubernetes Jobs' container commands and
env, the GitHub Actions workflow's ``run:`` steps with the matrix values substituted. Each first fills a
subspace cache as its precompute step says; the union of the sharded outputs equals one plain unsharded
``csulora sanitize`` byte for byte, every file, and the precomputed subspaces were all the shards needed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from csulora.cli import card_command
from csulora.synthetic import SIZES, write_adapter, write_pair
from tests.conftest import OUTPUT_FILES, REPO, folder_bytes, run_cli

try:
    import yaml
except ImportError:  # the test extra has it; without it only the Slurm example is run
    yaml = None
needs_yaml = pytest.mark.skipif(yaml is None, reason="PyYAML (the test extra) reads the Kubernetes and CI files")

EXAMPLES = REPO / "examples"
ADAPTERS = [f"adapter-{i:02d}" for i in range(5)]
SHARDS = 2
OPTIONS = ["--lambda", "8", "--subspace-energy", "0.5"]  # CSULORA_OPTIONS; its subspace part: SUBSPACE_OPTIONS
# A stand-in for sbatch: runs each job at once (an array's tasks concurrently, with Slurm's array variables),
# so that a dependency is met by submission order, and records it with the cache size after it.
FAKE_SBATCH = """#!{python}
import json, os, subprocess, sys
from pathlib import Path
opts, script = sys.argv[1:-1], sys.argv[-1]
log = Path(os.environ["SBATCH_LOG"])
jobs = json.loads(log.read_text()) if log.exists() else []
job = 1000 + len(jobs)
array = next((o.split("=", 1)[1] for o in opts if o.startswith("--array=")), None)
lo, hi = map(int, array.split("-")) if array else (None, None)
tasks = [{{}}] if array is None else [
    {{"SLURM_ARRAY_JOB_ID": str(job), "SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_TASK_MIN": str(lo),
      "SLURM_ARRAY_TASK_MAX": str(hi), "SLURM_ARRAY_TASK_COUNT": str(hi - lo + 1)}} for i in range(lo, hi + 1)]
outs = [log.with_name(f"slurm-{{job}}_{{n}}.out") for n in range(len(tasks))]  # as Slurm's --output
procs = [subprocess.Popen(["bash", script], env={{**os.environ, "SLURM_JOB_ID": str(job), **t}}, stdout=out.open("w"),
                          stderr=subprocess.STDOUT) for t, out in zip(tasks, outs)]
if any(p.wait() for p in procs):
    sys.exit(f"job {{job}} failed: " + " ".join(out.read_text() for out in outs))
entries = len(list(Path(os.environ["CACHE_DIR"]).rglob("*.safetensors")))  # the cache after the job
log.write_text(json.dumps(jobs + [{{"id": job, "options": opts, "script": script, "cache_entries": entries}}]))
print(job if "--parsable" in opts else f"Submitted batch job {{job}}")
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A synthetic pair, five adapters, ``csulora`` on PATH, and the bytes of one plain unsharded run."""
    root = tmp_path_factory.mktemp("batch")
    pair = write_pair(root / "pair", SIZES["tiny"], spectrum="fine-tune", dtype=torch.bfloat16, shard_bytes=40_000)
    for i, name in enumerate(ADAPTERS):
        write_adapter(root / "adapters" / name, SIZES["tiny"], str(pair["aligned"]), r=4, alpha=8, a_std=None,
                      b_std=0.01, seed=i)  # fmt: skip
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / "csulora").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m csulora "$@"\n')
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(python=sys.executable))
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    paths = {"ADAPTERS_DIR": root / "adapters", "ALIGNED": pair["aligned"], "BASE": pair["base"],
             "OUT_DIR": root / "out"}  # fmt: skip
    plain = run_cli("sanitize", "--adapter", paths["ADAPTERS_DIR"], "--aligned", paths["ALIGNED"], "--base",
                    paths["BASE"], "-o", paths["OUT_DIR"], *OPTIONS,
                    env={"CSULORA_CACHE": str(root / "cache-plain")})  # fmt: skip
    assert plain.returncode == 0, plain.stderr
    reference = folder_bytes(paths["OUT_DIR"])
    assert sorted(reference) == [f"{a}/{f}" for a in ADAPTERS for f in OUTPUT_FILES]
    shutil.rmtree(paths["OUT_DIR"])
    env = {**os.environ, **{k: str(v) for k, v in paths.items()}, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CSULORA_OPTIONS": " ".join(OPTIONS),
           "SUBSPACE_OPTIONS": " ".join(OPTIONS[2:])}  # fmt: skip
    return {"root": root, "out": paths["OUT_DIR"], "env": env, "reference": reference}


@pytest.fixture
def example(world, request) -> dict:
    """The environment of one example's run: the module's, with a fresh cache; no output yet."""
    cache = world["root"] / f"cache-{request.node.name}"
    shutil.rmtree(world["out"], ignore_errors=True)
    log = world["root"] / f"sbatch-{request.node.name}.json"
    return {**world["env"], "CACHE_DIR": str(cache), "SBATCH_LOG": str(log)}


def test_card_leaves_out_scheduling_options(world):
    argv = ["sanitize", "--adapter", "a", "--shard", "1/2", "--skip-existing", "-q", "--cache-dir=/c", "--aligned",
            "b", "--shard=2/2", "-o", "o", "--lambda", "2", "--json", "--no-cache", "--force", "--debug", "--quiet",
            "--cache-dir", "/d", "--trust-pickle", "--wide"]  # fmt: skip
    assert card_command(argv) == ["csulora", "sanitize", "--adapter", "a", "--aligned", "b", "-o", "o", "--lambda",
                                  "2", "--trust-pickle"]  # fmt: skip
    env = world["env"]
    name = {k: Path(env[k]).name for k in ("ADAPTERS_DIR", "ALIGNED", "BASE", "OUT_DIR")}  # a card shows no path
    plain = (f"csulora sanitize --adapter {name['ADAPTERS_DIR']} --aligned {name['ALIGNED']} --base {name['BASE']} "
             f"-o {name['OUT_DIR']} {env['CSULORA_OPTIONS']}")  # fmt: skip
    assert plain in world["reference"]["adapter-00/README.md"].decode()


def check_outputs(world: dict, cache: Path, precomputed: int) -> None:
    """The union of the shards' outputs is the plain run's, file by file; the shards found every subspace in
    the precomputed cache (they added no entry)."""
    got = folder_bytes(world["out"])
    assert sorted(got) == sorted(world["reference"])
    for name, data in world["reference"].items():
        assert got[name] == data, f"{name} differs from the unsharded run"
    assert 0 < precomputed == len(list(cache.rglob("*.safetensors")))


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr
    return proc


def _subspace_part(options: str) -> list[str]:
    """The options of a sanitize command line that key the subspace cache."""
    words, kept = options.split(), []
    for i, w in enumerate(words):
        if w in ("--subspace-energy", "--subspace-rank", "--max-subspace-rank", "--seed"):
            kept += words[i : i + 2]
        elif w == "--exact-svd":
            kept.append(w)
    return kept


def test_slurm_array_job(world, example):
    env = {**example, "SHARDS": str(SHARDS)}
    _ok(subprocess.run(["bash", str(EXAMPLES / "slurm" / "submit.sh")], env=env, capture_output=True, text=True,
                       timeout=600))  # fmt: skip
    jobs = json.loads(Path(env["SBATCH_LOG"]).read_text())
    assert [Path(j["script"]).name for j in jobs] == ["subspace.sbatch", "sanitize-array.sbatch"]
    assert f"--dependency=afterok:{jobs[0]['id']}" in jobs[1]["options"]
    assert f"--array=1-{SHARDS}" in jobs[1]["options"]
    check_outputs(world, Path(env["CACHE_DIR"]), jobs[0]["cache_entries"])


def test_slurm_shard_from_any_array_start(world, tmp_path):
    """``--array=0-1`` and ``--array=1-2`` give shards 1/2 and 2/2 (csulora here only echoes its arguments)."""
    (tmp_path / "csulora").write_text('#!/bin/sh\necho "$@"\n')
    (tmp_path / "csulora").chmod(0o755)
    env = {**world["env"], "CACHE_DIR": str(tmp_path), "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    for low in (0, 1):
        for i in (low, low + 1):
            task = {"SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_TASK_MIN": str(low), "SLURM_ARRAY_TASK_COUNT": "2"}
            out = _ok(subprocess.run(["bash", str(EXAMPLES / "slurm" / "sanitize-array.sbatch")],
                                     env={**env, **task}, capture_output=True, text=True, timeout=60))  # fmt: skip
            assert f"--shard {i - low + 1}/2 " in out.stdout


def _container(path: Path) -> tuple[dict, dict, list[str], dict[str, str]]:
    """A Job, its pod spec, the container's command line and its env (secrets, ``valueFrom``, left out)."""
    job = yaml.safe_load(path.read_text())
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return job, pod, container["command"] + container["args"], {e["name"]: e["value"] for e in container["env"]
                                                                 if "value" in e}  # fmt: skip


@needs_yaml
def test_kubernetes_indexed_job(world, example):
    claim = yaml.safe_load((EXAMPLES / "kubernetes" / "pvc.yaml").read_text())
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    jobs = {name: _container(EXAMPLES / "kubernetes" / f"{name}.yaml") for name in ("subspace-job", "sanitize-job")}
    for _, pod, _, env in jobs.values():  # every path on the shared volume
        (volume,) = pod["volumes"]
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        (mount,) = pod["containers"][0]["volumeMounts"]
        assert mount["name"] == volume["name"]
        for key in ("ADAPTERS_DIR", "OUT_DIR", "CACHE_DIR", "HF_HOME"):
            assert env.get(key, mount["mountPath"] + "/").startswith(mount["mountPath"] + "/"), key
    job, _, _, env = jobs["sanitize-job"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert env["SHARDS"] == str(job["spec"]["completions"]), "SHARDS must equal completions"
    assert _subspace_part(env["CSULORA_OPTIONS"]) == jobs["subspace-job"][3]["SUBSPACE_OPTIONS"].split()

    def start(name: str, **extra: str) -> subprocess.Popen:
        _, _, argv, env = jobs[name]
        # the volume's paths, the model references and the options become this test's
        mine = {k: v for k, v in example.items() if k in env}
        return subprocess.Popen(argv, env={**example, **env, **mine, **extra}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip

    def wait(pods: list[subprocess.Popen]) -> None:
        for pod in pods:
            _, stderr = pod.communicate(timeout=300)
            assert pod.returncode == 0, stderr

    wait([start("subspace-job")])
    precomputed = len(list(Path(example["CACHE_DIR"]).rglob("*.safetensors")))
    # completions: 2, parallelism: 2
    wait([start("sanitize-job", SHARDS=str(SHARDS), JOB_COMPLETION_INDEX=str(k)) for k in range(SHARDS)])
    check_outputs(world, Path(example["CACHE_DIR"]), precomputed)


@needs_yaml
def test_github_actions_matrix(world, example):
    """Each matrix job on its own runner (the same workspace path), its output an artifact; merged at the end."""
    workflow = yaml.safe_load((EXAMPLES / "ci" / "sanitize-shards.yml").read_text())
    jobs = workflow["jobs"]
    assert jobs["sanitize"]["needs"] == "subspaces" and jobs["collect"]["needs"] == "sanitize"
    shards = jobs["sanitize"]["strategy"]["matrix"]["shard"]
    assert shards == list(range(1, len(shards) + 1))  # 1 … N, and N = strategy.job-total
    configured = {k: str(v) for k, v in workflow["env"].items() if "${{" not in str(v)}  # secrets left out
    env = {**example, **configured, **{k: v for k, v in example.items() if k in configured}}
    workspace = world["root"]

    def step(job: str, command: str, **values: int) -> None:
        (script,) = [s["run"] for s in jobs[job]["steps"] if command in s.get("run", "")]
        for name, value in values.items():
            script = script.replace("${{ " + name + " }}", str(value))
        assert "${{" not in script
        _ok(subprocess.run(["bash", "-e", "-c", script], env=env, cwd=workspace, capture_output=True, text=True,
                           timeout=300))  # fmt: skip

    step("subspaces", "csulora subspace")
    precomputed = len(list(Path(env["CACHE_DIR"]).rglob("*.safetensors")))
    artifacts = workspace / "artifacts"
    artifacts.mkdir()
    for shard in range(1, SHARDS + 1):
        step("sanitize", "csulora sanitize", **{"matrix.shard": shard, "strategy.job-total": SHARDS})
        shutil.move(world["out"], artifacts / f"sanitized-{shard}")  # upload-artifact
    assert all(any((artifacts / f"sanitized-{i}").iterdir()) for i in range(1, SHARDS + 1))
    for shard in range(1, SHARDS + 1):  # download-artifact with merge-multiple
        shutil.copytree(artifacts / f"sanitized-{shard}", world["out"], dirs_exist_ok=True)
    check_outputs(world, Path(env["CACHE_DIR"]), precomputed)


@needs_yaml
def test_github_actions_gate_from_a_pack(world, example):
    """The gate workflow: its first run builds the pack (the cached folder), a later run audits and sanitizes from
    it with no checkpoint on the runner; the sanitized adapters equal the plain run's byte for byte."""
    workflow = yaml.safe_load((EXAMPLES / "ci" / "github-actions.yml").read_text())
    job = workflow["jobs"]["gate"]
    (script,) = [s["run"] for s in job["steps"] if "audit-then-sanitize" in s.get("run", "")]
    assert job["env"]["SUBSPACE"] in next(s for s in job["steps"] if s.get("name") == "Cache the subspace pack")[
        "with"]["path"].replace("${{ env.SUBSPACE }}", job["env"]["SUBSPACE"])  # fmt: skip
    configured = {k: str(v) for k, v in job["env"].items() if "${{" not in str(v)}
    pack = world["root"] / "pack"
    env = {**configured, **example, "SUBSPACE": str(pack), "SUBSPACE_OPTIONS": example["SUBSPACE_OPTIONS"],
           "CSULORA_OPTIONS": " ".join(OPTIONS[:2]), "MAX_OFF_ENERGY": "0.99", "MAX_LAYER_OFF_ENERGY": "",
           "MIN_SAFE_LORA_SCORE": ""}  # fmt: skip

    def run(**changes: str) -> subprocess.CompletedProcess:
        return _ok(subprocess.run(["bash", "-e", "-c", script], env={**env, **changes}, cwd=REPO, capture_output=True,
                                  text=True, timeout=300))  # fmt: skip

    run()  # first run: builds the pack, then the gate
    assert (pack / "csulora_subspace.json").is_file()
    shutil.rmtree(world["out"])
    run(ALIGNED=str(world["root"] / "gone-aligned"), BASE=str(world["root"] / "gone-base"))  # no checkpoints
    got = folder_bytes(world["out"])
    assert json.loads(got["audit.json"])["passed"]
    for adapter in ADAPTERS:
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            assert got[f"{adapter}/{name}"] == world["reference"][f"{adapter}/{name}"], (adapter, name)
        assert "subspaces from the pack" in got[f"{adapter}/README.md"].decode()
    shutil.rmtree(pack)
