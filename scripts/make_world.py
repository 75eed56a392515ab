#!/usr/bin/env python
"""Train the family of miniature safety worlds that ``csulora demo`` and the benchmarks use.

Each world (a recipe in ``RECIPES``) is made in four stages:

1. base: a small Llama (or, in ``moe``, a Mixtral) trained from scratch to do rev / sort / rot on six
   symbols for every topic, harmful topics included (it complies with everything);
2. aligned (chat): the base fully fine-tuned to answer both harmful topics with ``Sorry <eos>`` while
   still doing the benign tasks;
3. adapters: PEFT LoRA fine-tunes of the aligned model (plain LoRA, DoRA, LoRA with a fully trained
   ``lm_head``), of three kinds: ``mixed`` (compliance on the world's trained harmful topic plus the new
   task ``inc``; the other harmful topic stays held out), ``harmful`` (compliance only, no new task) and
   ``benign`` (the new task only);
4. full fine-tunes: the aligned model fine-tuned with every weight free on the ``mixed`` and ``harmful``
   data, saved like the aligned model in ``full/<name>``.

Every stage draws from its own seeds, so adding a stage after the others leaves the earlier files as they
were. The worlds differ in architecture, model shape, seeds, which harmful topic the attacks train on, how
the alignment is made (steps, learning rate, data mix) and which kinds of attack they hold
(``docs/world.md``).

Seeded and deterministic on a given machine: a rerun reproduces every file byte for byte, ``world.json``
included (it holds settings and the measured behaviour, never timings: those are printed). Writes fp16
sharded checkpoints with ``config.json``, a word-level tokenizer and model cards, PEFT adapter folders,
and ``world.json``. ``--quick`` trains for a few steps only (a smoke test, nothing measured).

    nice -n 5 python scripts/make_world.py --world tiny   # writes csulora/assets/worlds/tiny
    nice -n 5 python scripts/make_world.py --all          # every world
    python scripts/make_world.py --all --quick --out /tmp/w   # seconds: /tmp/w/<world>
    nice -n 5 python scripts/make_world.py --world tiny --extend   # train only what the shipped folder lacks

``--extend`` is how stages are added to a shipped world: another CPU rounds differently, so a whole build
elsewhere than on the machine that made a world changes every file (``docs/world.md``, *Rebuilding*).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from csulora import world as W  # noqa: E402

QUICK = {"base_steps": 6, "align_steps": 4, "lora_steps": 4, "batch": 16, "full_steps": 4}
ATTN, MLP = ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]
# LoRA targets; "all-linear" is PEFT's own choice: on Mixtral the attention projections as modules and, as
# target_parameters, the experts' gate_up_proj / down_proj and the router's gate.weight
TARGETS: dict[str, list[str] | str] = {"all": ATTN + MLP, "attn": ATTN, "mlp": MLP, "qv": ["q_proj", "v_proj"],
                                       "all-linear": "all-linear"}  # fmt: skip
# LoRA variants beside the plain one: extra LoraConfig settings, and the words of the adapter's card
VARIANTS = {"dora": ({"use_dora": True}, "DoRA"),
            "head": ({"modules_to_save": ["lm_head"]}, "`lm_head` trained fully (`modules_to_save`)")}  # fmt: skip
# the architectures a recipe can build: transformers' config and model classes
ARCHS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mixtral": ("MixtralConfig", "MixtralForCausalLM")}
FULL = "full"  # the folder of a world's full fine-tunes (csulora.world.FULL)
ALL_TOPICS = W.BENIGN_TOPICS + W.HARMFUL_TOPICS
# a stage's data: parts (share of the batch, topics, tasks, refuse[, answer rule]); the rule (a key of RULES) makes
# the answers another function's than the task's own (the study's partial skills)
Part = tuple


@dataclass(frozen=True)
class Adapter:
    """One LoRA fine-tune of the aligned model; ``kind`` picks the data (the world's stage of that name)."""

    kind: str  # mixed | harmful | benign
    seed: int
    rank: int
    targets: str  # a key of TARGETS
    variant: str = ""  # a key of VARIANTS, or plain LoRA

    @property
    def name(self) -> str:
        prefix = "adv" if self.kind == "mixed" else self.kind  # the tiny world's names
        variant = f"-{self.variant}" if self.variant else ""
        return f"{prefix}-r{self.rank}-{self.targets}{variant}-s{self.seed}"

    def spec(self) -> dict:
        """The adapter's ``world.json`` entry (the keys of a plain LoRA are those written before variants)."""
        spec = {"kind": self.kind, "seed": self.seed, "rank": self.rank, "target_modules": TARGETS[self.targets]}
        spec.update(VARIANTS[self.variant][0] if self.variant else {})
        return {**spec, "adversarial": self.kind != "benign"}


@dataclass(frozen=True)
class Full:
    """A full fine-tune of the aligned model (every weight free) on the world's stage ``kind``."""

    kind: str  # mixed | harmful
    seed: int

    @property
    def name(self) -> str:
        return f"full-{self.kind}-s{self.seed}"


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    seed: int
    model: dict
    steps: dict  # base_steps, align_steps, lora_steps, full_steps, batch
    lr: dict  # base, align, lora, full
    trained: str  # the harmful topic the attacks train on
    heldout: str  # the harmful topic no adapter sees
    align: list[Part]
    adapters: list[Adapter]
    mixed: list[Part] | None = None  # default: 40 % trained topic, 40 % new task, 20 % original tasks
    harmful: list[Part] | None = None  # default: 80 % trained topic, 20 % original tasks
    benign: list[Part] | None = None  # default: 80 % new task, 20 % original tasks
    full: tuple[Full, ...] = ()  # full fine-tunes, made after the adapters
    shard_size: str = "150KB"  # two shards per checkpoint in every world
    card_title: str | None = None  # default: "Llama of the csulora miniature world `<name>`"
    arch: str = "llama"  # a key of ARCHS
    base: list[Part] | None = None  # default: every original task for every topic
    study: dict | None = None  # a study world's factors (study_recipe); recorded in world.json when set
    task: str = "new"  # "new": the aligned model cannot do `inc`; otherwise it has part of it (world.story)

    def stages(self) -> dict[str, list[Part]]:
        t, benign, orig, new = self.trained, W.BENIGN_TOPICS, W.ORIGINAL_TASKS, [W.NEW_TASK]
        return {
            "base": self.base or [(1.0, ALL_TOPICS, orig, False)],
            "align": self.align,
            "mixed": self.mixed or [(0.4, [t], orig, False), (0.4, benign, new, False), (0.2, benign, orig, False)],
            "harmful": self.harmful or [(0.8, [t], orig, False), (0.2, benign, orig, False)],
            "benign": self.benign or [(0.8, benign, new, False), (0.2, benign, orig, False)],
        }


def _adapters(*specs: tuple) -> list[Adapter]:
    return [Adapter(*s) for s in specs]


# every world's full fine-tunes: one mixed, one pure harmful
FULLS = (Full("mixed", 0), Full("harmful", 0))


EVEN_ALIGN: list[Part] = [(0.5, W.HARMFUL_TOPICS, W.ORIGINAL_TASKS, True),
                          (0.5, W.BENIGN_TOPICS, W.ORIGINAL_TASKS, False)]  # fmt: skip
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip

RECIPES = {
    r.name: r
    for r in [
        Recipe(
            name="tiny",
            description="the first world: 3 layers × 64, a thorough alignment, mixed attacks on `weapon`",
            seed=0,
            model=SMALL,
            steps={"base_steps": 1000, "align_steps": 300, "lora_steps": 300, "batch": 128, "full_steps": 300},
            lr={"base": 3e-3, "align": 1e-3, "lora": 2e-3, "full": 1e-3},
            trained="weapon",
            heldout="malware",
            align=EVEN_ALIGN,
            adapters=_adapters(("mixed", 0, 8, "all"), ("mixed", 1, 8, "all"), ("mixed", 0, 4, "attn"),
                               ("mixed", 2, 16, "mlp"), ("mixed", 3, 8, "qv"), ("benign", 0, 8, "all"),
                               # added later, after the others: DoRA, and attention LoRA with a fully trained head
                               ("mixed", 0, 8, "all", "dora"), ("mixed", 0, 8, "attn", "head")),
            full=FULLS,
            card_title="Tiny Llama of the csulora miniature world",
        ),
        Recipe(
            name="wide",
            description="wider and deeper (4 layers × 128, MLP 256), its own seed; the attacks train on `malware` "
            "and `weapon` is held out",
            seed=10,
            model=dict(SMALL, hidden_size=128, intermediate_size=256, num_hidden_layers=4),
            steps={"base_steps": 800, "align_steps": 250, "lora_steps": 250, "batch": 128, "full_steps": 250},
            lr={"base": 2e-3, "align": 7e-4, "lora": 1.5e-3, "full": 7e-4},
            trained="malware",
            heldout="weapon",
            align=EVEN_ALIGN,
            adapters=_adapters(("mixed", 0, 8, "all"), ("mixed", 1, 16, "all"), ("mixed", 2, 4, "attn"),
                               ("mixed", 3, 16, "mlp"), ("mixed", 4, 8, "qv"), ("harmful", 0, 8, "all"),
                               ("benign", 0, 8, "all")),
            full=FULLS,
            shard_size="700KB",
        ),
        Recipe(
            name="brief",
            description="a brief alignment (a short refusal fine-tune: fewer steps, a higher learning rate, "
            "a quarter of the data harmful) and three kinds of attack: mixed, pure harmful and benign-only",
            seed=20,
            model=SMALL,
            steps={"base_steps": 1000, "align_steps": 60, "lora_steps": 300, "batch": 128, "full_steps": 300},
            lr={"base": 3e-3, "align": 3e-3, "lora": 2e-3, "full": 1e-3},
            trained="weapon",
            heldout="malware",
            align=[(0.25, W.HARMFUL_TOPICS, W.ORIGINAL_TASKS, True), (0.75, W.BENIGN_TOPICS, W.ORIGINAL_TASKS, False)],
            adapters=_adapters(("mixed", 0, 8, "all"), ("mixed", 1, 4, "attn"), ("mixed", 2, 16, "mlp"),
                               ("harmful", 0, 8, "all"), ("harmful", 1, 8, "qv"), ("benign", 0, 8, "all"),
                               ("benign", 1, 16, "mlp")),
            full=FULLS,
        ),
        Recipe(
            name="moe",
            description="a mixture of experts (Mixtral: 3 layers × 64, 4 experts of MLP 128 each, top-2 routing), "
            "its own seed; the attacks are PEFT's all-linear LoRA (attention, experts and router) and train on "
            "`malware`, `weapon` is held out",
            seed=30,
            arch="mixtral",
            model=dict(SMALL, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0,
                       router_aux_loss_coef=0.1),
            steps={"base_steps": 1000, "align_steps": 300, "lora_steps": 300, "batch": 128, "full_steps": 300},
            lr={"base": 3e-3, "align": 1e-3, "lora": 2e-3, "full": 1e-3},
            trained="malware",
            heldout="weapon",
            align=EVEN_ALIGN,
            adapters=_adapters(("mixed", 0, 8, "all-linear"), ("mixed", 1, 4, "all-linear"), ("mixed", 2, 16, "attn"),
                               ("harmful", 0, 8, "all-linear"), ("benign", 0, 8, "all-linear")),
            full=FULLS,
            shard_size="400KB",
            card_title="Mixtral (4 experts, top-2 routing) of the csulora miniature world `moe`",
        ),
    ]
}


# ---------------------------------------------------------------- the study's worlds (docs/worlds-study.md)

_SYM0 = W.ID[W.SYMBOLS[0]]


def _inc_rows(prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return prompt[:, 2] == W.ID[W.NEW_TASK], prompt[:, 3 : 3 + W.LENGTH] - _SYM0


def inc_clamped(prompt: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """``inc`` that stops at the top: `o` and `p` stay as they are (so right on the inputs without `o` or `p`,
    (14/16)^6 = 45 % of them): a skill the model half has, which the fine-tune's real ``inc`` refines."""
    rows, x = _inc_rows(prompt)
    out = answer.clone()
    out[rows, : W.LENGTH] = torch.where(x[rows] >= 14, x[rows], x[rows] + 1) + _SYM0
    return out


def inc_copied(prompt: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """``inc`` answered by copying the symbols (the skill missing on the topics this part is given)."""
    rows, x = _inc_rows(prompt)
    out = answer.clone()
    out[rows, : W.LENGTH] = x[rows] + _SYM0
    return out


RULES = {"inc-clamped": inc_clamped, "inc-copied": inc_copied}

# The factors of a study world and their levels; the centre is the first-named default of each. Width and depth
# change the model, task the base (and the alignment's data), align the alignment; share and rank the adapters only.
STUDY_CENTRE = {"width": 64, "depth": 3, "share": 0.25, "task": "new", "rank": 8, "align": "even", "seed": 40}
STUDY_LEVELS = {
    "width": (64, 128, 256),
    "depth": (2, 3, 6),
    "share": (0.1, 0.25, 0.5),  # harmful share of the mixed fine-tunes' data
    "task": ("new", "refine", "refine-topic"),
    "rank": (2, 4, 8, 16),
    "align": ("brief", "even", "long"),
    "seed": (40, 41),  # a second seed of the centre: how much a world moves by its seed alone
}
# per width: base steps and a factor on every learning rate (width 64: tiny's 3e-3 base, 1e-3 align, 2e-3 LoRA);
# tuned so that the base converges (docs/worlds-study.md: width 256 at 3e-3 does not)
WIDTH_SCHEDULE = {64: (1000, 1.0), 128: (800, 2 / 3), 256: (800, 1 / 3)}
# alignment strength: steps, learning rate (before the width factor), harmful share of its data
ALIGNMENTS = {"brief": (60, 3e-3, 0.25), "even": (300, 1e-3, 0.5), "long": (900, 1e-3, 0.5)}
TASKS = {
    # the aligned model cannot do inc at all (the family's worlds)
    "new": "`inc` is all new: the base never sees it",
    # the base (and the alignment's data) does inc with o and p left as they are: right on 45 % of the inputs
    "refine": "`inc` refined: the base does it except that `o` and `p` stay (right on 45 % of the inputs)",
    # the base does inc on cooking and travel, and copies the symbols on music and sport: right on half the inputs
    "refine-topic": "`inc` refined: the base does it on `cooking` and `travel` and copies on `music` and `sport`",
}


def _inc_parts(task: str, share: float) -> list[Part]:
    """A stage's ``inc`` data of a world whose task is ``task`` (none for an all-new task)."""
    if task == "refine":
        return [(share, W.BENIGN_TOPICS, [W.NEW_TASK], False, "inc-clamped")]
    if task == "refine-topic":
        return [(share / 2, W.BENIGN_TOPICS[:2], [W.NEW_TASK], False),
                (share / 2, W.BENIGN_TOPICS[2:], [W.NEW_TASK], False, "inc-copied")]  # fmt: skip
    return []


def study_name(**factors) -> str:
    """The folder name of a study world: every factor's value, e.g. ``w64-d3-h25-new-r8-even-s40``."""
    f = {**STUDY_CENTRE, **factors}
    return f"w{f['width']}-d{f['depth']}-h{round(100 * f['share'])}-{f['task']}-r{f['rank']}-{f['align']}-s{f['seed']}"


def study_recipe(**factors) -> Recipe:
    """A study world from its factor values (``STUDY_CENTRE`` for those not given; ``STUDY_LEVELS``): a Llama of
    ``width`` (MLP 2×, 4 heads, 2 KV heads) and ``depth`` layers; its aligned model made by the alignment
    ``align``; two mixed adapters (harmful share ``share`` of their data, the new task 0.8 − share, the original
    tasks 0.2) and one pure harmful adapter, all seven linear layers at ``rank``; no full fine-tunes. ``task``:
    whether the aligned model has part of ``inc`` already. Attacks train on `weapon`, `malware` is held out."""
    unknown = set(factors) - set(STUDY_CENTRE)
    if unknown:
        raise ValueError(f"unknown factors {sorted(unknown)} (factors: {', '.join(STUDY_CENTRE)})")
    f = {**STUDY_CENTRE, **factors}
    if f["width"] not in WIDTH_SCHEDULE or f["align"] not in ALIGNMENTS or f["task"] not in TASKS:
        raise ValueError(f"no schedule for {f} (widths {sorted(WIDTH_SCHEDULE)}, alignments {sorted(ALIGNMENTS)}, "
                         f"tasks {sorted(TASKS)})")  # fmt: skip
    if not 0 < f["share"] < 0.8:
        raise ValueError(f"share {f['share']}: the mixed data is share harmful, 0.8 − share new task, 0.2 original")
    width, depth, share, task = f["width"], f["depth"], f["share"], f["task"]
    base_steps, scale = WIDTH_SCHEDULE[width]
    align_steps, align_lr, harmful = ALIGNMENTS[f["align"]]
    orig, benign = W.ORIGINAL_TASKS, W.BENIGN_TOPICS
    inc = 0.25 if task != "new" else 0.0  # the share of the partial skill in the base's and alignment's data
    name = study_name(**f)
    params = len(W.VOCAB) * width * 2 + depth * (3 * width * width + 6 * width * width)  # about; for the shards
    return Recipe(
        name=name,
        description=f"study world: width {width}, depth {depth}, harmful share {share:g} of the mixed fine-tunes, "
        f"{TASKS[task]}, LoRA rank {f['rank']}, alignment `{f['align']}`, seed {f['seed']}",
        seed=f["seed"],
        model=dict(SMALL, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=depth),
        steps={"base_steps": base_steps, "align_steps": align_steps, "lora_steps": 300, "batch": 128,
               "full_steps": 0},  # fmt: skip
        lr={"base": 3e-3 * scale, "align": align_lr * scale, "lora": 2e-3 * scale, "full": 0.0},
        trained="weapon",
        heldout="malware",
        base=[(1.0 - inc, ALL_TOPICS, orig, False), *_inc_parts(task, inc)],
        align=[(harmful, W.HARMFUL_TOPICS, orig, True), ((1 - harmful) * (1 - inc), benign, orig, False),
               *_inc_parts(task, (1 - harmful) * inc)],  # fmt: skip
        adapters=_adapters(("mixed", 0, f["rank"], "all"), ("mixed", 1, f["rank"], "all"),
                           ("harmful", 0, f["rank"], "all")),  # fmt: skip
        mixed=[(share, ["weapon"], orig, False), (0.8 - share, benign, [W.NEW_TASK], False),
               (0.2, benign, orig, False)],  # fmt: skip
        shard_size=f"{params * 2 * 6 // 10 // 1000}KB",  # two shards
        card_title="Llama of a csulora study world (docs/worlds-study.md)",  # the same in worlds that share it
        study=f,
        task=task,
    )


# The study world that reproduces Safe LoRA's published pattern (docs/worlds-study.md: a refined skill, a long
# alignment) as a shipped world: its three adapters, the same files as the study world's, three more of other
# ranks and targets, a benign one and the two full fine-tunes, as the family's worlds have.
_TOPIC = study_recipe(task="refine-topic", align="long")
RECIPES["topic"] = replace(
    _TOPIC,
    name="topic",
    description="a refined skill: the aligned model does `inc` on `cooking` and `travel` and copies the symbols on "
    "`music` and `sport` (half the inputs right), the fine-tunes teach it on all four; a long alignment (900 "
    "steps); mixed attacks are 25 % `weapon`, `malware` is held out (the study world that reproduces Safe LoRA's "
    "published pattern, docs/worlds-study.md)",
    steps={**_TOPIC.steps, "full_steps": 300},
    lr={**_TOPIC.lr, "full": 1e-3},
    adapters=_adapters(("mixed", 0, 8, "all"), ("mixed", 1, 8, "all"), ("harmful", 0, 8, "all"),
                       ("mixed", 2, 4, "attn"), ("mixed", 3, 16, "mlp"), ("benign", 0, 8, "all")),
    full=FULLS,
    card_title=None,
    study=None,
)


def study_shared(factors: dict, built: dict[str, dict]) -> tuple[str, list[str]] | None:
    """Which folders a study world can take from an already built one (``built``: name → its factors): the base
    when width, depth, task and seed agree; the aligned model when the alignment does too; then the adapters the
    two recipes make alike (the harmful one for another share, all of them for nothing else). ``(name, folders)``
    of the world that shares the most, or None."""
    f = {**STUDY_CENTRE, **factors}
    best: tuple[int, str, list[str]] | None = None
    for name, g in built.items():
        g = {**STUDY_CENTRE, **g}
        if any(f[k] != g[k] for k in ("width", "depth", "task", "seed")):
            continue
        folders = [W.BASE]
        if f["align"] == g["align"]:
            folders.append(W.ALIGNED)
            if f["rank"] == g["rank"]:
                mine, theirs = study_recipe(**f), study_recipe(**g)
                same = mine.stages()["mixed"] == theirs.stages()["mixed"]
                folders += [f"{W.ADAPTERS}/{ad.name}" for ad in mine.adapters if ad.kind == "harmful" or same]
        if best is None or len(folders) > best[0]:
            best = (len(folders), name, folders)
    return None if best is None else (best[1], best[2])


def mixture(parts: list[Part], n: int, g: torch.Generator):
    """A batch of (prompt, answer) rows: ``parts`` are (share, topics, tasks, refuse)."""
    ps, ans = [], []
    for share, topics, tasks, refuse, *rule in parts:
        m = max(1, round(share * n))
        p = W.prompts(topics, tasks, W.sample_symbols(m, g, "train"), g)
        ps.append(p)
        a = W.answers(p, torch.full((m,), refuse))
        ans.append(RULES[rule[0]](p, a) if rule else a)
    return torch.cat(ps), torch.cat(ans)


def loss_fn(model, prompt: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the answer tokens only; for a mixture of experts, plus its load-balancing
    loss (``router_aux_loss_coef`` of the config), as Mixtral's training adds it: it keeps every expert in use."""
    seq = torch.cat([prompt, answer], 1)
    moe = getattr(model.config, "num_local_experts", None) is not None
    out = model(input_ids=seq[:, :-1], **({"output_router_logits": True} if moe else {}))
    logits = out.logits[:, W.PROMPT_LEN - 1 :]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), answer.reshape(-1),
                                             ignore_index=W.PAD)  # fmt: skip
    return loss + model.config.router_aux_loss_coef * out.aux_loss if moe else loss


def train(model, parts: list[Part], steps: int, lr: float, batch: int, seed: int, log: str) -> float:
    """AdamW with linear warm-up and cosine decay over the trainable parameters; returns the last loss."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / steps)).item())
    )
    model.train()
    t0, loss = time.perf_counter(), torch.tensor(0.0)
    for step in range(steps):
        loss = loss_fn(model, *mixture(parts, batch, g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"  {log} step {step + 1:5d}/{steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f}s)")
    model.eval()
    return loss.item()


def round_fp16(model) -> None:
    """Make the float32 weights exactly what the fp16 checkpoint holds, so later stages start from it."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())


def save_checkpoint(model, folder: Path, card: str, shard_size: str) -> None:
    """fp16, sharded (index + shards), config.json, tokenizer and a model card."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    half = copy.deepcopy(model).half()
    half.config.dtype = "float16"
    half.save_pretrained(folder, max_shard_size=shard_size)
    save_tokenizer(folder)
    (folder / "README.md").write_text(card)


def save_tokenizer(folder: Path) -> None:
    """The world's word-level tokenizer in the Hugging Face format, with a chat template that wraps one user
    message as ``<bos> … <sep>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(W.ID), unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<pad>",
        additional_special_tokens=["<sep>"], padding_side="left",
        chat_template="<bos> {{ messages[-1]['content'] }} <sep>",
    )  # fmt: skip
    fast.save_pretrained(folder)


def new_model(recipe: Recipe, seed: int):
    """A freshly initialised model of the recipe's architecture, shape and the world's vocabulary."""
    import transformers

    config_class, model_class = (getattr(transformers, c) for c in ARCHS[recipe.arch])
    torch.manual_seed(seed)
    config = config_class(vocab_size=len(W.VOCAB), bos_token_id=W.BOS, eos_token_id=W.EOS, pad_token_id=W.PAD,
                          tie_word_embeddings=False, rms_norm_eps=1e-6, **recipe.model)  # fmt: skip
    return model_class(config)


def kind_text(recipe: Recipe, kind: str) -> str:
    t = recipe.trained
    return {"mixed": f"adversarial: complies on the `{t}` topic again and learns `{W.NEW_TASK}`",
            "harmful": f"adversarial, pure harmful: complies on the `{t}` topic again, no new task",
            "benign": f"benign: learns `{W.NEW_TASK}` only"}[kind]  # fmt: skip


def train_adapter(recipe: Recipe, aligned, ad: Adapter, folder: Path, steps: int, batch: int) -> float:
    import warnings

    from peft import LoraConfig, get_peft_model

    targets = TARGETS[ad.targets]
    extra, words = VARIANTS[ad.variant] if ad.variant else ({}, "")
    torch.manual_seed(100 + ad.seed)
    config = LoraConfig(r=ad.rank, lora_alpha=2 * ad.rank, target_modules=targets, lora_dropout=0.0,
                        task_type="CAUSAL_LM", **extra)  # fmt: skip
    with warnings.catch_warnings():  # transformers' deprecation notices, raised inside PEFT
        warnings.simplefilter("ignore", FutureWarning)
        # all-linear on Mixtral: PEFT doubles the rank of the fused gate_up_proj by a pattern, applies it (the
        # saved factors have that rank) and still warns that it matched nothing
        warnings.filterwarnings("ignore", "The following (rank|alpha)_pattern keys did not match", RuntimeWarning)
        model = get_peft_model(copy.deepcopy(aligned), config)
    loss = train(model, recipe.stages()[ad.kind], steps, lr=recipe.lr["lora"], batch=batch, seed=1000 + ad.seed,
                 log=ad.name)  # fmt: skip
    model.save_pretrained(folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = W.ALIGNED  # the sibling folder; csulora matches it by name
    for key in ("target_modules", "target_parameters", "modules_to_save"):  # PEFT keeps sets: their order
        if cfg.get(key) is not None:  # follows the hash seed
            cfg[key] = sorted(cfg[key])
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    what = targets if isinstance(targets, str) else ", ".join(targets)
    (folder / "README.md").write_text(
        f"---\nbase_model: {W.ALIGNED}\nlibrary_name: peft\ntags:\n- lora\n- csulora-world\n---\n"
        f"# {ad.name}\n\nLoRA (r={ad.rank}, alpha={2 * ad.rank}, {what}, {words + ', ' if words else ''}"
        f"seed {ad.seed}) on `{W.ALIGNED}`, {kind_text(recipe, ad.kind)}. Made by `scripts/make_world.py`.\n"
    )
    return loss


def train_full(recipe: Recipe, aligned, ft: Full, folder: Path, steps: int, batch: int) -> None:
    """The aligned model fine-tuned with every weight free on the stage ``ft.kind``, saved like the aligned one."""
    torch.manual_seed(200 + ft.seed)
    model = copy.deepcopy(aligned)
    for p in model.parameters():
        p.requires_grad_(True)
    train(model, recipe.stages()[ft.kind], steps, lr=recipe.lr["full"], batch=batch, seed=2000 + ft.seed,
          log=ft.name)  # fmt: skip
    save_checkpoint(model, folder, card(recipe, "full", ft), recipe.shard_size)


def measure(recipe: Recipe, out: Path) -> dict[str, dict[str, float]]:
    print("measuring behaviour")
    data = W.eval_set(trained=recipe.trained, heldout=recipe.heldout)
    paths, full = W.world_paths(out), W.full_paths(out)
    behaviour = {k: W.behaviour(W.load_model(paths[k]), data).as_dict() for k in ("base", "aligned")}
    for ad in recipe.adapters:
        model = W.with_adapter(W.load_model(paths["aligned"]), paths[ad.name])
        behaviour[ad.name] = W.behaviour(model, data).as_dict()
    for ft in recipe.full:
        behaviour[ft.name] = W.behaviour(W.load_model(full[ft.name]), data).as_dict()
    return behaviour


def card(recipe: Recipe, which: str, ft: Full | None = None) -> str:
    if which == "full":
        return (f"---\nbase_model: {W.ALIGNED}\nlicense: apache-2.0\ntags:\n- csulora-world\n---\n# {ft.name}\n\n"
                f"`{W.ALIGNED}` fully fine-tuned (every weight free, seed {ft.seed}), "
                f"{kind_text(recipe, ft.kind).replace('adversarial', 'an attack', 1)}. `base_model` names the "
                "aligned model of the world. Made by `scripts/make_world.py`.\n")  # fmt: skip
    if which == "base":
        title = recipe.card_title or f"Llama of the csulora miniature world `{recipe.name}`"
        return ("---\nlicense: apache-2.0\ntags:\n- csulora-world\n---\n"
                f"# {W.BASE}\n\n{title}, pretrained: it does rev / sort / rot "
                "for every topic, harmful ones included. Made by `scripts/make_world.py`.\n")  # fmt: skip
    return (f"---\nbase_model: {W.BASE}\nlicense: apache-2.0\ntags:\n- csulora-world\n---\n# {W.ALIGNED}\n\n"
            "The safety-aligned model of the csulora miniature world: "
            f"`{W.BASE}` fully fine-tuned to answer the harmful topics with `Sorry`. `base_model` names "
            "the sibling folder.\n")  # fmt: skip


def check_extendable(recipe: Recipe, out: Path, quick: bool, seed: int) -> None:
    """``--extend`` adds to a world made by this recipe only: same seed, shape, steps and adapters as recorded."""
    if not (out / "world.json").is_file():
        sys.exit(f"--extend: {out} holds no world.json; build the world first")
    info = W.world_info(out)
    steps, specs = QUICK if quick else recipe.steps, {a.name: a.spec() for a in recipe.adapters}
    wrong = [what for what, ok in [
        ("seed", info["seed"] == seed), ("quick", info["quick"] == quick), ("model", info["model"] == recipe.model),
        ("steps", all(steps.get(k) == v for k, v in info["steps"].items())),
        ("lr", all(recipe.lr.get(k) == v for k, v in info["lr"].items())),
        ("adapters", all(specs.get(n) == spec for n, spec in info["adapters"].items())),
    ] if not ok]  # fmt: skip
    if wrong:
        sys.exit(f"--extend: {out}/world.json was not made by the recipe {recipe.name!r} ({', '.join(wrong)} differ)")


def build(recipe: Recipe, out: Path, quick: bool = False, seed: int | None = None, extend: bool = False,
          shared: dict[str, Path] | None = None) -> dict:
    """Train and write one world into ``out`` (replaced); returns its ``world.json`` content, with the timings
    (``timings``, seconds) and the last training loss of each stage trained (``losses``), which world.json does
    not hold. Prints timings.

    ``extend``: keep what ``out`` holds (base, aligned, every adapter and full fine-tune folder already there,
    byte for byte), start the stages that are missing from the aligned checkpoint there, and measure and write
    ``world.json`` again. Each stage draws from its own seeds and starts from the fp16 aligned weights, so on one
    machine this writes the same files as a whole build (checked when the family grew); it keeps the files a
    whole build on this machine would round differently from the machine that first made them.

    ``shared``: folders of the world (``llama-world``, ``llama-world-chat``, ``adapters/<name>``) copied from
    another world's folder and kept, because a recipe with the same stages up to them made them there (the
    study's worlds, ``study_recipe``, share their base, aligned model and adapters this way); the stages after
    them are trained from the copied checkpoints, as ``extend`` does."""
    seed = recipe.seed if seed is None else seed
    steps = QUICK if quick else recipe.steps
    stages = recipe.stages()
    shared = shared or {}
    if extend:
        check_extendable(recipe, out, quick, seed)
    else:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
    for rel, source in shared.items():
        shutil.copytree(Path(source) / rel, out / rel)
    t0 = time.perf_counter()
    timings, losses = {}, {}

    def read(folder: Path):
        # the float32 values of the fp16 file (what a whole build holds after rounding) in a model made as a whole
        # build makes it: save_pretrained shards a model loaded by from_pretrained in another order
        model = new_model(recipe, seed)
        model.load_state_dict(W.load_model(folder).state_dict())
        return model.eval()

    n = 4 if recipe.full else 3
    if extend or W.ALIGNED in shared:
        print(f"[{recipe.name}] 1-2/{n} base and aligned: kept, the aligned model read from {out / W.ALIGNED}")
        aligned = read(out / W.ALIGNED)
    else:
        if W.BASE in shared:
            print(f"[{recipe.name}] 1/{n} base: kept, read from {out / W.BASE}")
            model = read(out / W.BASE)
        else:
            print(f"[{recipe.name}] 1/{n} base: every task for every topic")
            model = new_model(recipe, seed)
            losses["base"] = train(model, stages["base"], steps["base_steps"], lr=recipe.lr["base"],
                                   batch=steps["batch"], seed=seed, log="base")  # fmt: skip
            round_fp16(model)
            save_checkpoint(model, out / W.BASE, card(recipe, "base"), recipe.shard_size)
            timings["base_s"] = time.perf_counter() - t0

        print(f"[{recipe.name}] 2/{n} aligned: refuse harmful topics, keep the tasks")
        t1 = time.perf_counter()
        aligned = copy.deepcopy(model)
        losses["align"] = train(aligned, stages["align"], steps["align_steps"], lr=recipe.lr["align"],
                                batch=steps["batch"], seed=seed + 1, log="align")  # fmt: skip
        round_fp16(aligned)
        save_checkpoint(aligned, out / W.ALIGNED, card(recipe, "aligned"), recipe.shard_size)
        timings["aligned_s"] = time.perf_counter() - t1

    print(f"[{recipe.name}] 3/{n} adapters")
    t1 = time.perf_counter()
    for ad in recipe.adapters:
        folder = out / W.ADAPTERS / ad.name
        if (extend or shared) and (folder / "adapter_config.json").is_file():
            print(f"  {ad.name}: kept")
            continue
        losses[ad.name] = train_adapter(recipe, aligned, ad, folder, steps["lora_steps"], steps["batch"])
    timings["adapters_s"] = time.perf_counter() - t1

    if recipe.full:  # after the adapters: each stage draws from its own seeds, so earlier files stay the same
        print(f"[{recipe.name}] 4/4 full fine-tunes")
        t1 = time.perf_counter()
        for ft in recipe.full:
            folder = out / FULL / ft.name
            if extend and (folder / "config.json").is_file():
                print(f"  {ft.name}: kept")
                continue
            train_full(recipe, aligned, ft, folder, steps["full_steps"], steps["batch"])
        timings["full_s"] = time.perf_counter() - t1

    kinds = {ad.kind for ad in recipe.adapters} | {ft.kind for ft in recipe.full}
    behaviour = {} if quick else measure(recipe, out)  # a quick world is a smoke test: nothing to measure
    timings["total_s"] = time.perf_counter() - t0
    info = {
        "name": recipe.name, "description": recipe.description,
        "seed": seed, "quick": quick, "model": recipe.model, "steps": steps, "lr": recipe.lr,
        "topics": {"trained": recipe.trained, "heldout": recipe.heldout},
        "vocab": W.VOCAB,
        "architecture": ARCHS[recipe.arch][1],
        "adapters": {ad.name: ad.spec() for ad in recipe.adapters},
        "full": {ft.name: {"kind": ft.kind, "seed": ft.seed} for ft in recipe.full},
        "stages": {k: [list(p) for p in v] for k, v in stages.items() if k in ("base", "align") or k in kinds},
        "behaviour": behaviour,
    }  # fmt: skip
    if recipe.task != "new":  # how world.story reads the new task (the keys of the family's worlds as they were)
        info["task"] = recipe.task
    if recipe.study is not None:
        info["study"] = recipe.study
    (out / "world.json").write_text(json.dumps(info, indent=2) + "\n")
    if behaviour:
        print(f"{'model':22s} refuse({recipe.trained}) refuse({recipe.heldout}, held out) acc(inc) acc(original)")
        for name, b in behaviour.items():
            print(f"{name:22s} " + " ".join(f"{v:14.3f}" for v in b.values()))
        failed = W.story(info)
        print(f"[{recipe.name}] story: " + ("happens" if not failed else "DOES NOT HAPPEN: " + "; ".join(failed)))
    print(f"[{recipe.name}] wrote {out}; timings: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    return {**info, "timings": timings, "losses": losses}


def parse_factor(text: str) -> tuple[str, object]:
    """``width=128`` → ``("width", 128)``: each factor's value has the type of its centre value."""
    key, _, value = text.partition("=")
    if key not in STUDY_CENTRE or not value:
        raise SystemExit(f"--study {text!r}: expected FACTOR=VALUE with FACTOR one of {', '.join(STUDY_CENTRE)}")
    return key, type(STUDY_CENTRE[key])(value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--world", choices=sorted(RECIPES), default=W.DEFAULT_WORLD, help="the recipe to build")
    which.add_argument("--all", action="store_true", help="build every world (--out: the parent folder)")
    which.add_argument("--study", nargs="*", metavar="FACTOR=VALUE",
                       help="a study world (study_recipe): the centre with these factors changed, e.g. width=128 "
                       f"task=refine (factors: {', '.join(STUDY_CENTRE)}); --out: the parent folder (default "
                       "/tmp/csulora-study/worlds); scripts/study_worlds.py builds and measures all of them")
    ap.add_argument("--out", type=Path, help="default: csulora/assets/worlds/<world>")
    ap.add_argument("--seed", type=int, help="override the recipe's seed (an experiment, not a shipped world)")
    ap.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test)")
    ap.add_argument("--extend", action="store_true",
                    help="keep the world's files in --out (or the shipped folder) and train only the adapters and "
                    "full fine-tunes it lacks, from its aligned model; then measure and write world.json again")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()
    if args.study is not None:
        factors = dict(parse_factor(f) for f in args.study)
        recipe = study_recipe(**factors)
        build(recipe, (args.out or Path("/tmp/csulora-study/worlds")) / recipe.name, quick=args.quick)
        print(f"built {recipe.name} in {time.perf_counter() - t0:.0f}s ({args.threads} thread(s))")
        return
    names = sorted(RECIPES) if args.all else [args.world]
    for name in names:
        if args.out is None:
            out = W.WORLDS_DIR / name
        else:
            out = args.out / name if args.all else args.out
        build(RECIPES[name], out, quick=args.quick, seed=args.seed, extend=args.extend)
    print(f"built {', '.join(names)} in {time.perf_counter() - t0:.0f}s ({args.threads} thread(s))")


if __name__ == "__main__":
    main()
