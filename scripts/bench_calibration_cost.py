"""What ``sanitize --calibrate`` costs on a 7B model, measured on CPU (docs/calibration.md, "Cost").

No 7B checkpoint is needed: the model is transformers' own ``LlamaForCausalLM`` in Llama-2-7B's shape (hidden 4096,
intermediate 11008, 32 heads, vocab 32000) with random weights, built on the meta device and filled with small
normal values (values do not change the time of dense matmuls), and with fewer decoder layers (``--layers``), since
a 32-layer model does not fit this machine in float32. PEFT puts a LoRA on it (r = 16, every linear layer) and the
candidate is a second adapter of that shape loaded beside it. Every timing goes through csulora's own code:
``generate_ids`` (batch 1, and the prefill alone), ``Judge.measure`` (one candidate: ``refusal`` by greedy generation on
the harmful prompts, ``kept`` and ``general`` by ``agreement``, one teacher-forced forward per prompt) with its
``refusal``, ``kept_raw`` and ``general_agreement`` timed one by one.

Each (dtype, layers) runs in its own process (``--one``), so the peak RSS printed is that model's. The time of
each measure is fitted as ``a + b·layers`` and extrapolated to 32 layers: an extrapolation from the measured depths,
not a 32-layer measurement. Generation runs with no end-of-sequence token (random weights would stop anywhere), so
every continuation is ``--new-tokens`` long, as the default's ``max_new_tokens`` is a bound a real model may not
reach (an upper bound).

    nice -n 5 /usr/bin/time -v python scripts/bench_calibration_cost.py --out docs/calibration-cost.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from csulora.evaluate import EvalOptions, generate_ids
from csulora.prompts import PromptSet
from csulora.tuning.calibrate import BETAS, PROMPTS, RANKS, Judge, Rule, choose, search

SHAPE = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
         "vocab_size": 32000, "max_position_embeddings": 4096}  # fmt: skip
FULL_LAYERS = 32  # Llama-2-7B
PROMPT_TOKENS = (26, 34)  # each prompt's length in tokens (with <s>), uniform: ~30 on average
BATCH = 16  # EvalOptions' default batch size
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------- one model, measured (a child process)


def tokenizer_():
    """A word-level fast tokenizer over the 32000 ids, ``<s>`` prepended as Llama's does; pad = eos, as ``load``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, SHAPE["vocab_size"])}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def prompts_(rng: random.Random, n: int) -> list[str]:
    lo, hi = PROMPT_TOKENS
    return [" ".join(f"w{rng.randrange(3, SHAPE['vocab_size'])}" for _ in range(rng.randint(lo, hi) - 1))
            for _ in range(n)]  # fmt: skip


