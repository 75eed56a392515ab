#!/usr/bin/env python
"""Speed and memory of ``csulora sanitize`` against the Safe LoRA reference procedure (a script that prints
measurements, not a test).

Generates a Llama-shaped bf16 sharded base/aligned pair and two r=16 all-linear adapters, then runs, each as
its own process under ``/usr/bin/time -v`` (wall time, peak RSS):

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
      One liberty, in its favour: each ``C`` is freed after use (the original keeps all of them).

Run in that order, with the files in the OS page cache for all four. Prints a Markdown table with the
ratios a/c, b/c, a/d and writes it into BENCHMARKS.md (``--write``) with the machine it ran on.

    python scripts/bench_speed.py --size tiny
    nice -n 10 python scripts/bench_speed.py --size 1b --workdir /tmp/bench --write BENCHMARKS.md
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

SHARD_BYTES = {"tiny": 40_000, "1b": 1 << 30, "7b": 2 << 30}
LADDER = ["0.5", "1", "2", "4", "8", "16", "64", "inf"]  # λ values of the ladder (e), (f)


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


def generate(workdir: Path, size: str) -> dict[str, Path]:
    import torch

    from csulora.synthetic import SIZES, write_adapter, write_pair

    shape = SIZES[size]
    marker = workdir / "generated.json"
    paths = {"base": workdir / "base", "aligned": workdir / "aligned",
             "adapter1": workdir / "adapter-1", "adapter2": workdir / "adapter-2"}  # fmt: skip
    if marker.is_file() and json.loads(marker.read_text()) == {"size": size}:
        return paths
    shutil.rmtree(workdir, ignore_errors=True)
    t = time.perf_counter()
    write_pair(workdir, shape, spectrum="fine-tune", dtype=torch.bfloat16, shard_bytes=SHARD_BYTES[size])
    for i in (1, 2):
        write_adapter(paths[f"adapter{i}"], shape, str(paths["aligned"]), r=16, alpha=32, a_std=None, b_std=0.01,
                      seed=i)  # fmt: skip
    marker.write_text(json.dumps({"size": size}))
    print(f"generated {size} pair and adapters in {time.perf_counter() - t:.0f} s", flush=True)
    return paths


def targeted_shards(paths: dict[str, Path]) -> list[Path]:
    from safetensors import safe_open

    with safe_open(str(paths["adapter1"] / "adapter_model.safetensors"), "pt") as f:
        modules = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in f.keys()}
    shards = []
    for which in ("base", "aligned"):
        weight_map = json.loads((paths[which] / "model.safetensors.index.json").read_text())["weight_map"]
        shards += sorted({paths[which] / weight_map[f"{m}.weight"] for m in modules})
    return shards


def reference(adapter: Path, aligned: Path, base: Path, out: Path, tau: float = 0.5) -> None:
    """The Safe LoRA procedure as the reference code runs it, on CPU, with plain state dicts."""
    import torch
    from safetensors.torch import load_file, save_file

    def load_model(folder: Path) -> dict[str, torch.Tensor]:  # from_pretrained(..., torch_dtype=float32)
        index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        state = {}
        for shard in sorted(set(index.values())):
            state.update({k: v.float() for k, v in load_file(folder / shard).items()})
        return state

    base_model, aligned_model = load_model(base), load_model(aligned)
    lora = {k: v.float() for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    peft_model = {**load_model(aligned), **lora}  # the user's model: its own copy of the aligned weights + LoRA
    projected = copy.deepcopy(peft_model)  # SafeLoRA keeps the original and projects a copy
    modules = sorted({k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in lora})
    projected_count = 0
    for m in modules:
        V = aligned_model[f"{m}.weight"] - base_model[f"{m}.weight"]
        C = torch.mm(V, V.t()) / torch.norm(V)  # d_out × d_out
        A, B = peft_model[f"base_model.model.{m}.lora_A.weight"], peft_model[f"base_model.model.{m}.lora_B.weight"]
        W = torch.mm(C, B)
        fW, ori = torch.mm(W, A), torch.mm(B, A)
        cos = torch.nn.functional.cosine_similarity(fW.reshape(1, -1), ori.reshape(1, -1))
        if cos <= tau:
            projected[f"base_model.model.{m}.lora_B.weight"] = W
            projected_count += 1
        del V, C, W, fW, ori
    out.mkdir(parents=True, exist_ok=True)
    lora_out = {k: v.contiguous() for k, v in projected.items() if ".lora_" in k}
    save_file(lora_out, str(out / "adapter_model.safetensors"))
    print(f"reference: {projected_count} of {len(modules)} modules projected")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "1b", "7b"], default="tiny")
    parser.add_argument("--workdir", type=Path, default=None, help="where the pair is generated (kept for reruns)")
    parser.add_argument("--write", type=Path, default=None, help="insert the table into this Markdown file")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--ladder", type=int, default=8, help="points of the ladder (e), (f); 0 skips them")
    parser.add_argument("--note", default="", help="a line printed under the table (e.g. 'machine shared')")
    parser.add_argument("--reference-run", nargs=4, help=argparse.SUPPRESS)  # adapter aligned base out
    args = parser.parse_args()
    if args.reference_run:
        reference(*map(Path, args.reference_run))
        return
    from csulora.demo import describe
    from csulora.settings import Settings
    from csulora.synthetic import SIZES

    workdir = args.workdir or Path(f"/tmp/csulora-bench-{args.size}")
    paths = generate(workdir, args.size)
    shards = targeted_shards(paths)
    pair_gb = sum(f.stat().st_size for p in ("base", "aligned") for f in paths[p].glob("*.safetensors")) / 1e9
    cache, env = workdir / "cache", {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    shutil.rmtree(cache, ignore_errors=True)
    for out in workdir.glob("out-*"):
        shutil.rmtree(out)
    csulora = [sys.executable, "-m", "csulora", "sanitize", "--aligned", str(paths["aligned"]), "--base",
               str(paths["base"]), "--cache-dir", str(cache), "--quiet"]  # fmt: skip
    load = os.getloadavg()[0]
    rows = {}
    print("(d) read the targeted shards", flush=True)
    rows["d"] = timed(["cat", *map(str, shards)])
    print("(a) sanitize, cold cache", flush=True)
    rows["a"] = timed([*csulora, "--adapter", str(paths["adapter1"]), "-o", str(workdir / "out-cold")], env)
    print("(b) sanitize, warm cache", flush=True)
    rows["b"] = timed([*csulora, "--adapter", str(paths["adapter2"]), "-o", str(workdir / "out-warm")], env)
    if args.ladder:
        lams = ",".join(LADDER[: args.ladder])
        print(f"(e) sweep of {args.ladder} points, cold cache", flush=True)
        sweep = [sys.executable, "-m", "csulora", "sweep", "--adapter", str(paths["adapter1"]), "--aligned",
                 str(paths["aligned"]), "--base", str(paths["base"]), "--cache-dir", str(workdir / "cache-sweep"),
                 "-o", str(workdir / "out-sweep"), "--lambdas", lams, "--force", "--quiet"]  # fmt: skip
        shutil.rmtree(workdir / "cache-sweep", ignore_errors=True)
        rows["e"] = timed(sweep, env)
        print(f"(f) {args.ladder} separate sanitize runs, no cache", flush=True)
        runs = [timed([*csulora, "--no-cache", "--adapter", str(paths["adapter1"]), "--lambda", lam, "-o",
                       str(workdir / f"out-ladder-{i}")], env) for i, lam in enumerate(lams.split(","))]  # fmt: skip
        rows["f"] = {"wall_s": sum(r["wall_s"] for r in runs), "rss_mb": max(r["rss_mb"] for r in runs)}
    report = json.loads((workdir / "out-cold" / "csulora_report.json").read_text())
    ks = sorted(m["k"] for m in report["modules"])
    need_gb = 4 * pair_gb  # four float32 copies of a bf16 model (base, aligned, PEFT model, deep copy)
    if args.skip_reference or mem_available_gb() < need_gb + 1.5:
        free = mem_available_gb()
        reason = "skipped" if args.skip_reference else f"skipped: needs ≈{need_gb:.0f} GB, {free:.0f} free"
        rows["c"] = None
        print(f"(c) reference {reason}", flush=True)
    else:
        print("(c) Safe LoRA reference procedure", flush=True)
        rows["c"] = timed([sys.executable, __file__, "--reference-run", str(paths["adapter1"]), str(paths["aligned"]),
                           str(paths["base"]), str(workdir / "out-reference")], env)  # fmt: skip

    def ratio(x: str, y: str, key: str) -> str:
        return f"{rows[x][key] / rows[y][key]:.2f}" if rows.get(x) and rows.get(y) and rows[y][key] > 0 else "–"

    shape = SIZES[args.size]
    names = {"a": "(a) csulora sanitize, cold cache", "b": "(b) csulora sanitize, warm cache (2nd adapter)",
             "c": "(c) Safe LoRA reference procedure", "d": "(d) read targeted shards (`cat`)",
             "e": f"(e) csulora sweep, {args.ladder} points (λ ladder), cold cache, one process",
             "f": f"(f) {args.ladder} separate csulora sanitize runs (same λ), no cache: sum"}  # fmt: skip
    lines = [
        f"### {args.size}: hidden {shape.hidden}, intermediate {shape.intermediate}, {shape.layers} layers "
        f"(pair {pair_gb:.2f} GB bf16 on disk, {len(shards)} shards read, r=16 all-linear, "
        f"{len(report['modules'])} modules, {describe(Settings())}, subspace k min/median/max "
        f"{ks[0]}/{ks[len(ks) // 2]}/{ks[-1]})",
        "",
        f"Machine: {machine()}. Load average at start: {load:.1f}. {args.note}".rstrip(),
        "",
        "| run | wall (s) | peak RSS (MB) |",
        "|---|---:|---:|",
        *(f"| {names[k]} | {rows[k]['wall_s']:.2f} | {rows[k]['rss_mb']:.0f} |" if rows[k]
          else f"| {names[k]} | – | – |" for k in "abcdef" if k in rows),  # fmt: skip
        "",
        f"Ratios: a/c time {ratio('a', 'c', 'wall_s')}, memory {ratio('a', 'c', 'rss_mb')}; "
        f"b/c time {ratio('b', 'c', 'wall_s')}, memory {ratio('b', 'c', 'rss_mb')}; "
        f"a/d time {ratio('a', 'd', 'wall_s')}"
        + (f"; ladder e/f time {ratio('e', 'f', 'wall_s')}, e against a + {args.ladder - 1}·b: "
           f"{rows['e']['wall_s']:.1f} s vs {rows['a']['wall_s'] + (args.ladder - 1) * rows['b']['wall_s']:.1f} s"
           if "e" in rows else "") + ".",
    ]
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    if args.write:
        write_section(args.write, args.size, table)


def write_section(path: Path, size: str, table: str) -> None:
    """Replace (or append) this size's section between markers, leaving the rest of the file as it is."""
    begin, end = f"<!-- bench_speed {size} -->", f"<!-- /bench_speed {size} -->"
    text = path.read_text() if path.is_file() else "# Benchmarks\n\nWritten by `scripts/bench_speed.py`.\n"
    block = f"{begin}\n{table}{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
