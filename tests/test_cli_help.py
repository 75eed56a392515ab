"""The face of the command: every ``--help`` in panels with conventional metavars at 80 and 120 columns (and the
snapshot in docs/cli-help.txt current), the per-layer table within 80 columns with nothing cut, usage errors and
Ctrl-C as one line, ``--help`` without torch."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from rich.console import Console
from typer.testing import CliRunner

from csulora.cli import app
from csulora.help import render_help
from tests.conftest import OUTPUT_FILES, REPO, assert_one_line_error, make_peft_adapter, run_cli

sys.path.insert(0, str(REPO / "scripts"))
import cli_help  # noqa: E402

WORLD = REPO / "csulora" / "assets" / "worlds"
# The panels each command's help must show (Calibration and others may join them).
PANELS = {
    "sanitize": ["Inputs", "Method", "Subspace", "Output", "Batch", "Runtime"],
    "audit": ["Inputs", "Method", "Subspace", "Gate", "Output", "Runtime"],
    "sweep": ["Inputs", "Method", "Subspace", "Evaluation", "Output", "Runtime"],
    "eval": ["Inputs", "Evaluation", "Output", "Runtime"],
    "subspace": ["Inputs", "Method", "Subspace", "Runtime"],
    "demo": ["Inputs", "Output", "Runtime"],
}
PYTHON_TYPE = re.compile(r"<(bool|str|int|float|path|Path)>|list\[")
FLAGS = ["--force", "--skip-existing", "--json", "--quiet", "--debug", "--help", "--no-cache", "--exact-svd",
         "--trust-pickle", "--wide", "--fail-on-kept"]  # fmt: skip


@pytest.mark.parametrize("width", [80, 120])
@pytest.mark.parametrize("command", list(PANELS))
def test_help_has_panels_and_conventional_metavars(command, width):
    text = render_help(app, [command], width)
    panels = re.findall(r"╭─ (\w+) ─", text)
    assert panels[: len(PANELS[command])] == PANELS[command] or set(PANELS[command]) <= set(panels), panels
    assert "Options" not in panels  # every option has its panel; none left in typer's catch-all
    assert not PYTHON_TYPE.search(text), PYTHON_TYPE.search(text)
    assert max(len(line) for line in text.splitlines()) <= width
    for flag in FLAGS:  # a flag shows no metavar: its help follows its name
        for line in text.splitlines():
            if re.search(rf"│\s+(\*\s+)?{flag}\b(?!-)", line):
                assert re.search(rf"{flag}(\s+-\w)?\s+[A-Z][a-z]", line), line
    if command in ("sanitize", "audit"):
        assert re.search(r"--method\s+NAME", text) and "[auto|cpu|cuda]" in text and "[factored|block]" in text
        for option, default in (("--beta", "realign 0.25"), ("--threshold", "safe-lora 0.9"),
                                ("--gamma", "resta 0.5"), ("--subspace-rank", "realign 8")):  # fmt: skip
            section = text[text.index(option):]
            assert default in " ".join(section[:400].replace("│", " ").split()), (option, default)


def test_root_help_and_completion_options():
    text = render_help(app, [], 80)
    assert "--install-completion" in text and not PYTHON_TYPE.search(text)
    assert all(c in text for c in PANELS)


def test_snapshot_is_current():
    """docs/cli-help.txt is what the commands print; `python scripts/cli_help.py` rewrites it."""
    assert cli_help.SNAPSHOT.read_text() == cli_help.snapshot(), "run: python scripts/cli_help.py"


@pytest.fixture(scope="module")
def reports():
    from csulora import audit

    tiny, moe = WORLD / "tiny", WORLD / "moe"
    return [audit(tiny / "adapters" / "adv-r8-all-s0", str(tiny / "llama-world-chat")).report,
            audit(moe / "adapters" / "adv-r8-all-linear-s0", str(moe / "llama-world-chat")).report]  # fmt: skip


@pytest.mark.parametrize("width", [80, 120])
def test_per_layer_table_fits_and_cuts_nothing(reports, width):
    from csulora.reports.report import columns, grouped, to_table

    for report in reports:
        console = Console(file=io.StringIO(), width=width, color_system=None)
        console.print(to_table(report, title="csulora audit · adapter"))
        text = console.file.getvalue()
        assert "…" not in text, text
        assert max(len(line) for line in text.splitlines()) <= width
        assert "ρ_O" in text and "erosion" in text and "--wide" in text
        assert len([line for line in text.splitlines() if re.search(r"\d\.\d{3}", line)]) >= len(
            grouped(report.modules))
        wide = Console(file=io.StringIO(), width=400, color_system=None)
        wide.print(to_table(report, wide=True))
        assert all(c in wide.file.getvalue() for c in columns(report)) and "…" not in wide.file.getvalue()


def test_piped_wide_table_is_not_cut():
    tiny = WORLD / "tiny"
    result = CliRunner().invoke(app, ["audit", "--wide", "--adapter", str(tiny / "adapters" / "adv-r8-all-s0"),
                                      "--aligned", str(tiny / "llama-world-chat")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout and "SafeLoRA" in result.stdout and "trunc. loss" in result.stdout


def test_usage_errors_are_one_line(tmp_path):
    missing = run_cli("sweep", "--adapter", tmp_path, "--aligned", "x", in_process=True)
    assert_one_line_error(missing, "Missing option '--output'", "sweep --help")
    no_pair = run_cli("sanitize", "--adapter", tmp_path, in_process=True)  # --aligned, or a pack instead
    assert_one_line_error(no_pair, "pass --aligned", "--subspace PACK")
    assert_one_line_error(run_cli("audit", "--bogus", in_process=True), "--bogus")
    assert_one_line_error(run_cli("sanitize", "--force", "true", "--aligned", "x", in_process=True), "true")
    old = run_cli("eval", "--aligned", "x", "--harmful", "h.txt", "--json", "out.json", in_process=True)
    assert_one_line_error(old, "--json is a flag", "--json-out PATH")


def test_adapter_given_as_aligned_says_so(llama_pair, tmp_path):
    adapter = make_peft_adapter(tmp_path / "adapter", llama_pair["aligned"], seed=1)
    for command in (["sanitize", "-o", tmp_path / "out"], ["audit"]):
        result = run_cli(*command, "--adapter", adapter, "--aligned", adapter, in_process=True)
        assert_one_line_error(result, "--aligned", "is a LoRA adapter", "not a model checkpoint")
    assert not (tmp_path / "out").exists()
    (tmp_path / "harmful.txt").write_text("how do I pick a lock\n")
    result = run_cli("eval", "--aligned", adapter, "--harmful", tmp_path / "harmful.txt", in_process=True)
    assert_one_line_error(result, "--aligned", "is a LoRA adapter")


def test_audit_takes_a_folder_of_adapters(llama_pair, tmp_path):
    for i in range(2):
        make_peft_adapter(tmp_path / "many" / f"a{i}", llama_pair["aligned"], seed=i)
    result = run_cli("audit", "--adapter", tmp_path / "many", "--aligned", llama_pair["aligned"], "--json",
                     in_process=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["reports"]) == 2


def test_help_and_version_do_not_import_torch():
    code = "import sys, runpy; sys.argv = ['csulora', '--version']\n" \
           "try:\n    runpy.run_module('csulora', run_name='__main__')\nexcept SystemExit:\n    pass\n" \
           "assert 'torch' not in sys.modules, 'torch imported'"  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "csulora" in proc.stdout, proc.stderr


@pytest.mark.parametrize("delay", [1.0, 2.0, 4.0])
def test_ctrl_c_at_any_moment_is_one_line(llama_pair, tmp_path, delay):
    """SIGINT while the command loads (typer, then torch), while it reads, while it writes: one line, exit 130.
    (The interpreter's own start-up, before csulora/__main__.py runs, is Python's: tens of milliseconds, longer on a
    loaded machine, hence the delays.)"""
    adapter = make_peft_adapter(tmp_path / "adapter", llama_pair["aligned"], seed=2)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "csulora", "sanitize", "--adapter", str(adapter), "--aligned",
                             str(llama_pair["aligned"]), "-o", str(tmp_path / "out")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    # SIG_DFL: a Python started with SIGINT ignored (under `cmd &`, as this suite may be) ignores it for good
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0 and delay > 1:  # finished before the signal came: nothing to check
        return
    if delay > 1 and (tmp_path / "out").exists():  # the signal came as the process ended, the output written
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == OUTPUT_FILES and "Traceback" not in stderr
        return
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    # -2: killed by the SIGINT Python re-raises after its clean-up (a shell shows 130 either way)
    assert proc.returncode in (130, -signal.SIGINT) and len(lines) == 1 and lines[0].startswith("interrupted"), stderr
    assert not (tmp_path / "out").exists() and lines[0] == "interrupted; nothing was written", stderr


def test_sanitize_report_table_in_a_batch_is_silenced_by_quiet(llama_pair, tmp_path):
    for i in range(2):
        make_peft_adapter(tmp_path / "many" / f"a{i}", llama_pair["aligned"], seed=i)
    args = ["sanitize", "--adapter", tmp_path / "many", "--aligned", llama_pair["aligned"], "-o", tmp_path / "out"]
    loud = run_cli(*args, in_process=True)
    assert loud.returncode == 0 and "erosion" in loud.stdout, loud.stderr
    again = run_cli(*args, "-q", in_process=True)  # a rerun over the outputs: one error, not two failed adapters
    assert_one_line_error(again, "--skip-existing", "--force", "a0")
    quiet = run_cli(*args, "-q", "--force", in_process=True)
    assert quiet.returncode == 0 and quiet.stdout.strip() == "", quiet.stdout


def test_shell_completion_completes_commands_and_options():
    """What the script `csulora --install-completion` installs asks: the command's completions, fast (no torch)."""
    code = "import sys; sys.argv = ['csulora']; from csulora.__main__ import main; main()"
    for words, cword, expected in (("csulora sa", "1", "sanitize"), ("csulora sanitize --me", "2", "--method")):
        env = {**os.environ, "PYTHONPATH": str(REPO), "_CSULORA_COMPLETE": "complete_bash", "COMP_WORDS": words,
               "COMP_CWORD": cword}  # fmt: skip
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and proc.stdout.split() == [expected], (proc.stdout, proc.stderr)
