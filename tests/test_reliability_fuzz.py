"""Property tests (issue 6): random adapter configs, shapes and dtypes, and random damage to adapter
files. Every case either succeeds and matches the oracle (tests/oracle.py, DESIGN.md §4) or exits 2
with one ``error:`` line — never a traceback, never exit 1 ("internal error").

Bounded and derandomized so the suite stays fast and reproducible; the example counts are the
``max_examples`` below (run with ``--hypothesis-show-statistics`` to see them)."""

from __future__ import annotations

import json
import math
import re
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from csulora.io.adapters import pattern_value
from csulora.synthetic import write_adapter, write_pair
from tests import oracle
from tests.conftest import assert_one_line_error, run_cli

FUZZ = settings(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}
KINDS = ("q_proj", "v_proj", "o_proj")
NAMES = [f"model.layers.{i}.self_attn.{k}" for i in range(2) for k in KINDS]

# Pattern keys with a plain-words statement of which modules each one selects (independent of the
# product's regex rule): PEFT's `re.match(rf"(.*\.)?({key})$", name)`.
PATTERN_KEYS = {
    "q_proj": lambda n: n.endswith(".q_proj"),
    "v_proj": lambda n: n.endswith(".v_proj"),
    "model.layers.1.self_attn.o_proj": lambda n: n == "model.layers.1.self_attn.o_proj",
    "0.self_attn.v_proj": lambda n: n.endswith(".0.self_attn.v_proj"),
    "q_proj|o_proj": lambda n: n.rsplit(".", 1)[1] in ("q_proj", "o_proj"),
    r"layers\.1\.self_attn\.\w+": lambda n: n.startswith("model.layers.1."),
}


def first_match(patterns: dict, name: str, default):
    for key, value in patterns.items():
        if PATTERN_KEYS[key](name):
            return value
    return default


@st.composite
def adapters(draw):
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True))
    shapes = {n: (draw(st.integers(2, 12)), draw(st.integers(2, 12))) for n in names}
    r = draw(st.integers(1, 6))
    # sorted: PEFT saves configs with sorted keys (and so does csulora.synthetic), and the first matching key wins
    rank_pattern = dict(
        sorted(draw(st.dictionaries(st.sampled_from(sorted(PATTERN_KEYS)), st.integers(1, 6), max_size=3)).items())
    )
    alpha_pattern = dict(
        sorted(draw(st.dictionaries(st.sampled_from(sorted(PATTERN_KEYS)), st.floats(0.5, 64), max_size=3)).items())
    )
    config = {
        "r": r,
        "lora_alpha": draw(st.one_of(st.integers(1, 64), st.floats(0.25, 64))),
        "use_rslora": draw(st.booleans()),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": draw(st.one_of(st.just(list(KINDS)), st.just(r".*\.(q_proj|v_proj|o_proj)"),
                                         st.just(r"model\.layers\.\d+\.self_attn\.(q|v|o)_proj"))),
    }  # fmt: skip
    return {
        "shapes": shapes,
        "config": config,
        "ranks": {n: first_match(rank_pattern, n, r) for n in names},
        "dtype": draw(st.sampled_from(sorted(DTYPES))),
        "k": draw(st.integers(1, 8)),
        "lam": draw(st.sampled_from([0.0, 0.3, 1.0, 10.0])),
        "seed": draw(st.integers(0, 2**16)),
    }


def run(root: Path, adapter: Path, pair, k: int = 3, lam: float = 1.0, *extra: str):
    return run_cli("sanitize", "--adapter", adapter, "--aligned", pair["aligned"], "--base", pair["base"],
                   "-o", root / "out", "-q", "--exact-svd", "--subspace-rank", str(k), "--lambda", str(lam),
                   "--method", "csulora",
                   *extra, in_process=True)  # fmt: skip


