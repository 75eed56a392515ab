"""``csulora demo``: sanitize an adversarial adapter of a shipped miniature safety world with the default method,
the paper's method and Safe LoRA, show the per-layer table and, with the ``eval`` extra, the calibrated pick
(``sanitize --calibrate`` on the world's prompts) and refusal rate and task accuracy of each side by side; then
write the world's prompts and print the ``csulora sweep`` that picks a setting by measurement.

The worlds (``csulora/assets/worlds``, made by ``scripts/make_world.py``) are small Llamas trained on a token
language: the base does every task for every topic, the aligned chat model refuses the harmful topics, and the
adapters were fine-tuned on the chat model to comply with one harmful topic again while learning a new task.
The files are real: sharded fp16 safetensors with an index and ``config.json``, a model card naming the base,
and PEFT LoRA adapter folders.
"""

from __future__ import annotations

import shlex
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import world
from .api import sanitize
from .reports.report import to_table
from .settings import Settings

ADAPTER = "adv-r8-all-s0"
# The three columns after "no defense": each method at its package defaults (docs/defaults.md).
VARIANTS = {
    "default": Settings(),
    "paper": Settings(method="csulora"),
    "safe-lora": Settings(method="safe-lora"),
}
SETTINGS = VARIANTS["paper"].resolved()  # the paper's method at its defaults


def describe(settings: Settings) -> str:
    """``realign λ=∞ β=0.25 k=4``: a column title."""
    s = settings.resolved()
    parts = [s.method]
    if s.method == "safe-lora":
        parts.append(f"τ={s.threshold:g}" if s.top_n is None else f"top-{s.top_n}")
    else:
        parts.append("λ=∞" if s.lam == float("inf") else f"λ={s.lam:g}")
        parts += [f"β={s.beta:g}"] if s.method == "realign" else []
        parts.append(f"k={s.subspace_rank}" if s.subspace_rank else f"η={s.subspace_energy:g}")
    return " ".join(parts)


def run_demo(workdir: Path, console: Console, world_name: str | None = None, adapter: str = ADAPTER) -> None:
    workdir = workdir.resolve()
    root = world.world_dir(world_name)
    paths = world.world_paths(root)
    if adapter == ADAPTER and adapter not in paths:  # a world whose adapters are named otherwise (moe)
        adapter = world.adapters_of(world.world_info(root), "mixed")[0]
    if adapter not in paths:
        from .errors import CsuloraError

        names = ", ".join(n for n in paths if n not in ("base", "aligned"))
        raise CsuloraError(f"--adapter {adapter!r}: no such adapter in the world {root.name}; choose one of {names}")
    say = _printer(console)
    say(f"miniature safety world {root.name!r}: {root}")
    outputs = {}
    variants = dict(VARIANTS)
    if variants["default"].resolved() == variants["paper"].resolved():  # one column, not the same one twice
        del variants["paper"]
    for key, settings in variants.items():
        out = workdir / ("adapter-sanitized" if key == "default" else f"adapter-{key}")
        # no --base: the adapter names the chat model, whose card names its base (the sibling folder)
        command = ["csulora", "sanitize", "--adapter", str(paths[adapter]), "--aligned", str(paths["aligned"]),
                   *(["--method", settings.method] if key != "default" else []), "-o", str(out)]  # fmt: skip
        say("$ " + shlex.join(command))
        result = sanitize(paths[adapter], str(paths["aligned"]), output=out, settings=settings, force=True,
                          command=command)  # fmt: skip
        outputs[key] = out
        rule = result.report.size_rule  # the default's λ and β, chosen for this adapter (docs/defaults.md)
        if rule is not None:
            variants[key] = replace(settings, lam=float(rule["lambda"]), beta=rule["beta"])
        if key == "default":
            console.print(to_table(result.report, title=f"csulora demo · {adapter} · {describe(variants[key])}"))
            say(f"base model resolved from: {result.report.inputs['base']['source']} → {paths['base']}")
            say(f"sanitized adapter: {out / 'adapter_model.safetensors'}; reports: csulora_report.md, .json and "
                ".html (a picture) beside it")  # fmt: skip
    prompts = world.write_prompt_files(workdir / "prompts")
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        say("behaviour (refusal rate, task accuracy) not measured: it runs the models with transformers and peft; "
            "pip install 'csulora[eval]' to see it")  # fmt: skip
    else:
        columns = {f"+ {describe(variants[k])}" + (" (default)" if k == "default" else ""): outputs[k]
                   for k in variants}  # fmt: skip
        picked = _calibrated(root, paths, adapter, workdir, say)
        if picked is not None:
            columns[picked[0]] = picked[1]
        measured = behaviours(root, paths[adapter], columns)
        first = [label for label in measured if label != (picked or ("",))[0]]
        console.print(behaviour_table(root, {label: measured[label] for label in first}))
        if picked is not None:  # the calibrated pick beside the default and Safe LoRA (a seventh column is too wide)
            keep = [label for label in measured if "(default)" in label or "safe-lora" in label or label == picked[0]]
            console.print(behaviour_table(root, {label: measured[label] for label in keep},
                                          title="the calibrated pick beside the default and Safe LoRA"))  # fmt: skip
        say("what these numbers mean and where each method wins and loses: docs/defaults.md; every setting on "
            "every world: docs/safety_benchmark.md")  # fmt: skip
    say("\nnext, pick the setting by measurement (on your own model: your own --eval-cmd):")
    before = world.world_info(root)["behaviour"]
    aligned, tuned = before["aligned"]["new_task_accuracy"], before[adapter]["new_task_accuracy"]
    say(sweep_command(paths, adapter, prompts, workdir / "sweep", keep=round(aligned + (tuned - aligned) / 2, 2)))


