"""Adapters interoperate with transformers + PEFT, both ways, and merge exactly.

transformers' FastVlmForConditionalGeneration with ``peft.PeftModel`` is the oracle.
"""

from __future__ import annotations

import json

import pytest
import torch

import builders
import fastvlm
from fastvlm import cli
from fastvlm.checkpoints.adapter import merge_adapter, read_adapter
from fastvlm.checkpoints.loader import load_model
from fastvlm.processing import FastVLMProcessor
from fastvlm.training.lora import ADAPTER_NAME, add_lora
from finetune_helpers import finetune, image_inputs, rel_err, write_dataset

TOL = 1e-4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("peft_data"))


@pytest.fixture(scope="module")
def trained(tiny_checkpoint_dir, data, tmp_path_factory):
    """An adapter from three LoRA steps: B matrices and the projector are no longer at init."""
    out = tmp_path_factory.mktemp("peft_adapter") / "out"
    args = ["--max-steps", "3", "--batch-size", "4", "--lr", "1e-2", "--lora-rank", "4"]
    assert finetune(tiny_checkpoint_dir, data, out, *args) == 0
    return out


def _peft_logits(base, adapter, inputs):
    from peft import PeftModel
    from transformers import FastVlmForConditionalGeneration

    model = (
        FastVlmForConditionalGeneration.from_pretrained(base)
        if not isinstance(base, torch.nn.Module)
        else base
    )
    peft_model = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        return peft_model(**inputs).logits.float()


def _ours_logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits.float()


def _inputs(folder, data):
    return dict(image_inputs(FastVLMProcessor.from_pretrained(folder), data.parent / "img" / "5.png"))


@pytest.mark.slow
def test_our_adapter_loads_in_peft_with_the_same_logits(tiny_checkpoint_dir, trained, data):
    inputs = _inputs(tiny_checkpoint_dir, data)
    expected = _peft_logits(tiny_checkpoint_dir, trained, inputs)
    vlm = fastvlm.load(tiny_checkpoint_dir, adapter=trained, device="cpu", dtype="float32", progress=False)
    assert rel_err(_ours_logits(vlm.model, inputs), expected) <= TOL
    base = load_model(tiny_checkpoint_dir, dtype=torch.float32, device="cpu", progress=False)
    assert rel_err(_ours_logits(base, inputs), expected) > 1e-3  # the adapter changes something


def test_lora_model_equals_its_merged_model(tiny_checkpoint_dir, trained, data):
    """Our model with live (unmerged) PEFT LoRA layers vs the merged weights."""
    from fastvlm.checkpoints.adapter import LoraSettings

    inputs = _inputs(tiny_checkpoint_dir, data)
    adapter = read_adapter(trained)
    live = load_model(tiny_checkpoint_dir, dtype=torch.float32, device="cpu", progress=False)
    add_lora(live, LoraSettings(r=4, alpha=16, dropout=0.0))
    params = dict(live.named_parameters())
    with torch.no_grad():
        for module, (A, B) in adapter.lora.items():
            params[f"{module}.lora_A.{ADAPTER_NAME}.weight"].copy_(A)
            params[f"{module}.lora_B.{ADAPTER_NAME}.weight"].copy_(B)
        for name, tensor in adapter.whole.items():
            params[name].copy_(tensor)
    merged = merge_adapter(
        load_model(tiny_checkpoint_dir, dtype=torch.float32, device="cpu", progress=False), trained
    )
    assert rel_err(_ours_logits(merged, inputs), _ours_logits(live.eval(), inputs)) <= 1e-5


def test_merge_command_writes_a_checkpoint_both_libraries_load(tiny_checkpoint_dir, trained, data, tmp_path):
    from transformers import FastVlmForConditionalGeneration

    inputs = _inputs(tiny_checkpoint_dir, data)
    expected = _peft_logits(tiny_checkpoint_dir, trained, inputs)
    merged = tmp_path / "merged"
    assert cli.main(["merge", str(tiny_checkpoint_dir), str(trained), str(merged)]) == 0
    ours = load_model(merged, dtype=torch.float32, device="cpu", progress=False)
    assert rel_err(_ours_logits(ours, inputs), expected) <= TOL
    hf = FastVlmForConditionalGeneration.from_pretrained(merged).eval()
    assert rel_err(_ours_logits(hf, inputs), expected) <= TOL
    assert cli.main(["merge", str(tiny_checkpoint_dir), str(trained), str(merged)]) == 2  # not empty