def check_success(root: Path, adapter: Path, pair, lam: float, scalings: dict[str, float], k: int, dtype) -> None:
    """Same names, shapes, dtypes, config bytes; each ΔW' equals the oracle on the exact rank-k subspace."""
    out = root / "out"
    assert (out / "adapter_config.json").read_bytes() == (adapter / "adapter_config.json").read_bytes()
    before, after = load_file(adapter / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert {k_: (v.shape, v.dtype) for k_, v in before.items()} == {k_: (v.shape, v.dtype) for k_, v in after.items()}
    report = json.loads((out / "csulora_report.json").read_text(), parse_constant=lambda c: 1 / 0)
    f_before, f_after = oracle.load_factors(adapter), oracle.load_factors(out)
    for row in report["modules"]:
        name = row["module"]
        D = oracle.displacement(pair, name)
        assert row["k"] == min(k, *D.shape)
        assert math.isclose(row["scaling"], scalings[name], rel_tol=1e-12)
        (A, B), (A2, B2) = f_before[name], f_after[name]
        expected = oracle.expected_delta(A, B, scalings[name], D, row["k"], lam)
        got = scalings[name] * B2 @ A2
        scale = max(float(expected.norm()), float((scalings[name] * B @ A).norm()) * 1e-6, 1e-300)
        assert float((got - expected).norm()) / scale < TOL[dtype], name


@settings(FUZZ, max_examples=50)
@given(adapters())
def test_random_configs_shapes_dtypes_match_the_oracle(case):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pair = write_pair(root / "pair", case["shapes"], seed=case["seed"])
        dtype = DTYPES[case["dtype"]]
        adapter = write_adapter(root / "adapter", case["shapes"], r=case["ranks"], dtype=dtype,
                                seed=case["seed"], config=case["config"])  # fmt: skip
        result = run(root, adapter, pair, case["k"], case["lam"])
        assert result.returncode == 0, result.stderr
        cfg = case["config"]
        scalings = {}
        for name, r in case["ranks"].items():
            alpha = first_match(cfg["alpha_pattern"], name, cfg["lora_alpha"])
            scalings[name] = alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r
        check_success(root, adapter, pair, case["lam"], scalings, case["k"], dtype)


def test_pattern_keys_agree_with_the_product_rule():
    """The plain-words predicates above are PEFT's rule for these keys (so the fuzz oracle is independent)."""
    for key, selects in PATTERN_KEYS.items():
        for name in NAMES:
            assert (pattern_value({key: 1}, name, 0) == 1) == selects(name), (key, name)


SHAPES = {"model.layers.0.self_attn.q_proj": (12, 8), "model.layers.1.self_attn.v_proj": (4, 8)}


@st.composite
def damages(draw):
    """A random way to damage a valid adapter file: flip bytes (often in the header), overwrite a run
    with random bytes, truncate, or insert bytes."""
    kind = draw(st.sampled_from(["flip", "flip-header", "overwrite", "truncate", "insert"]))
    return {
        "kind": kind,
        "dtype": draw(st.sampled_from(sorted(DTYPES))),
        "positions": draw(st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=6)),
        "bytes": draw(st.binary(min_size=1, max_size=16)),
    }


def apply(data: bytes, d: dict) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    buf = bytearray(data)
    span = 8 + n if d["kind"] == "flip-header" else len(buf)
    spots = [int(p * span) for p in d["positions"]]
    if d["kind"] in ("flip", "flip-header"):
        for i, b in zip(spots, d["bytes"] * 6, strict=False):
            buf[i] ^= b or 0xFF
    elif d["kind"] == "overwrite":
        buf[spots[0] : spots[0] + len(d["bytes"])] = d["bytes"]
        buf = buf[: len(data)]
    elif d["kind"] == "truncate":
        buf = buf[: spots[0]]
    else:
        buf[spots[0] : spots[0]] = d["bytes"]
    return bytes(buf)


