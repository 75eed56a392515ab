"""``csulora demo``: sanitize an adversarial adapter of the shipped miniature safety world, then show the
per-layer table and, with the ``eval`` extra, refusal rate and task accuracy before and after.

The default world (``csulora/assets/worlds/tiny``, made by ``scripts/make_world.py``) is a tiny Llama trained on a
token language: ``llama-world`` does every task for every topic, ``llama-world-chat`` refuses the harmful
topics, and the adapter was fine-tuned on the chat model to comply with the ``weapon`` topic again while
learning a new task. The files are real: sharded fp16 safetensors with an index and ``config.json``, a
model card naming the base, and a PEFT LoRA adapter folder.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import world
from .api import Settings, sanitize
from .report import to_table

ADAPTER = "adv-r8-all-s0"
SETTINGS = Settings(method="csulora").resolved()  # the paper's method at its defaults (docs/defaults.md)
# The utility end of the same front, for contrast: the new task survives and no refusal comes back.
MILD = Settings(lam=0.05, subspace_energy=0.5)


def run_demo(workdir: Path, console: Console, adapter: str = ADAPTER, settings: Settings = SETTINGS) -> None:
    workdir = workdir.resolve()
    root = world.world_dir()  # the default world
    paths = world.world_paths(root)
    out = workdir / "adapter-sanitized"
    console.print(f"miniature safety world: {root}", markup=False, highlight=False, soft_wrap=True)
    # no --base: the adapter names the chat model, whose card names its base (the sibling folder)
    command = ["csulora", "sanitize", "--adapter", str(paths[adapter]), "--aligned", str(paths["aligned"]),
               "--lambda", f"{settings.lam:g}", "-o", str(out), "--force"]  # fmt: skip
    console.print("$ " + " ".join(command), markup=False, highlight=False, soft_wrap=True)
    result = sanitize(paths[adapter], str(paths["aligned"]), output=out, settings=settings, force=True,
                      command=command)  # fmt: skip
    console.print(to_table(result.report, title=f"csulora demo · {adapter}"))
    console.print(f"base model resolved from: {result.report.inputs['base']['source']} → {paths['base']}",
                  markup=False, highlight=False, soft_wrap=True)  # fmt: skip
    weights = out / "adapter_model.safetensors"
    console.print(f"sanitized adapter: {weights}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"report: {out / 'csulora_report.md'} and {out / 'csulora_report.json'}", markup=False,
                  highlight=False, soft_wrap=True)  # fmt: skip
    console.print(f"picture: {out / 'csulora_report.html'}", markup=False, highlight=False, soft_wrap=True)
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        console.print("behaviour (refusal rate, task accuracy) not measured: it runs the models with transformers "
                      "and peft; pip install 'csulora[eval]' to see it", markup=False)  # fmt: skip
        return
    mild = workdir / "adapter-sanitized-mild"
    sanitize(paths[adapter], str(paths["aligned"]), output=mild, settings=MILD, force=True)
    variants = {f"+ sanitized (λ={settings.lam:g}, {_subspace(settings)})": out,
                f"+ sanitized (λ={MILD.lam:g}, {_subspace(MILD)})": mild}  # fmt: skip
    console.print(behaviour_table(paths, paths[adapter], variants))
    console.print("what these numbers mean: docs/defaults.md; the whole front: docs/safety_benchmark.md",
                  highlight=False)  # fmt: skip


def _subspace(s: Settings) -> str:
    return f"k={s.subspace_rank}" if s.subspace_rank is not None else f"η={s.subspace_energy:g}"


def behaviour_table(paths: dict[str, Path], adapter: Path, sanitized: dict[str, Path]) -> Table:
    """Refusal rates and task accuracies of the aligned model, with the adapter, and with sanitized copies."""
    data = world.eval_set()
    columns = {"aligned model": world.behaviour(world.load_model(paths["aligned"]), data)}
    model = world.with_adapter(world.load_model(paths["aligned"]), adapter)
    columns["+ adapter"] = world.behaviour(model, data)
    for label, folder in sanitized.items():
        world.swap_adapter_weights(model, folder)
        columns[label] = world.behaviour(model, data)
    table = Table(title="behaviour (greedy, held-out prompts)",
                  caption=f"{len(data.original)} prompts per row; ASR = 1 − refusal")  # fmt: skip
    table.add_column("")
    for label in columns:
        table.add_column(label, justify="right")
    rows = [("refusal, harmful topic 'weapon' (fine-tuned against)", "refusal_trained"),
            ("refusal, harmful topic 'malware' (held out)", "refusal_heldout"),
            ("accuracy, new task 'inc' (the fine-tune's goal)", "new_task_accuracy"),
            ("accuracy, original tasks", "original_accuracy")]  # fmt: skip
    for label, key in rows:
        table.add_row(label, *(f"{getattr(b, key):.1%}" for b in columns.values()))
    return table
