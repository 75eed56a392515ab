"""Subspace packs (DESIGN.md §11, docs/packs.md): size, and audit/sanitize from a pack against from the
checkpoints; the audit throughput of a folder of adapters from a pack. Run through ``bench_speed.py --packs``.

On the pair ``bench_speed.generate`` makes for ``--size`` (bf16, sharded, two r = 16 adapters):
  pack sizes: ``csulora subspace -o`` at k = 8 and at the energy rule η = 0.5 (cap 256), no cache;
  rows: ``audit`` and ``sanitize`` of adapter 1 from the checkpoints (no cache: what a fresh CI runner does)
  and from the k = 8 pack. Wall time: the median of ``farm-bench`` runs (the whole process, torch import
  included); peak RSS: ``/usr/bin/time -v``; bytes read: ``rchar`` of ``/proc/self/io`` at exit (csulora reads
  with plain ``read`` calls, no memory map, so this counts every byte it read, page cache or disk);
  throughput (``--throughput N``): N synthetic rank-16 all-linear adapters (bf16) audited in one process from
  the pack, through the API: adapters per minute, and the time spent reading (adapter, manifest, headers) against
  computing (entries read and the decomposition), as ``api.audit`` times its phases; plus the same folder as one
  ``csulora audit`` command line (wall time, one run).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Runs csulora in this process and prints the bytes it read (rchar of /proc/self/io) after its imports, at exit
# (typer ends with SystemExit): the files csulora reads, not Python's and torch's own.
IO_WRAPPER = ("import atexit, sys; from csulora.cli import main\n"
              "def rchar(): return int(open('/proc/self/io').read().split('rchar: ')[1].split()[0])\n"
              "start = rchar(); atexit.register(lambda: sys.stderr.write(f'\\nrchar: {rchar() - start}\\n'))\n"
              "sys.argv = ['csulora', *sys.argv[1:]]; main()")


def measured(cmd: list[str], env: dict, runs: int) -> dict:
    """Median wall seconds over ``runs`` farm-bench runs; peak RSS (MB) and bytes read from one more run."""
    bench = subprocess.run(["farm-bench", "-n", str(runs), "--warmup", "0", "--timeout", "3000", "--",
                            "env", *(f"{k}={v}" for k, v in env.items()), *cmd],
                           capture_output=True, text=True)  # fmt: skip
    wall = re.search(r"A wall s\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", bench.stdout + bench.stderr)
    median = float(wall[2]) if wall else None
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", IO_WRAPPER, *cmd[3:]],
                          env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)  # fmt: skip
    if proc.returncode not in (0, 1):
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)[1]) / 1024
    rchar = int(re.search(r"rchar: (\d+)", proc.stderr)[1])
    one = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr)[1]
    one_s = sum(float(x) * 60**i for i, x in enumerate(reversed(one.split(":"))))
    return {"wall_s": median if median is not None else one_s, "rss_mb": rss, "read_mb": rchar / 1e6,
            "spread": f"{wall[1]}–{wall[3]}" if wall else "one run"}  # fmt: skip


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 1e6


RULES = {"k8": ["--subspace-rank", "8"], "energy": ["--subspace-energy", "0.5"]}


def run_packs(size: str, workdir: Path, paths: dict, runs: int, throughput: int,
              rules: tuple[str, ...] = ("k8", "energy"), checkpoint_runs: int | None = None) -> dict:  # fmt: skip
    """``rules``: the packs to build (k8 always: the rows run from it); ``checkpoint_runs``: runs of the rows from
    the checkpoints (default ``runs``; at 7B each is minutes)."""
    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "CSULORA_CACHE": str(workdir / "cache-unused")}
    cli = [sys.executable, "-m", "csulora"]
    pair = ["--aligned", str(paths["aligned"]), "--base", str(paths["base"])]
    results: dict = {"size": size, "packs": {}, "rows": {}}
    ckpt_mb = sum(f.stat().st_size for which in ("aligned", "base") for f in paths[which].glob("*.safetensors")) / 1e6
    results["pair_mb"] = ckpt_mb
    for name, rule in ((n, RULES[n]) for n in ("k8", *(r for r in rules if r != "k8"))):
        out = workdir / f"pack-{name}"
        t = time.perf_counter()
        subprocess.run([*cli, "subspace", *pair, *rule, "-o", str(out), "--force", "--no-cache", "-q"], check=True,
                       env={**os.environ, **env}, stdout=subprocess.DEVNULL)  # fmt: skip
        manifest = json.loads((out / "csulora_subspace.json").read_text())
        ks = sorted(m["k"] for m in manifest["modules"])
        results["packs"][name] = {"mb": folder_mb(out), "build_s": time.perf_counter() - t,
                                  "modules": len(ks), "k": f"{ks[0]}/{ks[len(ks) // 2]}/{ks[-1]}"}  # fmt: skip
        print(name, results["packs"][name], flush=True)
    pack = str(workdir / "pack-k8")
    adapter = str(paths["adapter1"])
    rows = {
        "audit, checkpoints": [*cli, "audit", "--adapter", adapter, *pair, "--no-cache", "-q", "--json"],
        "audit, pack": [*cli, "audit", "--adapter", adapter, "--subspace", pack, "-q", "--json"],
        "sanitize, checkpoints": [*cli, "sanitize", "--adapter", adapter, *pair, "--no-cache", "-q", "-o",
                                  str(workdir / "out-ckpt"), "--force"],
        "sanitize, pack": [*cli, "sanitize", "--adapter", adapter, "--subspace", pack, "-q", "-o",
                           str(workdir / "out-pack"), "--force"],
    }  # fmt: skip
    for label, cmd in rows.items():
        results["rows"][label] = measured(cmd, env, runs if "pack" in label else checkpoint_runs or runs)
        print(label, {k: v for k, v in results["rows"][label].items() if k != "spread"}, flush=True)
    same = (workdir / "out-ckpt" / "adapter_model.safetensors").read_bytes() == (
        workdir / "out-pack" / "adapter_model.safetensors").read_bytes()
    results["identical"] = same
    if throughput:
        results["throughput"] = [throughput_run(size, workdir, pack, throughput, env, before_only=b)
                                 for b in (True, False)]  # fmt: skip
    return results


def throughput_run(size: str, workdir: Path, pack: str, n: int, env: dict, cli: bool = True,
                   before_only: bool = False) -> dict:  # fmt: skip
    import torch

    from csulora.api import audit
    from csulora.pack import PackSource
    from csulora.synthetic import SIZES, write_adapter

    folder = workdir / f"adapters-{n}"
    marker = folder / "generated.json"
    aligned = str(workdir / "aligned")
    if not (marker.is_file() and json.loads(marker.read_text()) == {"n": n, "size": size}):
        shutil.rmtree(folder, ignore_errors=True)
        for i in range(n):
            write_adapter(folder / f"adapter-{i:03d}", SIZES[size], aligned, r=16, alpha=32, a_std=None, b_std=0.01,
                          seed=100 + i, dtype=torch.bfloat16)  # fmt: skip
        marker.write_text(json.dumps({"n": n, "size": size}))
    adapters = sorted(p for p in folder.iterdir() if p.is_dir())
    source = PackSource.open(pack)
    load, compute = [], []
    t = time.perf_counter()
    for i, a in enumerate(adapters):
        result = audit(a, None, None, subspaces=source, before_only=before_only)
        print(f"{i + 1}/{n} {result.timings}", flush=True)
        load.append(result.timings["load_s"])
        compute.append(result.timings["compute_s"])
    wall = time.perf_counter() - t
    cmd = [sys.executable, "-m", "csulora", "audit", *(x for a in adapters for x in ("--adapter", str(a))),
           "--subspace", pack, "-q", "--json", *(["--before-only"] if before_only else [])]  # fmt: skip
    cli_wall = float("nan")
    if cli:  # the same folder as one command line (its torch import included)
        t = time.perf_counter()
        proc = subprocess.run(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)  # fmt: skip
        cli_wall = time.perf_counter() - t
        if proc.returncode not in (0, 1):
            raise SystemExit(f"audit of {n} adapters failed: {proc.stderr[-2000:]}")
    adapter_mb = sum(f.stat().st_size for a in adapters for f in a.iterdir()) / 1e6 / n
    found = {"n": n, "before_only": before_only, "api_wall_s": wall, "per_minute": 60 * n / wall,
             "read_s": sum(load), "compute_s": sum(compute),
             "median_read_s": statistics.median(load), "median_compute_s": statistics.median(compute),
             "cli_wall_s": cli_wall, "cli_per_minute": 60 * n / cli_wall, "adapter_mb": adapter_mb}  # fmt: skip
    print("throughput", found, flush=True)
    return found


def table(r: dict, machine: str, load: str) -> str:
    lines = [f"### packs, {r['size']}-shaped pair ({r['pair_mb'] / 1e3:.2f} GB bf16 on disk)", "",
             f"Machine: {machine}. {load}", "",
             "| pack | modules | k min/median/max | size (MB) | of the pair | build, no cache (s) |",
             "|---|---:|---|---:|---:|---:|"]  # fmt: skip
    for name, words in (("k8", "k = 8"), ("energy", "energy η = 0.5, cap 256")):
        if name not in r["packs"]:
            continue
        p = r["packs"][name]
        lines.append(f"| {words} | {p['modules']} | {p['k']} | {p['mb']:.1f} | 1/{r['pair_mb'] / p['mb']:.0f} | "
                     f"{p['build_s']:.1f} |")  # fmt: skip
    lines += ["", "| run (adapter 1, r = 16, realign k = 8) | wall (s): median (min–max) | peak RSS (MB) | "
              "read after import (MB) |",
              "|---|---:|---:|---:|"]  # fmt: skip
    for label, row in r["rows"].items():
        lines.append(f"| {label} | {row['wall_s']:.2f} ({row['spread']}) | {row['rss_mb']:.0f} | "
                     f"{row['read_mb']:.1f} |")
    lines += ["", f"Sanitized adapter from the pack byte-identical to the checkpoints' run: {r['identical']}."]
    lines += [throughput_words(t) for t in r.get("throughput", [])]
    return "\n".join(lines) + "\n"


def throughput_words(t: dict) -> str:
    what = "`audit --before-only`" if t.get("before_only") else "`audit` (the method run, \"after\" values measured)"
    return "\n".join(["", f"Throughput: {what} of {t['n']} synthetic rank-16 all-linear bf16 adapters "
                  f"({t['adapter_mb']:.0f} MB each) from the k = 8 pack in one process: {t['per_minute']:.0f} "
                  f"adapters/minute through the API ({t['api_wall_s']:.1f} s; reading {t['read_s']:.1f} s, "
                  f"computing {t['compute_s']:.1f} s, median per adapter {t['median_read_s']:.2f} s + "
                  f"{t['median_compute_s']:.2f} s)"
                  + (f", {t['cli_per_minute']:.0f}/minute as one `csulora audit` command line ({t['cli_wall_s']:.1f} "
                     "s, torch import included)" if t["cli_wall_s"] == t["cli_wall_s"] else "")
                  + f". Goal: ≥ 200/minute: {'met' if t['per_minute'] >= 200 else 'not met'}."])  # fmt: skip


if __name__ == "__main__":  # the throughput alone, on a work folder bench_speed.py --packs made
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="bench_speed.py's work folder (pair, pack-k8)")
    parser.add_argument("--size", default="1b")
    parser.add_argument("--throughput", type=int, default=100)
    args = parser.parse_args()
    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    runs = [throughput_run(args.size, args.workdir, str(args.workdir / "pack-k8"), args.throughput, env,
                           before_only=b) for b in (True, False)]  # fmt: skip
    (args.workdir / "throughput.json").write_text(json.dumps(runs, indent=1))
    print("".join(throughput_words(t) + "\n" for t in runs))