@pytest.mark.slow
def test_a_peft_adapter_trained_on_transformers_loads_here(tiny_checkpoint_dir, data, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import FastVlmForConditionalGeneration

    torch.manual_seed(0)
    ref = FastVlmForConditionalGeneration.from_pretrained(tiny_checkpoint_dir)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        modules_to_save=["multi_modal_projector"],
        init_lora_weights=False,
    )
    peft_model = get_peft_model(ref, config)
    with torch.no_grad():  # a "trained" projector: different from the base's
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.05)
    peft_model.save_pretrained(tmp_path / "hf_adapter")
    inputs = _inputs(tiny_checkpoint_dir, data)
    with torch.no_grad():
        expected = peft_model.eval()(**inputs).logits.float()
    vlm = fastvlm.load(tiny_checkpoint_dir, adapter=tmp_path / "hf_adapter", device="cpu", dtype="float32")
    assert rel_err(_ours_logits(vlm.model, inputs), expected) <= TOL


@pytest.mark.slow
def test_apple_format_adapters_use_transformers_names(data, tmp_path):
    folder, ref = builders.tiny_checkpoint(tmp_path / "apple", fmt="llava_qwen2")
    out = tmp_path / "out"
    args = ["--max-steps", "2", "--batch-size", "4", "--lr", "1e-2", "--lora-rank", "4"]
    assert finetune(folder, data, out, *args) == 0
    keys = read_adapter(out)  # parses: every key names a module
    assert keys.lora and all(k.startswith("language_model.layers.") for k in keys.lora)
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.model.multi_modal_projector.linear_1.weight" in set(f.keys())
    inputs = _inputs(folder, data)
    assert int((inputs["input_ids"] == ref.config.image_token_id).sum()) == 4
    expected = _peft_logits(ref, out, inputs)
    vlm = fastvlm.load(folder, adapter=out, device="cpu", dtype="float32", progress=False)
    assert rel_err(_ours_logits(vlm.model, inputs), expected) <= TOL
    merged = tmp_path / "merged"
    assert cli.main(["merge", str(folder), str(out), str(merged)]) == 0
    assert json.loads((merged / "config.json").read_text())["model_type"] == "llava_qwen2"
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        assert "model.mm_projector.0.weight" in set(f.keys())
    merged_model = load_model(merged, dtype=torch.float32, device="cpu", progress=False)
    assert rel_err(_ours_logits(merged_model, inputs), expected) <= TOL
    full = tmp_path / "full"  # every weight trained, vision tower included, written back as Apple's
    assert (
        finetune(folder, data, full, "--full", "--max-steps", "1", "--batch-size", "4", "--lr", "1e-3") == 0
    )
    assert json.loads((full / "config.json").read_text())["model_type"] == "llava_qwen2"
    trained = load_model(full, dtype=torch.float32, device="cpu", progress=False)
    assert rel_err(_ours_logits(trained, inputs), _ours_logits(merged_model, inputs)) > 1e-4


@pytest.mark.slow
def test_a_trained_vision_tower_goes_to_modules_to_save(tiny_checkpoint_dir, data, tmp_path):
    out = tmp_path / "out"
    args = ["--max-steps", "1", "--batch-size", "4", "--lr", "1e-2", "--train-vision"]
    assert finetune(tiny_checkpoint_dir, data, out, *args) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["multi_modal_projector", "vision_tower"]
    inputs = _inputs(tiny_checkpoint_dir, data)
    expected = _peft_logits(tiny_checkpoint_dir, out, inputs)
    vlm = fastvlm.load(tiny_checkpoint_dir, adapter=out, device="cpu", dtype="float32", progress=False)
    assert rel_err(_ours_logits(vlm.model, inputs), expected) <= TOL
    merged = tmp_path / "merged"
    assert cli.main(["merge", str(tiny_checkpoint_dir), str(out), str(merged)]) == 0
    ours = load_model(merged, dtype=torch.float32, device="cpu", progress=False)
    assert rel_err(_ours_logits(ours, inputs), expected) <= TOL


def test_run_takes_an_adapter(tiny_checkpoint_dir, trained, capsys):
    argv = ["run", "none", "Hi", "--model", str(tiny_checkpoint_dir), "--adapter", str(trained)]
    assert cli.main([*argv, "--max-new-tokens", "2", "--device", "cpu", "--dtype", "float32"]) == 0
    assert cli.main([*argv[:-1], str(trained / "missing"), "--device", "cpu"]) == 2
    assert "is not a LoRA adapter" in capsys.readouterr().err
