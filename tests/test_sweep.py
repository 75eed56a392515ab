"""``csulora sweep`` (DESIGN.md §8): the grid, one subspace pass for the ladder, failing and malformed
evaluations, resuming a killed sweep, the pick and its exit codes, the pictures; and the README's workflow
with ``csulora eval`` on the shipped miniature world."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import csulora.cache as cache_mod
from csulora import Settings
from csulora.cache import SubspaceSource
from csulora.errors import CsuloraError
from csulora.synthetic import SIZES, write_adapter, write_pair
from csulora.tuning.sweep import plan, run_sweep
from csulora.tuning.sweep_result import parse_rule, pick
from tests.conftest import OUTPUT_FILES, REPO, assert_one_line_error, folder_bytes, run_cli

TINY = SIZES["tiny"]
# A stand-in evaluation: reads the point's report; fails for λ = 0.5 and prints no JSON for λ = 2; counts its runs.
FAKE_EVAL = r"""
import json, sys, pathlib
folder = pathlib.Path(sys.argv[1])
with open(sys.argv[2], "a") as log:
    log.write(folder.name + "\n")
print("evaluating", folder.name, file=sys.stderr)
if "lambda0.5-" in folder.name + "-":
    print("the model crashed", file=sys.stderr); sys.exit(3)
if "lambda2" in folder.name:
    print("done, no json"); sys.exit(0)
