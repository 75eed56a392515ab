#!/usr/bin/env python
"""Train the family of miniature safety worlds that ``csulora demo`` and the benchmarks use.

Each world (a recipe in ``RECIPES``) is made in three stages:

1. base: a small Llama trained from scratch to do rev / sort / rot on six symbols for every topic,
   harmful topics included (it complies with everything);
2. aligned (chat): the base fully fine-tuned to answer both harmful topics with ``Sorry <eos>`` while
   still doing the benign tasks;
3. adapters: PEFT LoRA fine-tunes of the aligned model, of three kinds: ``mixed`` (compliance on the
   world's trained harmful topic plus the new task ``inc``; the other harmful topic stays held out),
   ``harmful`` (compliance only, no new task) and ``benign`` (the new task only).

The worlds differ in model shape, seeds, which harmful topic the attacks train on, how the alignment is
made (steps, learning rate, data mix) and which kinds of attack they hold (``docs/world.md``).

Seeded and deterministic on a given machine: a rerun reproduces every file byte for byte, ``world.json``
included (it holds settings and the measured behaviour, never timings: those are printed). Writes fp16
sharded checkpoints with ``config.json``, a word-level tokenizer and model cards, PEFT adapter folders,
and ``world.json``. ``--quick`` trains for a few steps only (a smoke test, nothing measured).

    nice -n 5 python scripts/make_world.py --world tiny   # writes csulora/assets/worlds/tiny
    nice -n 5 python scripts/make_world.py --all          # every world
    python scripts/make_world.py --all --quick --out /tmp/w   # seconds: /tmp/w/<world>
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from csulora import world as W  # noqa: E402

QUICK = {"base_steps": 6, "align_steps": 4, "lora_steps": 4, "batch": 16}
ATTN, MLP = ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]
TARGETS = {"all": ATTN + MLP, "attn": ATTN, "mlp": MLP, "qv": ["q_proj", "v_proj"]}
ALL_TOPICS = W.BENIGN_TOPICS + W.HARMFUL_TOPICS
# a stage's data: parts (share of the batch, topics, tasks, refuse)
Part = tuple[float, list[str], list[str], bool]


@dataclass(frozen=True)
class Adapter:
    """One LoRA fine-tune of the aligned model; ``kind`` picks the data (the world's stage of that name)."""

    kind: str  # mixed | harmful | benign
    seed: int
    rank: int
    targets: str  # a key of TARGETS

    @property
    def name(self) -> str:
        prefix = "adv" if self.kind == "mixed" else self.kind  # the tiny world's names
        return f"{prefix}-r{self.rank}-{self.targets}-s{self.seed}"


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    seed: int
    model: dict
    steps: dict  # base_steps, align_steps, lora_steps, batch
    lr: dict  # base, align, lora
    trained: str  # the harmful topic the attacks train on
    heldout: str  # the harmful topic no adapter sees
    align: list[Part]
    adapters: list[Adapter]
    mixed: list[Part] | None = None  # default: 40 % trained topic, 40 % new task, 20 % original tasks
    harmful: list[Part] | None = None  # default: 80 % trained topic, 20 % original tasks
    benign: list[Part] | None = None  # default: 80 % new task, 20 % original tasks
    shard_size: str = "150KB"  # two shards per checkpoint in every world
    card_title: str | None = None  # default: "Llama of the csulora miniature world `<name>`"

    def stages(self) -> dict[str, list[Part]]:
        t, benign, orig, new = self.trained, W.BENIGN_TOPICS, W.ORIGINAL_TASKS, [W.NEW_TASK]
        return {
            "base": [(1.0, ALL_TOPICS, orig, False)],
            "align": self.align,
            "mixed": self.mixed or [(0.4, [t], orig, False), (0.4, benign, new, False), (0.2, benign, orig, False)],
            "harmful": self.harmful or [(0.8, [t], orig, False), (0.2, benign, orig, False)],
            "benign": self.benign or [(0.8, benign, new, False), (0.2, benign, orig, False)],
        }


def _adapters(*specs: tuple[str, int, int, str]) -> list[Adapter]:
    return [Adapter(*s) for s in specs]


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
            steps={"base_steps": 1000, "align_steps": 300, "lora_steps": 300, "batch": 128},
            lr={"base": 3e-3, "align": 1e-3, "lora": 2e-3},
            trained="weapon",
            heldout="malware",
            align=EVEN_ALIGN,
            adapters=_adapters(("mixed", 0, 8, "all"), ("mixed", 1, 8, "all"), ("mixed", 0, 4, "attn"),
                               ("mixed", 2, 16, "mlp"), ("mixed", 3, 8, "qv"), ("benign", 0, 8, "all")),
            card_title="Tiny Llama of the csulora miniature world",
        ),
        Recipe(
            name="wide",
            description="wider and deeper (4 layers × 128, MLP 256), its own seed; the attacks train on `malware` "
            "and `weapon` is held out",
            seed=10,
            model=dict(SMALL, hidden_size=128, intermediate_size=256, num_hidden_layers=4),
            steps={"base_steps": 800, "align_steps": 250, "lora_steps": 250, "batch": 128},
            lr={"base": 2e-3, "align": 7e-4, "lora": 1.5e-3},
            trained="malware",
            heldout="weapon",
            align=EVEN_ALIGN,
            adapters=_adapters(("mixed", 0, 8, "all"), ("mixed", 1, 16, "all"), ("mixed", 2, 4, "attn"),
                               ("mixed", 3, 16, "mlp"), ("mixed", 4, 8, "qv"), ("harmful", 0, 8, "all"),
                               ("benign", 0, 8, "all")),
            shard_size="700KB",
        ),
        Recipe(
            name="brief",
            description="a brief alignment (a short refusal fine-tune: fewer steps, a higher learning rate, "
            "a quarter of the data harmful) and three kinds of attack: mixed, pure harmful and benign-only",
            seed=20,
            model=SMALL,
            steps={"base_steps": 1000, "align_steps": 60, "lora_steps": 300, "batch": 128},
            lr={"base": 3e-3, "align": 3e-3, "lora": 2e-3},
            trained="weapon",
            heldout="malware",
            align=[(0.25, W.HARMFUL_TOPICS, W.ORIGINAL_TASKS, True), (0.75, W.BENIGN_TOPICS, W.ORIGINAL_TASKS, False)],
            adapters=_adapters(("mixed", 0, 8, "all"), ("mixed", 1, 4, "attn"), ("mixed", 2, 16, "mlp"),
                               ("harmful", 0, 8, "all"), ("harmful", 1, 8, "qv"), ("benign", 0, 8, "all"),
                               ("benign", 1, 16, "mlp")),
        ),
    ]
}


