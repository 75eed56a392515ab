#!/usr/bin/env python
"""Speed and memory of ``csulora sanitize`` against the Safe LoRA reference procedure (a script that prints
measurements, not a test).

Generates a bf16 sharded base/aligned pair (Llama-shaped, or Mixtral-shaped with fused 3-D expert stacks for
``--size moe``), two r=16 adapters on every weight of the blocks, and a full fine-tune of the aligned
checkpoint (every tensor moved, same shards and index), then runs, each as its own process under
``/usr/bin/time -v`` (wall time, peak RSS):

Adapters:
  (d) read: ``cat`` of the shards holding the targeted tensors, both checkpoints (the I/O floor);
  (a) cold: ``csulora sanitize`` of adapter 1 with an empty subspace cache;
  (b) warm: ``csulora sanitize`` of adapter 2 with the cache (a) left;
  (e) ladder: ``csulora sweep`` of adapter 1 over N λ values (default 8) of the default method, cold cache, one
      process: the subspaces are computed once for the ladder;
  (f) the same N settings as N separate ``csulora sanitize`` processes without a cache (what a ladder costs
      without sweep): summed wall time, largest peak RSS;
  (c) reference: a faithful CPU re-implementation of the Safe LoRA procedure (IBM's code): base and aligned
      loaded whole in float32, the user's PEFT model (aligned weights + LoRA, float32) and its deep copy in
      memory, dense ``C = V Vᵀ / ‖V‖_F`` per module, the score from dense products, ``B ← C B`` under τ.
      One liberty, in its favour: each ``C`` is freed after use (the original keeps all of them). On expert
      LoRA (PEFT ``target_parameters``), which the original does not read, the same per expert slice.
Full fine-tune (``sanitize --model``):
  (h) copy: ``cp -r`` of the model's shard files to a new folder, then ``sync`` of the copies (csulora fsyncs
      what it writes);
  (g) ``csulora sanitize --model`` with an empty subspace cache (every weight of the blocks corrected as a
      dense update ``ΔW = W − W_aligned``, experts one slice at a time, the rest copied);
  (i) reference, full parameters (IBM/SafeLoRA issues #2, #4): base, aligned and fine-tuned models loaded
      whole in float32; per weight of the blocks (per expert slice of a stack) ``C = D Dᵀ/‖D‖_F``
      (``d_out × d_out``) applied to ``ΔW = W_ft − W_aligned`` when ``cos(C ΔW, ΔW) ≤ τ``, writing
      ``W_aligned + C ΔW``; saved shard by shard in the model's dtype (no fsync: in its favour).

Run in that order (d a b e f c h g i). By default the files are in the OS page cache as far as RAM holds them
(each checkpoint was just written, and (d), (h) read theirs first); ``--drop-caches`` drops the page cache
before every run (root only) to measure cold from disk. ``--rows`` picks rows. Prints Markdown tables with the
ratios a/c, b/c, a/d, the ladder's, g against a + 3·h, g/i, and writes them into BENCHMARKS.md (``--write``)
with the machine it ran on: one section per size for the adapter rows, one for the full fine-tune rows.

    python scripts/bench_speed.py --size tiny
    python scripts/bench_speed.py --size moe-tiny --rows g,h,i
    nice -n 10 python scripts/bench_speed.py --size 1b --workdir /tmp/bench --write BENCHMARKS.md
    nice -n 10 python scripts/bench_speed.py --packs --size 1b --throughput 100 --write BENCHMARKS.md

``--packs`` measures subspace packs instead (``scripts/bench_packs.py``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARD_BYTES = {"tiny": 40_000, "moe-tiny": 100_000, "1b": 1 << 30, "moe": 1 << 30, "7b": 2 << 30}
LADDER = ["0.5", "1", "2", "4", "8", "16", "64", "inf"]  # λ values of the ladder (e), (f)
ADAPTER_ROWS, MODEL_ROWS = "abcdef", "ghi"
ORDER = "dabefchgi"  # the order rows run in
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def timed(cmd: list[str], env: dict | None = None, stdout=subprocess.DEVNULL) -> dict:
    """Run ``cmd`` under ``/usr/bin/time -v``; wall seconds and peak RSS (MB) of the process tree's largest."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], env={**os.environ, **(env or {})}, stdout=stdout,
                          stderr=subprocess.PIPE, text=True)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr)[1]
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)[1])
    return {"wall_s": seconds, "rss_mb": rss_kb / 1024}