@st.composite
def config_edits(draw):
    """One adapter_config.json field set to an arbitrary JSON value (NaN and Infinity included)."""
    values = st.recursive(
        st.none() | st.booleans() | st.integers(-10, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
        | st.text(max_size=8) | st.sampled_from([4, 8, 0.5, "4", "default", "LORA", "pissa", r"(?i)q", ")"]),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6) | st.sampled_from(
            ["q_proj", r"\1", "(?i)v_proj", "[", "v_proj"]), inner, max_size=3),
        max_leaves=6,
    )  # fmt: skip
    field = draw(st.sampled_from(["r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "peft_type",
                                  "use_dora", "fan_in_fan_out", "init_lora_weights", "modules_to_save",
                                  "base_model_name_or_path", "lora_bias"]))  # fmt: skip
    return field, draw(values)


def check_outcome(result) -> str:
    assert result.returncode in (0, 2), (result.returncode, result.stderr)
    if result.returncode == 2:
        line = assert_one_line_error(result)
        event(f"exit 2: {_kind(line)}")
        return "refused"
    event("exit 0, checked against the oracle")
    return "ok"


def _kind(line: str) -> str:
    """A short label for the statistics: the message's first words, paths, names and values left out."""
    text = re.sub(r"'[^']*'|\(.*?\)|\d+", "…", line.split(": ", 2)[-1])
    return " ".join(text.split(" found ")[0].split()[:7])


@settings(FUZZ, max_examples=100)
@given(damages())
def test_damaged_adapter_files_succeed_exactly_or_exit_2(d):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pair = write_pair(root / "pair", SHAPES)
        dtype = DTYPES[d["dtype"]]
        adapter = write_adapter(root / "adapter", SHAPES, dtype=dtype)
        weights = adapter / "adapter_model.safetensors"
        weights.write_bytes(apply(weights.read_bytes(), d))
        result = run(root, adapter, pair)
        if check_outcome(result) == "ok":  # the damage left a valid file: the result must be exact for it
            dtype = next(iter(load_file(weights).values())).dtype
            check_success(root, adapter, pair, 1.0, {n: 2.0 for n in SHAPES}, 3, dtype)
        else:
            assert not (root / "out").exists()


@settings(FUZZ, max_examples=80)
@given(config_edits())
def test_arbitrary_config_values_succeed_exactly_or_exit_2(edit):
    field, value = edit
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pair = write_pair(root / "pair", SHAPES)
        adapter = write_adapter(root / "adapter", SHAPES)
        config = json.loads((adapter / "adapter_config.json").read_text())
        config[field] = value
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        result = run(root, adapter, pair)
        if check_outcome(result) == "ok":
            scalings = {}
            for name in SHAPES:
                r = pattern_value(config.get("rank_pattern") or {}, name, config["r"])
                alpha = pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
                scalings[name] = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
            check_success(root, adapter, pair, 1.0, scalings, 3, torch.float32)
        else:
            assert not (root / "out").exists()


def test_fuzz_found_cases_stay_fixed(tmp_path):
    """Inputs the fuzzers found that used to end in "internal error" or a NaN adapter."""
    pair = write_pair(tmp_path / "pair", SHAPES)
    cases = {
        "lora_alpha NaN": ("lora_alpha", float("nan"), "lora_alpha"),
        "lora_alpha Infinity": ("lora_alpha", float("inf"), "lora_alpha"),
        "alpha_pattern value text": ("alpha_pattern", {"q_proj": "big"}, "alpha_pattern"),
        "rank_pattern bad regex": ("rank_pattern", {"[": 4}, "regular expression"),
        "key valid alone, not in PEFT's wrapper": ("rank_pattern", {"(?i)q_proj": 4}, "regular expression"),
        "use_rslora as text": ("use_rslora", "false", "use_rslora"),
    }
    for i, (field, value, words) in enumerate(cases.values()):
        adapter = write_adapter(tmp_path / f"a{i}", SHAPES)
        config = json.loads((adapter / "adapter_config.json").read_text())
        config[field] = value
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        assert_one_line_error(run(tmp_path / f"run{i}", adapter, pair), "adapter_config.json", words)