def model_(layers: int, dtype: torch.dtype, rank: int):
    """Llama-2-7B's shape with ``layers`` decoder layers, random weights, and a LoRA (``rank``, all linear)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(**SHAPE, num_hidden_layers=layers)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its buffers were left empty on the meta device
    model.generation_config.eos_token_id = None  # every continuation runs to max_new_tokens
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0,
                      init_lora_weights=False, task_type="CAUSAL_LM")  # fmt: skip
    return get_peft_model(model, lora).eval()


def timed(f, *args):
    t0 = time.perf_counter()
    value = f(*args)
    return time.perf_counter() - t0, value


def _timing(f, name: str, parts: dict):
    def wrapped():
        parts[name], value = timed(f)
        return value

    return wrapped


def one(layers: int, dtype: str, batch: int, new_tokens: int, rank: int, threads: int) -> dict:
    """The measures of one (layers, dtype), with ``batch`` prompts in each set (one batch of each)."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = model_(layers, DTYPES[dtype], rank)
    built = time.perf_counter() - t0
    tokenizer = tokenizer_()
    rng = random.Random(0)
    sets = {name: PromptSet(f"--{name}", prompts_(rng, batch), "synthetic", "", batch)
            for name in ("harmful", "prompts", "general")}  # fmt: skip
    options = EvalOptions(batch_size=batch, max_new_tokens=new_tokens)
    generate_ids(model, tokenizer, sets["harmful"].prompts[:2], 2, 2)  # warm up
    out: dict = {"layers": layers, "dtype": dtype, "batch": batch, "new_tokens": new_tokens, "build_s": built,
                 "parameters": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n),
                 "lora_parameters": sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)}  # fmt: skip
    one_prompt = sets["harmful"].prompts[:1]
    out["gen_b1_prefill_s"], _ = timed(generate_ids, model, tokenizer, one_prompt, 1, 1)
    out["gen_b1_s"], ids = timed(generate_ids, model, tokenizer, one_prompt, 1 + B1_STEPS, 1)
    assert len(ids[0]) == 1 + B1_STEPS  # no end-of-sequence stop
    out["gen_b1_per_token_s"] = (out["gen_b1_s"] - out["gen_b1_prefill_s"]) / B1_STEPS
    out["gen_batch_prefill_s"], _ = timed(generate_ids, model, tokenizer, sets["harmful"].prompts, 1, batch)
    # the references' outputs the candidate is scored on: new_tokens ids each, as Judge.prepare's generations
    # give (the forward pass's time does not depend on the ids; the generation's is measured by refusal below)
    judge = Judge(model, tokenizer, sets["harmful"], sets["prompts"], sets["general"], options)
    judge.outputs = {name: [[rng.randrange(3, SHAPE["vocab_size"]) for _ in range(new_tokens)] for _ in range(batch)]
                     for name in ("prompts", "general")}  # fmt: skip
    judge.references = {"aligned": {"kept_reproduced": 0.0, "refusal": 1.0}}
    parts: dict[str, float] = {}
    for name in ("refusal", "kept_raw", "general_agreement"):  # Judge.measure's three measures, timed in place
        setattr(judge, name, _timing(getattr(judge, name), name, parts))
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)  # the candidate: an adapter of the same shape, loaded beside the fine-tune
        out["measure_total_s"], metrics = timed(judge.measure, Path(folder))
    out["measure_s"] = metrics["seconds"]  # what the report's candidate block says (without sanitize's time)
    out["gen_batch_refusal_s"] = parts["refusal"]
    out["forward_batch_kept_s"], out["forward_batch_general_s"] = parts["kept_raw"], parts["general_agreement"]
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


B1_STEPS = 8  # decode steps timed at batch size 1


# ---------------------------------------------------------------- how many candidates a bisection measures


def candidates_measured() -> dict:
    """Over every monotone ladder of ``len(BETAS)`` rungs (the refusal target met from rung r, the general wall
    failing from rung g, kept ≥ 0.5 up to rung c; 13 choices each), how many candidates ``search`` measures, and
    what ``search_ladders`` then measures over the ``len(RANKS)`` ladders (the next only when the target is not met)."""
    n, rule = len(BETAS), Rule()
    met, missed = [], []
    for r in range(n + 1):
        for g in range(n + 1):
            for c in range(n + 1):
                rungs = [{"refusal": float(i >= r), "general": 1.0 if i < g else 0.0, "kept": 1.0 if i < c else 0.0}
                         for i in range(n)]  # fmt: skip
                done = search(n, lambda i, rungs=rungs: rungs[i], 1.0, rule)
                (met if choose(done, 1.0, rule)[1] == "met" else missed).append(len(done))
    # general never failing (no --general, or a wall the ladder never reaches): the usual case on the worlds
    plain = [len(search(n, lambda i, r=r: {"refusal": float(i >= r), "general": None, "kept": 1.0}, 1.0, rule))
             for r in range(n)]  # fmt: skip
    return {"rungs": n, "ladders": len(RANKS), "first_ladder_meets_target": [min(plain), max(plain)],
            "one_ladder": {"met": [min(met), max(met)], "not_met": [min(missed), max(missed)]},
            "whole": [min(met), max(missed) * (len(RANKS) - 1) + max(max(met), max(missed))]}  # fmt: skip


# ---------------------------------------------------------------- fit, extrapolate, tabulate