def drop_page_cache() -> str | None:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``: None when done, else why not (it needs root)."""
    os.sync()
    try:
        DROP_CACHES.write_text("3\n")
    except OSError as e:
        return f"{DROP_CACHES}: {e.strerror or e}; it needs root"
    return None


def generate(workdir: Path, size: str, model: bool) -> dict[str, Path]:
    """The pair and two adapters (kept for reruns of the same size), and with ``model`` the full fine-tune."""
    import torch

    from csulora.synthetic import SIZES, write_adapter, write_full_fine_tune, write_pair

    shape = SIZES[size]
    marker, model_marker = workdir / "generated.json", workdir / "generated-model.json"
    paths = {"base": workdir / "base", "aligned": workdir / "aligned", "model": workdir / "fine-tuned",
             "adapter1": workdir / "adapter-1", "adapter2": workdir / "adapter-2"}  # fmt: skip
    if not (marker.is_file() and json.loads(marker.read_text()) == {"size": size}):
        shutil.rmtree(workdir, ignore_errors=True)
        t = time.perf_counter()
        write_pair(workdir, shape, spectrum="fine-tune", dtype=torch.bfloat16, shard_bytes=SHARD_BYTES[size])
        for i in (1, 2):
            write_adapter(paths[f"adapter{i}"], shape, str(paths["aligned"]), r=16, alpha=32, a_std=None,
                          b_std=0.01, seed=i)  # fmt: skip
        marker.write_text(json.dumps({"size": size}))
        print(f"generated {size} pair and adapters in {time.perf_counter() - t:.0f} s", flush=True)
    if model and not (model_marker.is_file() and json.loads(model_marker.read_text()) == {"size": size}):
        shutil.rmtree(paths["model"], ignore_errors=True)
        t = time.perf_counter()
        write_full_fine_tune(paths["aligned"], paths["model"], seed=3)
        model_marker.write_text(json.dumps({"size": size}))
        print(f"generated {size} full fine-tune in {time.perf_counter() - t:.0f} s", flush=True)
    return paths


def adapter_modules(adapter: Path) -> dict[str, str]:
    """The path each factor pair of an adapter is saved under → the module it adapts (``….experts.base_layer``
    → ``….experts``: PEFT's nested wrappers of parameters on one module)."""
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        prefixes = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in f.keys()}
    return {p: re.sub(r"(\.base_layer)+$", "", p) for p in sorted(prefixes)}


def targeted_shards(paths: dict[str, Path]) -> list[Path]:
    modules = set(adapter_modules(paths["adapter1"]).values())
    shards = []
    for which in ("base", "aligned"):
        weight_map = json.loads((paths[which] / "model.safetensors.index.json").read_text())["weight_map"]
        shards += sorted({paths[which] / f for k, f in weight_map.items() if k.rpartition(".")[0] in modules})
    return shards


def load_model(folder: Path, dtypes: dict | None = None) -> dict:
    """Every tensor of a sharded checkpoint in float32 (``from_pretrained(..., torch_dtype=float32)``);
    ``dtypes`` receives each one's stored dtype."""
    from safetensors.torch import load_file

    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    state = {}
    for shard in sorted(set(index.values())):
        for k, v in load_file(folder / shard).items():
            if dtypes is not None:
                dtypes[k] = v.dtype
            state[k] = v.float()
    return state


def _stack_of(module: str, A, B, aligned_model: dict) -> str:
    """The expert stack of ``module`` that factors ``A`` ``(r·E, d_in)``, ``B`` ``(d_out, r·E)`` adapt, by shape."""
    found = [k for k, W in aligned_model.items() if k.rpartition(".")[0] == module and W.ndim == 3
             and tuple(W.shape[1:]) == (B.shape[0], A.shape[1]) and A.shape[0] % W.shape[0] == 0]  # fmt: skip
    if len(found) != 1:
        raise SystemExit(f"reference: cannot tell which stack of {module} the factors adapt: {found}")
    return found[0]


