"""The synthetic MoE pair and adapter of ``csulora.synthetic`` (what scripts/bench_speed.py --size moe measures)
are in the real formats: transformers loads the pair (fused expert stacks) with no missing or unexpected key,
and the adapter is exactly the layout PEFT saves for the same ``LoraConfig`` on a Mixtral of the same shape
(keys, shapes, nesting of the two expert stacks, router as a wrapped parameter): PEFT loads it with no missing
or unexpected key, and each expert's update is the slice of the factors the writer documents."""

from __future__ import annotations

import json
import warnings

import torch
from safetensors.torch import load_file

from csulora.synthetic import SIZES, write_adapter, write_pair

SHAPE = SIZES["moe-tiny"]


def mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(**SHAPE.config("float32"))).float()


def test_synthetic_moe_pair_loads_in_transformers(tmp_path):
    from transformers import MixtralForCausalLM

    pair = write_pair(tmp_path, SHAPE, spectrum="fine-tune", dtype=torch.bfloat16, shard_bytes=100_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = MixtralForCausalLM.from_pretrained(pair["aligned"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    key = "model.layers.0.mlp.experts.gate_up_proj"
    index = json.loads((pair["aligned"] / "model.safetensors.index.json").read_text())["weight_map"]
    stored = load_file(pair["aligned"] / index[key])
    assert tuple(stored[key].shape) == (SHAPE.experts, 2 * SHAPE.intermediate, SHAPE.hidden)
    assert torch.equal(model.state_dict()[key], stored[key].float())  # read as it is stored, no conversion


def test_synthetic_moe_adapter_is_peft_layout(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from peft.tuners.lora import ParamWrapper

    folder = write_adapter(tmp_path / "adapter", SHAPE, "mixtral", r=4, alpha=8, a_std=None, b_std=0.1)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["gate_up_proj", "gate.weight", "down_proj"]
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    ours = load_file(folder / "adapter_model.safetensors")

    # PEFT's own adapter for the same LoraConfig on a Mixtral of the same shape: same keys, same shapes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_own = get_peft_model(mixtral(), LoraConfig(r=4, lora_alpha=8, target_modules=config["target_modules"],
                                                        target_parameters=config["target_parameters"]))  # fmt: skip
    theirs = get_peft_model_state_dict(peft_own, save_embedding_layers=False)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in ours  # gate_up_proj: inner

    # PEFT loads ours with no missing or unexpected key, from our adapter_config.json
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(mixtral(), folder)
    problems = [str(w.message) for w in caught if "missing" in str(w.message).lower()
                or "unexpected" in str(w.message).lower()]  # fmt: skip
    assert not problems, problems
    # and the state dict alone, into PEFT's own model: nothing unexpected, no adapter weight missing
    result = set_peft_model_state_dict(peft_own, ours)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k], result
    state = get_peft_model_state_dict(loaded, save_embedding_layers=False)
    assert state.keys() == ours.keys()
    assert all(torch.equal(v, ours[k].float()) for k, v in state.items())

    # every expert stack wrapped where the writer put it; each expert's update the documented slice of A and B
    E, r, scaling = SHAPE.experts, 4, 8 / 4
    layer = loaded.base_model.model.model.layers[1].mlp
    wrappers = {"down_proj": layer.experts, "gate_up_proj": layer.experts.base_layer}
    for param, wrapper in wrappers.items():
        assert isinstance(wrapper, ParamWrapper) and wrapper.parameter_name == param
        prefix = "base_model.model.model.layers.1.mlp.experts" + (".base_layer" if param == "gate_up_proj" else "")
        A, B = ours[f"{prefix}.lora_A.weight"].double(), ours[f"{prefix}.lora_B.weight"].double()
        delta = wrapper.get_delta_weight("default").double()  # (E, d_out, d_in), transformers' layout
        assert tuple(delta.shape) == SHAPE.stacks()[f"model.layers.1.mlp.experts.{param}"]
        for e in range(E):
            expected = scaling * B[:, e::E] @ A[e * r : (e + 1) * r]
            torch.testing.assert_close(delta[e], expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
    assert isinstance(layer.gate, ParamWrapper) and layer.gate.parameter_name == "weight"