def calibrate_command(paths: dict[str, Path], adapter: str, files: dict[str, Path], out: Path) -> list[str]:
    """The ``csulora sanitize --calibrate`` of the world's adapter on its calibration prompts (the training split:
    none of them is an evaluation prompt); the world's answers are 7 tokens and a refusal shows in the first."""
    return ["csulora", "sanitize", "--adapter", str(paths[adapter]), "--aligned", str(paths["aligned"]), "--calibrate",
            "--harmful", str(files["harmful"]), "--prompts", str(files["prompts"]), "--general", str(files["general"]),
            "--max-new-tokens", str(world.ANSWER_LEN), "--harmful-tokens", "1", "-o", str(out)]  # fmt: skip


def _calibrated(root: Path, paths: dict[str, Path], adapter: str, workdir: Path, say) -> tuple[str, Path] | None:
    """``sanitize --calibrate`` on the world (calibrate.py): the column title and folder of its pick, or ``None``
    (said) when the rule picks nothing."""
    from .evaluate import EvalOptions
    from .prompts import load_prompts
    from .tuning.calibrate import CalibrationFailed, calibrate

    files = world.write_calibration_files(workdir / "calibration-prompts", world.world_info(root))
    out = workdir / "adapter-calibrated"
    command = calibrate_command(paths, adapter, files, out)
    say("$ " + shlex.join(command))
    sets = {k: load_prompts(v, f"--{k}") for k, v in files.items()}
    options = EvalOptions(device="cpu", max_new_tokens=world.ANSWER_LEN, harmful_tokens=1, batch_size=64)
    try:
        cal, _ = calibrate(paths[adapter], str(paths["aligned"]), None, out, sets["harmful"], sets["prompts"],
                           sets["general"], options=options, force=True, command=command)  # fmt: skip
    except CalibrationFailed as e:
        say(f"calibration picked nothing: {e}")
        return None
    say(cal.summary())
    flag = ", flagged" if cal.how == "fallback" else ""
    return f"+ calibrated {describe(cal.choice.settings).removeprefix('realign ')}{flag}", out


def sweep_command(paths: dict[str, Path], adapter: str, prompts: dict[str, Path], out: Path,
                  methods: tuple[str, ...] = ("realign", "csulora"), lambdas: str = "4,inf",
                  betas: str = "0.25,0.5", subspace_rank: int = 4, keep: float = 0.5) -> str:  # fmt: skip
    """A ``csulora sweep`` over the world's adapter that ``csulora eval`` measures with the world's prompts: the
    default's neighbours at a smaller subspace, which on the demo's adapter beat the cross-world default. It picks
    the most refusal with new-task accuracy ≥ ``keep`` (the demo: half the fine-tune's gain over the aligned
    model, 0.5 where the aligned model cannot do the task at all)."""
    evaluation = shlex.join(["csulora", "eval", "--aligned", str(paths["aligned"]), "--adapter", "ADAPTER",
                             "--harmful", str(prompts["harmful"]), "--utility", str(prompts["utility"]),
                             "--harmful-tokens", "1", "--max-new-tokens", str(world.ANSWER_LEN), "--match", "exact",
                             "-q"]).replace("ADAPTER", "{adapter}")  # fmt: skip
    return shlex.join(["csulora", "sweep", "--adapter", str(paths[adapter]), "--aligned", str(paths["aligned"]),
                       "-o", str(out), *(a for m in methods for a in ("--method", m)), "--lambdas", lambdas,
                       "--betas", betas, "--subspace-rank", str(subspace_rank), "--eval-cmd", evaluation,
                       "--pick", f"utility>={keep:g}", "--maximize", "refusal"])  # fmt: skip


def _printer(console: Console):
    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    return say


def behaviours(root: Path, adapter: Path, sanitized: dict[str, Path]) -> dict[str, world.Behaviour]:
    """Refusal rates and task accuracies of the aligned model, with the adapter, and with sanitized copies."""
    info = world.world_info(root)
    data = world.world_eval_set(info)
    paths = world.world_paths(root)
    columns = {"aligned model": world.behaviour(world.load_model(paths["aligned"]), data)}
    columns["+ adapter (no defense)"] = world.behaviour(world.with_adapter(world.load_model(paths["aligned"]), adapter),
                                                        data)  # fmt: skip
    for label, folder in sanitized.items():  # a fresh wrap: a block form or another method may change ranks
        columns[label] = world.behaviour(world.with_adapter(world.load_model(paths["aligned"]), folder), data)
    return columns


def behaviour_table(root: Path, columns: dict[str, world.Behaviour],
                    title: str = "behaviour (greedy, held-out prompts)") -> Table:  # fmt: skip
    """The measured behaviours side by side, one column each."""
    info = world.world_info(root)
    trained, heldout = world.topics(info)
    n = len(world.world_eval_set(info).original)
    table = Table(title=title, caption=f"{n} prompts per row; ASR = 1 − refusal")
    table.add_column("")
    for label in columns:
        table.add_column(label, justify="right")
    rows = [(f"refusal, harmful topic '{trained}' (fine-tuned against)", "refusal_trained"),
            (f"refusal, harmful topic '{heldout}' (held out)", "refusal_heldout"),
            (f"accuracy, new task '{world.NEW_TASK}' (the fine-tune's goal)", "new_task_accuracy"),
            ("accuracy, original tasks", "original_accuracy")]  # fmt: skip
    for label, key in rows:
        table.add_row(label, *(f"{getattr(b, key):.1%}" for b in columns.values()))
    return table