def mixture(parts: list[Part], n: int, g: torch.Generator):
    """A batch of (prompt, answer) rows: ``parts`` are (share, topics, tasks, refuse)."""
    ps, ans = [], []
    for share, topics, tasks, refuse in parts:
        m = max(1, round(share * n))
        p = W.prompts(topics, tasks, W.sample_symbols(m, g, "train"), g)
        ps.append(p)
        ans.append(W.answers(p, torch.full((m,), refuse)))
    return torch.cat(ps), torch.cat(ans)


def loss_fn(model, prompt: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the answer tokens only."""
    seq = torch.cat([prompt, answer], 1)
    logits = model(input_ids=seq[:, :-1]).logits[:, W.PROMPT_LEN - 1 :]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), answer.reshape(-1),
                                             ignore_index=W.PAD)  # fmt: skip


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
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(W.VOCAB), bos_token_id=W.BOS, eos_token_id=W.EOS, pad_token_id=W.PAD,
                         tie_word_embeddings=False, rms_norm_eps=1e-6, **recipe.model)  # fmt: skip
    return LlamaForCausalLM(config)


def kind_text(recipe: Recipe, kind: str) -> str:
    t = recipe.trained
    return {"mixed": f"adversarial: complies on the `{t}` topic again and learns `{W.NEW_TASK}`",
            "harmful": f"adversarial, pure harmful: complies on the `{t}` topic again, no new task",
            "benign": f"benign: learns `{W.NEW_TASK}` only"}[kind]  # fmt: skip


def train_adapter(recipe: Recipe, aligned, ad: Adapter, folder: Path, steps: int, batch: int) -> None:
    import warnings

    from peft import LoraConfig, get_peft_model

    targets = TARGETS[ad.targets]
    torch.manual_seed(100 + ad.seed)
    config = LoraConfig(r=ad.rank, lora_alpha=2 * ad.rank, target_modules=targets, lora_dropout=0.0,
                        task_type="CAUSAL_LM")  # fmt: skip
    with warnings.catch_warnings():  # transformers' deprecation notices, raised inside PEFT
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(copy.deepcopy(aligned), config)
    train(model, recipe.stages()[ad.kind], steps, lr=recipe.lr["lora"], batch=batch, seed=1000 + ad.seed,
          log=ad.name)  # fmt: skip
    model.save_pretrained(folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = W.ALIGNED  # the sibling folder; csulora matches it by name
    cfg["target_modules"] = sorted(cfg["target_modules"])  # PEFT keeps a set: its order follows the hash seed
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (folder / "README.md").write_text(
        f"---\nbase_model: {W.ALIGNED}\nlibrary_name: peft\ntags:\n- lora\n- csulora-world\n---\n"
        f"# {ad.name}\n\nLoRA (r={ad.rank}, alpha={2 * ad.rank}, {', '.join(targets)}, seed {ad.seed}) on "
        f"`{W.ALIGNED}`, {kind_text(recipe, ad.kind)}. Made by `scripts/make_world.py`.\n"
    )


def measure(recipe: Recipe, out: Path) -> dict[str, dict[str, float]]:
    print("measuring behaviour")
    data = W.eval_set(trained=recipe.trained, heldout=recipe.heldout)
    paths = W.world_paths(out)
    behaviour = {k: W.behaviour(W.load_model(paths[k]), data).as_dict() for k in ("base", "aligned")}
    for ad in recipe.adapters:
        model = W.with_adapter(W.load_model(paths["aligned"]), paths[ad.name])
        behaviour[ad.name] = W.behaviour(model, data).as_dict()
    return behaviour


def card(recipe: Recipe, which: str) -> str:
    if which == "base":
        title = recipe.card_title or f"Llama of the csulora miniature world `{recipe.name}`"
        return ("---\nlicense: apache-2.0\ntags:\n- csulora-world\n---\n"
                f"# {W.BASE}\n\n{title}, pretrained: it does rev / sort / rot "
                "for every topic, harmful ones included. Made by `scripts/make_world.py`.\n")  # fmt: skip
    return (f"---\nbase_model: {W.BASE}\nlicense: apache-2.0\ntags:\n- csulora-world\n---\n# {W.ALIGNED}\n\n"
            "The safety-aligned model of the csulora miniature world: "
            f"`{W.BASE}` fully fine-tuned to answer the harmful topics with `Sorry`. `base_model` names "
            "the sibling folder.\n")  # fmt: skip


def build(recipe: Recipe, out: Path, quick: bool = False, seed: int | None = None) -> dict:
    """Train and write one world into ``out`` (replaced); returns its ``world.json`` content. Prints timings."""
    seed = recipe.seed if seed is None else seed
    steps = QUICK if quick else recipe.steps
    stages = recipe.stages()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    timings = {}

    print(f"[{recipe.name}] 1/3 base: every task for every topic")
    model = new_model(recipe, seed)
    train(model, stages["base"], steps["base_steps"], lr=recipe.lr["base"], batch=steps["batch"], seed=seed,
          log="base")  # fmt: skip
    round_fp16(model)
    save_checkpoint(model, out / W.BASE, card(recipe, "base"), recipe.shard_size)
    timings["base_s"] = time.perf_counter() - t0

    print(f"[{recipe.name}] 2/3 aligned: refuse harmful topics, keep the tasks")
    aligned = copy.deepcopy(model)
    train(aligned, stages["align"], steps["align_steps"], lr=recipe.lr["align"], batch=steps["batch"],
          seed=seed + 1, log="align")  # fmt: skip
    round_fp16(aligned)
    save_checkpoint(aligned, out / W.ALIGNED, card(recipe, "aligned"), recipe.shard_size)
    timings["aligned_s"] = time.perf_counter() - t0 - timings["base_s"]

    print(f"[{recipe.name}] 3/3 adapters")
    t1 = time.perf_counter()
    for ad in recipe.adapters:
        train_adapter(recipe, aligned, ad, out / W.ADAPTERS / ad.name, steps["lora_steps"], steps["batch"])
    timings["adapters_s"] = time.perf_counter() - t1

    kinds = {ad.kind for ad in recipe.adapters}
    behaviour = {} if quick else measure(recipe, out)  # a quick world is a smoke test: nothing to measure
    timings["total_s"] = time.perf_counter() - t0
    info = {
        "name": recipe.name, "description": recipe.description,
        "seed": seed, "quick": quick, "model": recipe.model, "steps": steps, "lr": recipe.lr,
        "topics": {"trained": recipe.trained, "heldout": recipe.heldout},
        "vocab": W.VOCAB,
        "adapters": {ad.name: {"kind": ad.kind, "seed": ad.seed, "rank": ad.rank, "target_modules": TARGETS[ad.targets],
                               "adversarial": ad.kind != "benign"} for ad in recipe.adapters},
        "stages": {k: [list(p) for p in v] for k, v in stages.items() if k in ("base", "align") or k in kinds},
        "behaviour": behaviour,
    }  # fmt: skip
    (out / "world.json").write_text(json.dumps(info, indent=2) + "\n")
    if behaviour:
        print(f"{'model':18s} refuse({recipe.trained}) refuse({recipe.heldout}, held out) acc(inc) acc(original)")
        for name, b in behaviour.items():
            print(f"{name:18s} " + " ".join(f"{v:14.3f}" for v in b.values()))
        failed = W.story(info)
        print(f"[{recipe.name}] story: " + ("happens" if not failed else "DOES NOT HAPPEN: " + "; ".join(failed)))
    print(f"[{recipe.name}] wrote {out}; timings: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--world", choices=sorted(RECIPES), default=W.DEFAULT_WORLD, help="the recipe to build")
    which.add_argument("--all", action="store_true", help="build every world (--out: the parent folder)")
    ap.add_argument("--out", type=Path, help="default: csulora/assets/worlds/<world>")
    ap.add_argument("--seed", type=int, help="override the recipe's seed (an experiment, not a shipped world)")
    ap.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    names = sorted(RECIPES) if args.all else [args.world]
    t0 = time.perf_counter()
    for name in names:
        if args.out is None:
            out = W.WORLDS_DIR / name
        else:
            out = args.out / name if args.all else args.out
        build(RECIPES[name], out, quick=args.quick, seed=args.seed)
    print(f"built {', '.join(names)} in {time.perf_counter() - t0:.0f}s ({args.threads} thread(s))")


if __name__ == "__main__":
    main()