def reference(adapter: Path, aligned: Path, base: Path, out: Path, tau: float = 0.5) -> None:
    """The Safe LoRA procedure as the reference code runs it, on CPU, with plain state dicts."""
    import torch
    from safetensors.torch import load_file, save_file

    base_model, aligned_model = load_model(base), load_model(aligned)
    lora = {k: v.float() for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    peft_model = {**load_model(aligned), **lora}  # the user's model: its own copy of the aligned weights + LoRA
    projected = copy.deepcopy(peft_model)  # SafeLoRA keeps the original and projects a copy
    projected_count, total = 0, 0
    for prefix, module in adapter_modules(adapter).items():
        A, B = (peft_model[f"base_model.model.{prefix}.lora_{x}.weight"] for x in "AB")
        if f"{module}.weight" in aligned_model and prefix == module:  # a linear layer, or a 2-D parameter
            key, experts = f"{module}.weight", [None]
        else:  # an expert stack (E, d_out, d_in): expert e is A[e·r:(e+1)·r], B[:, e::E]
            key = _stack_of(module, A, B, aligned_model)
            experts = list(range(aligned_model[key].shape[0]))
        E = len(experts)
        r = A.shape[0] // E
        for e in experts:
            V = aligned_model[key] - base_model[key] if e is None else aligned_model[key][e] - base_model[key][e]
            C = torch.mm(V, V.t()) / torch.norm(V)  # d_out × d_out
            Ae, Be = (A, B) if e is None else (A[e * r : (e + 1) * r], B[:, e::E])
            W = torch.mm(C, Be)
            fW, ori = torch.mm(W, Ae), torch.mm(Be, Ae)
            cos = torch.nn.functional.cosine_similarity(fW.reshape(1, -1), ori.reshape(1, -1))
            total += 1
            if cos <= tau:
                name = f"base_model.model.{prefix}.lora_B.weight"
                if e is None:
                    projected[name] = W
                else:
                    projected[name][:, e::E] = W
                projected_count += 1
            del V, C, W, fW, ori
    out.mkdir(parents=True, exist_ok=True)
    lora_out = {k: v.contiguous() for k, v in projected.items() if ".lora_" in k}
    save_file(lora_out, str(out / "adapter_model.safetensors"))
    print(f"reference: {projected_count} of {total} modules projected")


def reference_model(model: Path, aligned: Path, base: Path, out: Path, tau: float = 0.5) -> None:
    """The Safe LoRA procedure on a full fine-tune as its authors describe it (IBM/SafeLoRA issues #2, #4), on
    CPU, with plain state dicts: the three models whole in float32, ``W_a + C ΔW`` per weight under τ. The same
    weights as ``sanitize --model`` (every 2-D or 3-D weight of the blocks; a stack one expert at a time)."""
    import torch
    from safetensors.torch import save_file

    from csulora.io.layouts import is_block_weight

    base_model, aligned_model = load_model(base), load_model(aligned)
    dtypes: dict = {}
    fine_tuned = load_model(model, dtypes)
    projected_count, total = 0, 0
    for key in sorted(fine_tuned):
        W = fine_tuned[key]
        if W.ndim not in (2, 3) or not is_block_weight(key):
            continue
        for e in [None] if W.ndim == 2 else range(W.shape[0]):
            W_ft, W_a, W_b = (t if e is None else t[e] for t in (W, aligned_model[key], base_model[key]))
            V = W_a - W_b
            C = torch.mm(V, V.t()) / torch.norm(V)  # d_out × d_out
            dW = W_ft - W_a
            CdW = torch.mm(C, dW)
            cos = torch.nn.functional.cosine_similarity(CdW.reshape(1, -1), dW.reshape(1, -1))
            total += 1
            if cos <= tau:
                W_ft.copy_(W_a + CdW)  # in place: the fine-tuned model's weight
                projected_count += 1
            del V, C, dW, CdW
    # save_pretrained: the model's shards, in its dtype, one shard at a time
    out.mkdir(parents=True, exist_ok=True)
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in sorted(set(index.values())):
        tensors = {k: fine_tuned[k].to(dtypes[k]).contiguous() for k, f in index.items() if f == shard}
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
    for name in ("model.safetensors.index.json", "config.json"):
        shutil.copyfile(model / name, out / name)
    print(f"reference (full parameters): {projected_count} of {total} weights projected")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[1]) / 2**20
    import torch

    threads = torch.get_num_threads()
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__} ({threads} threads)")  # fmt: skip