def fit(xs: list[int], ys: list[float]) -> tuple[float, float, float]:
    """Least squares ``y = a + b·x``; and the largest residual relative to y (0 for two points)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    return a, b, max(abs(a + b * x - y) / y for x, y in zip(xs, ys, strict=True))


MEASURES = {  # per (dtype, layers): seconds, from one child's numbers
    "gen_b1_per_token_s": lambda m: m["gen_b1_per_token_s"],
    "gen_b1_prefill_s": lambda m: m["gen_b1_prefill_s"],
    # one batch's greedy generation of new_tokens tokens (prefill included): Judge.refusal
    "gen_batch_s": lambda m: m["gen_batch_refusal_s"],
    "gen_batch_prefill_s": lambda m: m["gen_batch_prefill_s"],
    "forward_batch_s": lambda m: (m["forward_batch_kept_s"] + m["forward_batch_general_s"]) / 2,
    "measure_s": lambda m: m["measure_total_s"],
    "peak_rss_gb": lambda m: m["peak_rss_gb"],
}


def costs(q: dict, batch: int, new_tokens: int, prompts: int = PROMPTS) -> dict:
    """The cost of one candidate and of the references with ``prompts`` prompts in each set, from one batch's
    measures ``q``; and with ``--harmful-tokens 16`` (the prefill and 15 decode steps)."""
    batches = math.ceil(prompts / batch)
    step = (q["gen_batch_s"] - q["gen_batch_prefill_s"]) / (new_tokens - 1)
    gen16 = q["gen_batch_prefill_s"] + 15 * step
    return {
        "decode_step_s": step, "decode_per_token_s": step / batch,
        "gen_per_token_s": q["gen_batch_s"] / (batch * new_tokens),
        "candidate_s": batches * (q["gen_batch_s"] + 2 * q["forward_batch_s"]),
        "candidate_measured_s": batches * q["measure_s"],  # Judge.measure itself, adapter load included
        "candidate_harmful_tokens_16_s": batches * (gen16 + 2 * q["forward_batch_s"]),
        "candidate_no_general_s": batches * (q["gen_batch_s"] + q["forward_batch_s"]),
        # Judge.prepare: the fine-tune on --prompts and on --harmful, the aligned model on --harmful and on
        # --general (4 generations); the aligned model's kept and the fine-tune's general (2 forward passes)
        "references_s": batches * (4 * q["gen_batch_s"] + 2 * q["forward_batch_s"]),
    }  # fmt: skip


def summarize(runs: list[dict], new_tokens: int) -> dict:
    result = {}
    for dtype in DTYPES:
        mine = sorted((m for m in runs if m["dtype"] == dtype), key=lambda m: m["layers"])
        if len(mine) < 2:
            continue
        xs, batch = [m["layers"] for m in mine], mine[0]["batch"]
        fits = {k: fit(xs, [f(m) for m in mine]) for k, f in MEASURES.items()}
        by_layers = {str(m["layers"]): costs({k: f(m) for k, f in MEASURES.items()}, batch, new_tokens) for m in mine}
        at_full = {k: a + b * FULL_LAYERS for k, (a, b, _) in fits.items()}
        result[dtype] = {
            "batch": batch, "layers_measured": xs,
            "fit": {k: {"fixed_s": a, "per_layer_s": b, "max_relative_residual": res}
                    for k, (a, b, res) in fits.items()},
            "measured": {str(m["layers"]): {k: f(m) for k, f in MEASURES.items()} for m in mine},
            "costs_measured_depths": by_layers,
            "extrapolated_32_layers": {**at_full, **costs(at_full, batch, new_tokens)},
        }  # fmt: skip
    return result


def hours(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def table(summary: dict, counts: dict, new_tokens: int) -> str:
    lo, hi = counts["first_ladder_meets_target"]
    whole_lo, whole_hi = counts["whole"]
    rows = [
        ("greedy decode, batch 1: s per token", "gen_b1_per_token_s", "{:.3f}"),
        (f"greedy generation, batch: prefill + {new_tokens} tokens, s", "gen_batch_s", "{:.1f}"),
        ("greedy decode, batch: s per step (batch-size tokens)", "decode_step_s", "{:.3f}"),
        ("greedy generation, batch: s per generated token (prefill included)", "gen_per_token_s", "{:.3f}"),
        (f"teacher-forced forward, batch × (prompt + {new_tokens}), s", "forward_batch_s", "{:.1f}"),
        ("peak RSS, GB", "peak_rss_gb", "{:.1f}"),
        (f"one candidate ({PROMPTS} harmful × {new_tokens} tokens, {PROMPTS} + {PROMPTS} forwards)", "candidate_s",
         "h"),
        ("one candidate, --harmful-tokens 16", "candidate_harmful_tokens_16_s", "h"),
        ("one candidate, no --general", "candidate_no_general_s", "h"),
        ("references (4 generations + 2 forward sets)", "references_s", "h"),
        (f"calibration: references + {lo} candidates", None, "h"),
        (f"calibration: references + {hi} candidates", None, "h"),
        (f"calibration: references + {whole_hi} candidates (both ladders, fallback)", None, "h"),
    ]  # fmt: skip
    head = ["measure"]
    cols = []
    for dtype, s in summary.items():
        for layers in s["layers_measured"]:
            head.append(f"{dtype} {layers} L (batch {s['batch']})")
            cols.append((dtype, str(layers)))
        head.append(f"**{dtype} 32 L (batch {s['batch']}), extrapolated**")
        cols.append((dtype, "32"))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, key, fmt in rows:
        cells = []
        for dtype, layers in cols:
            s = summary[dtype]
            values = (s["extrapolated_32_layers"] if layers == "32" else
                      {**s["measured"][layers], **s["costs_measured_depths"][layers]})  # fmt: skip
            if key is None:
                n = int(label.split("+ ")[1].split()[0])
                value = values["references_s"] + n * values["candidate_s"]
            else:
                value = values[key]
            cells.append(hours(value) if fmt == "h" else fmt.format(value))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="1,2,4", help="decoder layers measured in float32 (comma-separated)")
    ap.add_argument("--bf16-layers", default="1,2", help="decoder layers measured in bfloat16 ('' for none)")
    ap.add_argument("--bf16-batch", type=int, default=4, help="batch size in bfloat16 (slow on CPUs without "
                    "AVX512-BF16/AMX; a smaller batch is an upper bound per prompt)")  # fmt: skip
    ap.add_argument("--new-tokens", type=int, default=64, help="generated tokens (the default max_new_tokens)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write the numbers (JSON) here")
    ap.add_argument("--one", nargs=3, metavar=("LAYERS", "DTYPE", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        layers, dtype, batch = int(args.one[0]), args.one[1], int(args.one[2])
        print(json.dumps(one(layers, dtype, batch, args.new_tokens, args.rank, args.threads)))
        return
    plan = [(int(n), "float32", BATCH) for n in args.layers.split(",") if n] + [
        (int(n), "bfloat16", args.bf16_batch) for n in args.bf16_layers.split(",") if n
    ]
    runs, t0 = [], time.perf_counter()
    for layers, dtype, batch in plan:
        cmd = [sys.executable, __file__, "--one", str(layers), dtype, str(batch), "--new-tokens",
               str(args.new_tokens), "--rank", str(args.rank), "--threads", str(args.threads)]  # fmt: skip
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{dtype} {layers} layers, batch {batch}: {time.perf_counter() - t0:.0f} s so far", file=sys.stderr)
    counts = candidates_measured()
    summary = summarize(runs, args.new_tokens)
    print(table(summary, counts, args.new_tokens))
    if args.out:
        import transformers

        document = {
            "command": "python scripts/bench_calibration_cost.py " + " ".join(sys.argv[1:]),
            "machine": {"processor": platform.processor() or platform.machine(), "threads": args.threads,
                        "torch": torch.__version__, "transformers": transformers.__version__,
                        "cpu_capability": torch.backends.cpu.get_cpu_capability()},
            "model": {**SHAPE, "full_layers": FULL_LAYERS, "lora_rank": args.rank, "lora_targets": "all-linear",
                      "prompt_tokens": list(PROMPT_TOKENS), "new_tokens": args.new_tokens},
            "candidates_measured": counts, "runs": runs, "summary": summary,
            "seconds": time.perf_counter() - t0,
        }  # fmt: skip
        args.out.write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