totals = json.loads((folder / "csulora_report.json").read_text())["totals"]
print("some chatter")
print(json.dumps({"kept": totals["retained_norm"], "safety": 1 - totals["retained_norm"], "n": 3}))
"""


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_pair(tmp_path_factory.mktemp("pair"), TINY, spectrum="fine-tune", dtype=torch.bfloat16,
                      shard_bytes=40_000)  # fmt: skip


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, pair):
    return write_adapter(tmp_path_factory.mktemp("adapter") / "adapter", TINY, str(pair["aligned"]), r=4, alpha=8,
                         a_std=None, b_std=0.01, seed=1)  # fmt: skip


@pytest.fixture
def fake_eval(tmp_path) -> tuple[str, Path]:
    script, log = tmp_path / "fake_eval.py", tmp_path / "evaluated.log"
    script.write_text(FAKE_EVAL)
    return f"{sys.executable} {script} {{adapter}} {log}", log


def sweep_args(adapter, pair, out, *extra) -> list[str]:
    return ["sweep", "--adapter", adapter, "--aligned", pair["aligned"], "--base", pair["base"], "-o", out, *extra]


def test_plan_takes_the_grid_values_that_apply_to_each_method():
    grids = {"lam": [0.5, float("inf")], "beta": [0.0, 0.25], "threshold": [0.3]}
    points = plan(["realign", "csulora", "safe-lora", "realign"], Settings(subspace_rank=2), grids)
    assert [p.id for p in points] == [
        "realign-lambda0.5-beta0", "realign-lambda0.5-beta0.25", "realign-lambdainf-beta0",
        "realign-lambdainf-beta0.25", "csulora-lambda0.5", "csulora-lambdainf", "safe-lora-tau0.3",
    ]  # fmt: skip
    assert points[3].grid == {"lambda": "inf", "beta": 0.25} and points[3].settings.subspace_rank == 2
    # an empty grid takes each method's default
    [default] = plan(["csulora"], Settings(), {})
    assert default.settings.lam == Settings(method="csulora").resolved().lam
    with pytest.raises(CsuloraError, match="not available"):
        plan(["nope"], Settings(), {})


@pytest.mark.parametrize(
    "text, rule", [("utility>=0.8", ("utility", ">=", 0.8)), (" a.b <= -1e-2 ", ("a.b", "<=", -0.01))]
)
def test_rules_parse(text, rule):
    r = parse_rule(text)
    assert (r.metric, r.op, r.value) == rule


@pytest.mark.parametrize("text", ["utility=>0.8", "utility>0.8", ">=1", "u>=x", ""])
def test_malformed_rules_are_bad_input(text):
    with pytest.raises(CsuloraError, match="expected METRIC>=X or METRIC<=X"):
        parse_rule(text)


def test_ladder_computes_each_subspace_once(tmp_path, pair, adapter, monkeypatch):
    """Six points, one SVD per module: the ladder costs one cold run plus warm ones, also with --no-cache."""
    calls = []
    real = cache_mod.safety_subspace
    monkeypatch.setattr(cache_mod, "safety_subspace", lambda D, **kw: calls.append(D.shape) or real(D, **kw))
    points = plan(["realign", "csulora"], Settings(subspace_rank=3), {"lam": [1.0, float("inf")], "beta": [0.0, 0.5]})
    assert len(points) == 6
    result = run_sweep(adapter, str(pair["aligned"]), str(pair["base"]), tmp_path / "out", points,
                       subspaces=SubspaceSource.open(enabled=False))  # fmt: skip
    assert len(calls) == len(TINY.linear())
    assert all(p["status"] == "ok" for p in result.points)


def test_grid_writes_a_folder_per_point_and_sweep_json(tmp_path, pair, adapter, fake_eval):
    cmd, log = fake_eval
    out = tmp_path / "sweep"
    r = run_cli(*sweep_args(adapter, pair, out, "--method", "realign", "--method", "csulora", "--method", "safe-lora",
                            "--lambdas", "0.5,2,inf", "--betas", "0.25", "--thresholds", "0.3",
                            "--subspace-rank", "2", "--eval-cmd", cmd))  # fmt: skip
    assert r.returncode == 0, r.stderr
    document = json.loads((out / "sweep.json").read_text())
    ids = ["realign-lambda0.5-beta0.25", "realign-lambda2-beta0.25", "realign-lambdainf-beta0.25",
           "csulora-lambda0.5", "csulora-lambda2", "csulora-lambdainf", "safe-lora-tau0.3"]  # fmt: skip
    assert [p["id"] for p in document["points"]] == ids and document["picked"] is None
    assert document["schema_version"] == 1
    for p in document["points"]:
        assert set(p) >= {"id", "method", "settings", "path", "status", "metrics", "totals"}
        folder = out / p["path"]
        written = sorted(f.name for f in folder.iterdir() if f.name not in ("eval.json", "eval.stderr.txt"))
        assert written == OUTPUT_FILES
        report = json.loads((folder / "csulora_report.json").read_text())
        assert report["method"] == p["method"] and p["totals"] == report["totals"]
        card = (folder / "README.md").read_text()
        assert f"--method {p['method']}" in card and f"-o {folder.name}" in card  # this point's command, by names
    by_id = {p["id"]: p for p in document["points"]}
    assert by_id["realign-lambdainf-beta0.25"]["settings"] == {"lambda": "inf", "beta": 0.25}  # JSON has no ∞
    assert by_id["safe-lora-tau0.3"]["settings"] == {"tau": 0.3}
    # a failing evaluation and a malformed one mark their points failed; the sweep went on
    failed = {p["id"]: p["message"] for p in document["points"] if p["status"] == "failed"}
    assert set(failed) == {"realign-lambda0.5-beta0.25", "realign-lambda2-beta0.25", "csulora-lambda0.5",
                           "csulora-lambda2"}  # fmt: skip
    assert "exited 3: the model crashed" in failed["csulora-lambda0.5"]
    assert "not one JSON object of numbers: done, no json" in failed["csulora-lambda2"]
    assert "the model crashed" in (out / "csulora-lambda0.5" / "eval.stderr.txt").read_text()
    ok = by_id["csulora-lambdainf"]
    assert ok["status"] == "ok" and ok["metrics"] == {"kept": pytest.approx(ok["totals"]["retained_norm"]),
                                                      "safety": pytest.approx(1 - ok["totals"]["retained_norm"]),
                                                      "n": 3.0}  # fmt: skip
    assert "failed" in r.stderr and (out / "sweep.html").is_file() and (out / "front.png").is_file()
    assert len(log.read_text().split()) == len(ids)


def test_pick_copies_the_best_qualifying_point_and_exit_codes(tmp_path, pair, adapter, fake_eval):
    cmd, _ = fake_eval
    out = tmp_path / "sweep"
    common = sweep_args(adapter, pair, out, "--method", "csulora", "--lambdas", "0.1,1,8,inf", "--eval-cmd", cmd)
    r = run_cli(*common, "--pick", "kept>=0.3", "--pick", "n<=3", "--maximize", "safety")
    assert r.returncode == 0, r.stderr
    document = json.loads((out / "sweep.json").read_text())
    ok = [p for p in document["points"] if p["status"] == "ok"]
    qualified = [p for p in ok if p["metrics"]["kept"] >= 0.3]
    assert 0 < len(qualified) < len(ok)  # the rule does choose
    best = max(qualified, key=lambda p: p["metrics"]["safety"])
    assert document["picked"] == best["id"] and document["rules"] == ["kept>=0.3", "n<=3"]
    assert folder_bytes(out / "picked") == folder_bytes(out / best["id"])
    assert f"picked {best['id']}" in r.stdout
    html = (out / "sweep.html").read_text()
    assert f"picked: {best['id']}" in html and html.count('class="picked"') == 1
    assert html.count('class="pt"') == len(ok) and 'class="rule"' in html
    assert not re.search(r"https?:|<script|\bsrc\s*=|<link|@import|url\(", html, re.I)  # self-contained
    assert (out / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "front.png" in next(line for line in r.stdout.splitlines() if line.startswith("wrote "))

    # none qualifies: exit 1, and the picked/ of the last run is gone; the report totals are rules too
    none = run_cli(*common, "--skip-existing", "--pick", "kept>=2", "--maximize", "safety", in_process=True)
    assert none.returncode == 1 and "no point meets kept>=2" in none.stderr
    header = next(line for line in none.stdout.splitlines() if "status" in line).split()
    assert [h for h in header if h in ("kept", "safety", "n")] == ["kept", "safety", "n"]  # resumed: the same order
    assert json.loads((out / "sweep.json").read_text())["picked"] is None and not (out / "picked").exists()
    totals = run_cli(*common, "--skip-existing", "--pick", "erosion_after<=1", "--maximize", "retained_norm",
                     in_process=True)  # fmt: skip
    assert totals.returncode == 0, totals.stderr

    # a malformed rule, an unknown metric, a pick without --maximize, an existing sweep without a flag: exit 2
    assert_one_line_error(run_cli(*common, "--skip-existing", "--pick", "kept=>1", "--maximize", "safety",
                                  in_process=True), "expected METRIC>=X")  # fmt: skip
    assert_one_line_error(run_cli(*common, "--skip-existing", "--pick", "nope>=1", "--maximize", "safety",
                                  in_process=True), "metric 'nope' is not measured")  # fmt: skip
    assert_one_line_error(run_cli(*common, "--skip-existing", "--pick", "kept>=1", in_process=True),
                          "--pick needs --maximize")  # fmt: skip
    assert_one_line_error(run_cli(*common, in_process=True), "holds a sweep already", "--skip-existing")
    assert_one_line_error(run_cli(*common, "--skip-existing", "--force", in_process=True), "contradict")


def test_killed_sweep_resumes_with_skip_existing(tmp_path, pair, adapter, fake_eval):
    """SIGKILL while the second point is evaluated; --skip-existing keeps the first (neither rewritten nor
    re-evaluated) and finishes the rest."""
    _, log = fake_eval
    slow = tmp_path / "slow_eval.py"
    flag = tmp_path / "slept"  # only the first evaluation of λ = 1 hangs: the one the kill interrupts
    slow.write_text(f"import pathlib, subprocess, sys, time\nflag = pathlib.Path({str(flag)!r})\n"
                    "if 'lambda1' in sys.argv[1] and not flag.exists():\n    flag.touch()\n    time.sleep(60)\n"
                    f"sys.exit(subprocess.call([sys.executable, {str(tmp_path / 'fake_eval.py')!r}, sys.argv[1], "
                    f"{str(log)!r}]))\n")  # fmt: skip
    out = tmp_path / "sweep"
    args = sweep_args(adapter, pair, out, "--method", "csulora", "--lambdas", "0.1,1,8", "--eval-cmd",
                      f"{sys.executable} {slow} {{adapter}}", "-q")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "csulora", *map(str, args)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while not flag.exists() and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "csulora-lambda0.1" / "eval.json").is_file() and not (out / "csulora-lambda8").exists()
    first = folder_bytes(out / "csulora-lambda0.1")
    resumed = run_cli(*args, "--skip-existing")
    assert resumed.returncode == 0, resumed.stderr
    document = json.loads((out / "sweep.json").read_text())
    assert [p["status"] for p in document["points"]] == ["ok", "ok", "ok"]
    assert folder_bytes(out / "csulora-lambda0.1") == first
    assert log.read_text().split() == ["csulora-lambda0.1", "csulora-lambda1", "csulora-lambda8"]


def test_resume_evaluates_failed_points_again(tmp_path, pair, adapter, fake_eval):
    """A failed evaluation is not a result to keep: --skip-existing runs it again (the others stay)."""
    cmd, log = fake_eval
    out = tmp_path / "sweep"
    args = sweep_args(adapter, pair, out, "--method", "csulora", "--lambdas", "0.5,8", "--eval-cmd", cmd, "-q")
    first = run_cli(*args, in_process=True)
    assert first.returncode == 0, first.stderr
    assert [p["status"] for p in json.loads((out / "sweep.json").read_text())["points"]] == ["failed", "ok"]
    again = run_cli(*args, "--skip-existing", in_process=True)
    assert again.returncode == 0, again.stderr
    assert log.read_text().split() == ["csulora-lambda0.5", "csulora-lambda8", "csulora-lambda0.5"]


def test_pick_ignores_failed_points_and_breaks_ties_by_ladder_order():
    points = [
        {"id": "a", "status": "ok", "metrics": {"u": 0.5, "r": 0.9}, "totals": {}},
        {"id": "b", "status": "failed", "metrics": {}, "totals": None},
        {"id": "c", "status": "ok", "metrics": {"u": 0.7, "r": 0.9}, "totals": {}},
        {"id": "d", "status": "ok", "metrics": {"u": 0.2, "r": 1.0}, "totals": {}},
    ]
    assert pick(points, [parse_rule("u>=0.4")], "r") == "a"
    assert pick(points, [parse_rule("u>=0.9")], "r") is None
    assert pick(points, [], "u") == "c"


# --- the README's workflow: csulora eval as the evaluation, on the shipped miniature world ----------------------


def test_sweep_with_csulora_eval_on_the_world(tmp_path):
    """The command ``csulora demo`` prints, pasted into a shell as a user would (a smaller grid and prompt set)."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from csulora import world as W
    from csulora.demo import ADAPTER, sweep_command

    paths = W.world_paths()
    prompts = W.write_prompt_files(tmp_path / "prompts", n=24)
    out = tmp_path / "sweep"
    command = sweep_command(paths, ADAPTER, prompts, out, methods=("realign",), lambdas="0,inf", betas="0.5")
    bin_dir = Path(sys.executable).parent  # where pip put the csulora command
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    document = json.loads((out / "sweep.json").read_text())
    points = {p["id"]: p for p in document["points"]}
    untouched, realigned = points["realign-lambda0-beta0.5"], points["realign-lambdainf-beta0.5"]
    assert untouched["metrics"]["refusal"] < 0.1 and untouched["metrics"]["utility"] > 0.8  # λ = 0: the attack
    assert realigned["metrics"]["refusal"] > untouched["metrics"]["refusal"] + 0.3  # refusal comes back …
    assert realigned["metrics"]["utility"] >= 0.5  # … and the new task stays
    assert document["picked"] == "realign-lambdainf-beta0.5" and f"picked {document['picked']}" in r.stdout
    assert (out / "picked" / "adapter_model.safetensors").is_file()


def test_an_evaluator_that_always_fails_is_bad_input(tmp_path, pair, adapter):
    """Nothing measured is a broken evaluation or setup: exit 2 naming its error, not 1 as a failed rule."""
    out = tmp_path / "sweep"
    for cmd, needle in (("echo hi", "not one JSON object"), ("cat /no/such/prompts.txt", "No such file")):
        result = run_cli(*sweep_args(adapter, pair, out, "--method", "csulora", "--lambdas", "1,8", "--eval-cmd", cmd,
                                     "--pick", "refusal>=0.5", "--maximize", "refusal", "--force"), in_process=True)
        assert_one_line_error(result, "failed on every point (2)", needle, "eval.stderr.txt", "--eval-cmd")
        assert (out / "sweep.json").is_file()