def mem_available_gb() -> float:
    return int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text())[1]) / 2**20


def folder_gb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9


def parse_rows(text: str) -> str:
    rows = "".join(sorted(set(text.replace(",", "").replace(" ", "").lower())))
    if not rows or set(rows) - set(ADAPTER_ROWS + MODEL_ROWS):
        raise SystemExit(f"--rows {text!r}: letters among {ADAPTER_ROWS + MODEL_ROWS} (e.g. a,g,h,i)")
    if "b" in rows and "a" not in rows:
        raise SystemExit("--rows: (b) uses the cache (a) leaves; add a")
    return rows


def describe_shape(size: str) -> tuple[str, str]:
    """The shape in words, and what the adapters adapt."""
    from csulora.synthetic import SIZES, MoeShape

    s = SIZES[size]
    if isinstance(s, MoeShape):
        return (f"hidden {s.hidden}, {s.layers} layers, {s.experts} experts of intermediate {s.intermediate} "
                f"(fused 3-D stacks) and a router per layer",
                "r=16 on attention, router and both expert stacks")  # fmt: skip
    return f"hidden {s.hidden}, intermediate {s.intermediate}, {s.layers} layers", "r=16 all-linear"


def k_range(report: dict) -> str:
    ks = sorted(m["k"] for m in report["modules"])
    return f"{ks[0]}/{ks[len(ks) // 2]}/{ks[-1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "moe-tiny", "1b", "moe", "7b"], default="tiny")
    parser.add_argument("--workdir", type=Path, default=None, help="where the pair is generated (kept for reruns)")
    parser.add_argument("--write", type=Path, default=None,
                        help="insert the tables into this Markdown file: the section of each row group (adapter "
                             "rows a–f; full fine-tune rows g–i) whose rows were all run")  # fmt: skip
    parser.add_argument("--rows", default=ADAPTER_ROWS + MODEL_ROWS,
                        help="rows to run, e.g. g,h,i (full fine-tune only) or a,g,h,i (with the bound's (a)); "
                             "default all")  # fmt: skip
    parser.add_argument("--skip-reference", action="store_true", help="skip (c) and (i)")
    parser.add_argument("--ladder", type=int, default=8, help="points of the ladder (e), (f); 0 skips them")
    parser.add_argument("--drop-caches", action="store_true",
                        help="drop the OS page cache before every run (sync; echo 3 > /proc/sys/vm/drop_caches; "
                             "root only): every input read cold from disk")  # fmt: skip
    parser.add_argument("--note", default="", help="a line printed under the table (e.g. 'machine shared')")
    parser.add_argument("--packs", action="store_true",
                        help="instead of the rows: subspace packs (scripts/bench_packs.py): sizes, audit/sanitize "
                             "from a pack against the checkpoints, and --throughput")  # fmt: skip
    parser.add_argument("--throughput", type=int, default=0, help="--packs: audit this many adapters from the pack")
    parser.add_argument("--runs", type=int, default=3, help="--packs: farm-bench runs per row (median quoted)")
    parser.add_argument("--pack-rules", default="k8,energy", help="--packs: the packs to build (k8, energy)")
    parser.add_argument("--checkpoint-runs", type=int, help="--packs: runs of the checkpoint rows (default --runs)")
    parser.add_argument("--reference-run", nargs=4, help=argparse.SUPPRESS)  # adapter aligned base out
    parser.add_argument("--reference-model-run", nargs=4, help=argparse.SUPPRESS)  # model aligned base out
    args = parser.parse_args()
    if args.reference_run:
        reference(*map(Path, args.reference_run))
        return
    if args.reference_model_run:
        reference_model(*map(Path, args.reference_model_run))
        return
    from csulora.demo import describe
    from csulora.settings import Settings

    if args.packs:
        from bench_packs import run_packs, table

        workdir = args.workdir or Path(f"/tmp/csulora-bench-{args.size}")
        load = f"Load average at start: {os.getloadavg()[0]:.1f}. {args.note}".strip()
        found = run_packs(args.size, workdir, generate(workdir, args.size, model=False), args.runs, args.throughput,
                          tuple(args.pack_rules.split(",")), args.checkpoint_runs)  # fmt: skip
        (workdir / "packs.json").write_text(json.dumps(found, indent=1))
        text = table(found, machine(), load)
        print(text)
        if args.write:
            write_section(args.write, f"{args.size} packs", text)
        return
    wanted = parse_rows(args.rows)
    if not args.ladder:
        wanted = wanted.replace("e", "").replace("f", "")
    workdir = args.workdir or Path(f"/tmp/csulora-bench-{args.size}")
    paths = generate(workdir, args.size, model=bool(set(wanted) & set(MODEL_ROWS)))
    shards = targeted_shards(paths)
    pair_gb = folder_gb(paths["base"]) + folder_gb(paths["aligned"])
    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    for out in [*workdir.glob("out-*"), *workdir.glob("cache*")]:
        shutil.rmtree(out)
    cache = workdir / "cache"
    csulora = [sys.executable, "-m", "csulora", "sanitize", "--aligned", str(paths["aligned"]), "--base",
               str(paths["base"]), "--quiet"]  # fmt: skip
    drop_failed: list[str] = []

    def run(cmd: list[str]) -> dict:
        if args.drop_caches and not drop_failed:
            reason = drop_page_cache()
            if reason:
                drop_failed.append(reason)
                print(f"NOTE: could not drop the page cache ({reason}); the runs read from the page cache where "
                      "the files fit", flush=True)  # fmt: skip
        return timed(cmd, env)

    load = os.getloadavg()[0]
    rows: dict[str, dict | None] = {}
    reports: dict[str, dict] = {}
    for row in (r for r in ORDER if r in wanted):
        if row == "d":
            print("(d) read the targeted shards", flush=True)
            rows["d"] = run(["cat", *map(str, shards)])
        elif row == "a":
            print("(a) sanitize, cold cache", flush=True)
            rows["a"] = run([*csulora, "--cache-dir", str(cache), "--adapter", str(paths["adapter1"]), "-o",
                             str(workdir / "out-cold")])  # fmt: skip
            reports["a"] = json.loads((workdir / "out-cold" / "csulora_report.json").read_text())
        elif row == "b":
            print("(b) sanitize, warm cache", flush=True)
            rows["b"] = run([*csulora, "--cache-dir", str(cache), "--adapter", str(paths["adapter2"]), "-o",
                             str(workdir / "out-warm")])  # fmt: skip
        elif row == "e":
            lams = ",".join(LADDER[: args.ladder])
            print(f"(e) sweep of {args.ladder} points, cold cache", flush=True)
            rows["e"] = run([sys.executable, "-m", "csulora", "sweep", "--adapter", str(paths["adapter1"]),
                             "--aligned", str(paths["aligned"]), "--base", str(paths["base"]), "--cache-dir",
                             str(workdir / "cache-sweep"), "-o", str(workdir / "out-sweep"), "--lambdas", lams,
                             "--force", "--quiet"])  # fmt: skip
        elif row == "f":
            lams = LADDER[: args.ladder]
            print(f"(f) {args.ladder} separate sanitize runs, no cache", flush=True)
            runs = [run([*csulora, "--no-cache", "--adapter", str(paths["adapter1"]), "--lambda", lam, "-o",
                         str(workdir / f"out-ladder-{i}")]) for i, lam in enumerate(lams)]  # fmt: skip
            rows["f"] = {"wall_s": sum(r["wall_s"] for r in runs), "rss_mb": max(r["rss_mb"] for r in runs)}
        elif row == "c":
            need_gb = 4 * pair_gb  # four float32 copies of a bf16 model (base, aligned, PEFT model, deep copy)
            cmd = [sys.executable, __file__, "--reference-run", str(paths["adapter1"]), str(paths["aligned"]),
                   str(paths["base"]), str(workdir / "out-reference")]  # fmt: skip
            rows["c"] = reference_row("(c) reference", args.skip_reference, need_gb, run, cmd)
        elif row == "h":
            print("(h) copy the model's shards (cp -r, sync)", flush=True)
            dest = workdir / "out-copy"
            dest.mkdir()
            files = [str(f) for f in sorted(paths["model"].glob("*.safetensors"))]
            rows["h"] = run(["sh", "-c", 'dest=$1; shift; cp -r "$@" "$dest"/ && sync "$dest"/*', "cp",
                             str(dest), *files])  # fmt: skip
            shutil.rmtree(dest)
        elif row == "g":
            print("(g) sanitize --model (full fine-tune), cold cache", flush=True)
            out = workdir / "out-model"
            rows["g"] = run([*csulora, "--cache-dir", str(workdir / "cache-model"), "--model", str(paths["model"]),
                             "-o", str(out)])  # fmt: skip
            reports["g"] = json.loads((out / "csulora_report.json").read_text())
            shutil.rmtree(out)  # as large as the model
        elif row == "i":
            need_gb = 3 * (folder_gb(paths["model"]) * 2) + 2 * SHARD_BYTES[args.size] / 1e9  # 3 models in fp32
            out = workdir / "out-model-reference"
            cmd = [sys.executable, __file__, "--reference-model-run", str(paths["model"]), str(paths["aligned"]),
                   str(paths["base"]), str(out)]  # fmt: skip
            rows["i"] = reference_row("(i) reference, full parameters", args.skip_reference, need_gb, run, cmd)
            shutil.rmtree(out, ignore_errors=True)

    cache_words = ("page cache dropped before every run (inputs read from disk)" if args.drop_caches and not
                   drop_failed else f"page cache not dropped ({drop_failed[0]})" if drop_failed else
                   "page cache not dropped (inputs in it as far as RAM holds them)")  # fmt: skip
    header = f"Machine: {machine()}. Load average at start: {load:.1f}. {cache_words}. {args.note}".rstrip()
    shape_words, adapter_words = describe_shape(args.size)
    settings_words = describe(Settings())
    sections = []
    # runs cold from disk get sections of their own beside the page-cache ones (both kept in BENCHMARKS.md)
    key = f"{args.size} disk" if args.drop_caches and not drop_failed else args.size
    disk = ", cold from disk" if key.endswith(" disk") else ""
    if set(wanted) & set(ADAPTER_ROWS) - {"a"} or wanted == "a":
        k = f", subspace k min/median/max {k_range(reports['a'])}" if "a" in reports else ""
        n = f"{len(reports['a']['modules'])} modules, " if "a" in reports else ""
        title = (f"### {args.size}{disk}: {shape_words} (pair {pair_gb:.2f} GB bf16 on disk, {len(shards)} shards "
                 f"read, {adapter_words}, {n}{settings_words}{k})")  # fmt: skip
        sections.append((key, adapter_table(title, header, rows, args.ladder)))
    if set(wanted) & set(MODEL_ROWS):
        model_gb = folder_gb(paths["model"])
        n_shards = len(list(paths["model"].glob("*.safetensors")))
        k = f", {len(reports['g']['modules'])} modules, subspace k min/median/max {k_range(reports['g'])}" \
            if "g" in reports else ""  # fmt: skip
        title = (f"### {args.size} full fine-tune{disk}: {shape_words} (model {model_gb:.2f} GB bf16 in {n_shards} "
                 f"shards, every tensor moved; {settings_words}{k})")  # fmt: skip
        sections.append((f"{key} full", model_table(title, header, rows)))
    complete = {key: set(ADAPTER_ROWS if args.ladder else ADAPTER_ROWS.replace("e", "").replace("f", "")),
                f"{key} full": set(MODEL_ROWS)}  # fmt: skip
    for name, table in sections:
        print("\n" + table)
        if args.write and complete[name] <= set(wanted):
            write_section(args.write, name, table)
        elif args.write:
            missing = ", ".join(sorted(complete[name] - set(wanted)))
            print(f"section '{name}' not written to {args.write}: rows {missing} were not run (a partial table "
                  "would replace the complete one)")  # fmt: skip


