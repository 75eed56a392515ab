"""Issue 21 item 4: an adapter whose config and weights disagree is bad input (exit 2, one line, nothing written):
what csulora would sanitize is not what PEFT loads. The matching rule is checked against the installed peft."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, folder_bytes, run_cli

from csulora.io.adapters import peft_wraps
from csulora.world import ALIGNED, world_dir

ROOT = world_dir("tiny")


def adapter_copy(tmp: Path, name: str, **config_changes) -> Path:
    folder = shutil.copytree(ROOT / "adapters" / name, tmp / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


CASES = {
    "dora_config_without_magnitudes": ("adv-r8-all-s0", {"use_dora": True}, "use_dora is true"),
    "magnitudes_without_dora": ("adv-r8-all-dora-s0", {"use_dora": False}, "use_dora is false"),
    "factors_target_modules_does_not_match": ("adv-r8-all-s0", {"target_modules": ["q_proj"]}, "does not match"),
    "no_peft_type": ("adv-r8-all-s0", {"peft_type": None}, "names no peft_type"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_and_weights_that_disagree_exit_2_and_write_nothing(case, tmp_path):
    name, changes, needle = CASES[case]
    adapter = adapter_copy(tmp_path, name, **changes)
    before = folder_bytes(tmp_path)
    for command in ("sanitize", "audit"):
        result = run_cli(command, "--adapter", adapter, "--aligned", ROOT / ALIGNED, "-q", in_process=True)
        assert_one_line_error(result, needle, str(adapter / "adapter_config.json"))
    assert folder_bytes(tmp_path) == before  # nothing written, the input untouched


def test_peft_loads_only_what_target_modules_matches(tmp_path):
    """The premise of the target check, on the installed peft: factors of modules that target_modules does not
    match are not loaded."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = adapter_copy(tmp_path, "adv-r8-all-s0", target_modules=["q_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ROOT / ALIGNED), adapter)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj"}


CONFIGS = {
    "list": {"target_modules": ["q_proj", "down_proj"]},
    "regex": {"target_modules": r".*\.(k_proj|up_proj)"},
    "all-linear": {"target_modules": "all-linear"},
    "layers_to_transform": {"target_modules": ["v_proj", "o_proj"], "layers_to_transform": [1]},
    "exclude_modules": {"target_modules": "all-linear", "exclude_modules": ["gate_proj"]},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_peft_wraps_follows_the_installed_peft(name):
    """``peft_wraps`` against the modules ``get_peft_model`` of the installed peft actually wraps."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig(r=2, lora_alpha=4, **CONFIGS[name])
    saved = json.loads(json.dumps(config.to_dict(), default=sorted))  # as adapter_config.json holds it
    model = AutoModelForCausalLM.from_pretrained(ROOT / ALIGNED)
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    ours = {n for n in linear if peft_wraps(saved, n)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, config)
    theirs = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert ours == theirs and ours