def reference_row(label: str, skip: bool, need_gb: float, run, cmd: list[str]) -> dict | None:
    """``run(cmd)``, or None with the reason printed when skipped or when ``need_gb`` would not fit."""
    free = mem_available_gb()
    if skip or free < need_gb + 1.5:
        print(f"{label} skipped" + ("" if skip else f": needs ≈{need_gb:.0f} GB, {free:.0f} free"), flush=True)
        return None
    print(label, flush=True)
    return run(cmd)


def ratio(rows: dict, x: str, y: str, key: str) -> str:
    return f"{rows[x][key] / rows[y][key]:.2f}" if rows.get(x) and rows.get(y) and rows[y][key] > 0 else "–"


def table_rows(rows: dict, names: dict[str, str], order: str) -> list[str]:
    return [f"| {names[k]} | {rows[k]['wall_s']:.2f} | {rows[k]['rss_mb']:.0f} |" if rows[k]
            else f"| {names[k]} | – | – |" for k in order if k in rows]  # fmt: skip


def adapter_table(title: str, header: str, rows: dict, ladder: int) -> str:
    names = {"a": "(a) csulora sanitize, cold cache", "b": "(b) csulora sanitize, warm cache (2nd adapter)",
             "c": "(c) Safe LoRA reference procedure", "d": "(d) read targeted shards (`cat`)",
             "e": f"(e) csulora sweep, {ladder} points (λ ladder), cold cache, one process",
             "f": f"(f) {ladder} separate csulora sanitize runs (same λ), no cache: sum"}  # fmt: skip
    ratios = [f"a/c time {ratio(rows, 'a', 'c', 'wall_s')}, memory {ratio(rows, 'a', 'c', 'rss_mb')}",
              f"b/c time {ratio(rows, 'b', 'c', 'wall_s')}, memory {ratio(rows, 'b', 'c', 'rss_mb')}",
              f"a/d time {ratio(rows, 'a', 'd', 'wall_s')}"]  # fmt: skip
    if rows.get("e") and rows.get("f"):
        ratios.append(f"ladder e/f time {ratio(rows, 'e', 'f', 'wall_s')}"
                      + (f", e against a + {ladder - 1}·b: {rows['e']['wall_s']:.1f} s vs "
                         f"{rows['a']['wall_s'] + (ladder - 1) * rows['b']['wall_s']:.1f} s"
                         if rows.get("a") and rows.get("b") else ""))  # fmt: skip
    lines = [title, "", header, "", "| run | wall (s) | peak RSS (MB) |", "|---|---:|---:|",
             *table_rows(rows, names, "abcdef"), "", f"Ratios: {'; '.join(ratios)}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def model_table(title: str, header: str, rows: dict) -> str:
    names = {"g": "(g) csulora sanitize --model, cold cache", "h": "(h) copy the model's shards (`cp -r`, `sync`)",
             "i": "(i) Safe LoRA reference procedure, full parameters"}  # fmt: skip
    g, a, h = rows.get("g"), rows.get("a"), rows.get("h")
    if g and a and h:
        bound = a["wall_s"] + 3 * h["wall_s"]
        verdict = "met" if g["wall_s"] <= bound else "not met"
        bound_words = (f"the issue's bound g ≤ a + 3·h, with a this run's cold adapter sanitize (row (a)): "
                       f"{g['wall_s']:.1f} s vs {a['wall_s']:.1f} + 3 × {h['wall_s']:.1f} = {bound:.1f} s ({verdict})")
    else:
        bound_words = "the issue's bound g ≤ a + 3·h: – (needs rows a, g and h in one run)"
    lines = [title, "", header, "", "| run | wall (s) | peak RSS (MB) |", "|---|---:|---:|",
             *table_rows(rows, names, "hgi"), "",
             f"Ratios: {bound_words}; g/h time {ratio(rows, 'g', 'h', 'wall_s')}; "
             f"g/i time {ratio(rows, 'g', 'i', 'wall_s')}, memory {ratio(rows, 'g', 'i', 'rss_mb')}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_section(path: Path, name: str, table: str) -> None:
    """Replace this section between markers, or insert it after the last section this script wrote (at the end
    if none), leaving the rest of the file as it is."""
    begin, end = f"<!-- bench_speed {name} -->", f"<!-- /bench_speed {name} -->"
    text = path.read_text() if path.is_file() else "# Benchmarks\n\nWritten by `scripts/bench_speed.py`.\n"
    block = f"{begin}\n{table}{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    elif f"<!-- bench_speed {name} full -->" in text:  # a size's adapter section before its full fine-tune one
        at = text.index(f"<!-- bench_speed {name} full -->")
        text = text[:at] + block + "\n\n" + text[at:]
    elif "<!-- /bench_speed " in text:
        last = text.index("-->", text.rindex("<!-- /bench_speed ")) + len("-->")
        text = text[:last] + "\n\n" + block + text[last:]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
