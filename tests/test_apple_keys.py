"""Our loader against the tensor names and shapes of Apple's published FastVLM-0.5B.

``data/apple_fastvlm_0.5b_keys.json`` lists every tensor of the ``llava_qwen2``
checkpoint. ``data/apple_fastvlm_keys.py`` wrote it from Apple's module structure
(see its docstring for the sources), independently of ``fastvlm.checkpoints.keymap``
and of ``builders.hf_key_to_apple``. Loading the list as meta tensors runs the real
loader (renaming, fusion, the missing / unexpected / shape checks) without
allocating the model's 0.76 B parameters.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import builders
from fastvlm import CheckpointError, FastVLMConfig
from fastvlm.checkpoints.loader import model_from_state_dict

DATA = Path(__file__).resolve().parent / "data"
PUBLISHED = json.loads((DATA / "apple_fastvlm_0.5b_keys.json").read_text())
TOWER = "model.vision_tower.vision_tower.model."


def _load(config: dict, shapes: dict[str, list[int]]):
    state = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    return model_from_state_dict(FastVLMConfig.from_dict(config), state, dtype=torch.bfloat16, device="meta")


def _pattern(name: str) -> str:
    """A tensor name with block and layer indices replaced by ``*`` (stage indices kept)."""
    name = re.sub(r"^(model\.vision_tower\.vision_tower\.model\.network\.\d+)\.\d+\.", r"\1.*.", name)
    return re.sub(r"^model\.layers\.\d+\.", "model.layers.*.", name)


def test_data_file_is_the_generators_output():
    spec = importlib.util.spec_from_file_location("apple_fastvlm_keys", DATA / "apple_fastvlm_keys.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert generator.published_shapes() == PUBLISHED["tensors"]
    assert sum(name.startswith(TOWER) for name in PUBLISHED["tensors"]) == 629


def test_every_published_tensor_loads_with_its_shape():
    # The loader refuses a missing, an unconsumed or a mis-shaped tensor (tests below).
    model = _load(PUBLISHED["config"], PUBLISHED["tensors"])
    assert model.config.format == "llava_qwen2"
    assert tuple(model.lm_head.weight.shape) == (151936, 896)
    assert model.lm_head.weight is not model.language_model.embed_tokens.weight


def test_tied_variant_loads_without_lm_head():
    config = {**PUBLISHED["config"], "tie_word_embeddings": True}
    shapes = {k: v for k, v in PUBLISHED["tensors"].items() if k != "lm_head.weight"}
    model = _load(config, shapes)
    assert model.lm_head.weight is model.language_model.embed_tokens.weight


def test_an_untied_checkpoint_without_lm_head_is_refused():
    # Silently tying would answer with the embedding as the head: noise for an untied model.
    shapes = {k: v for k, v in PUBLISHED["tensors"].items() if k != "lm_head.weight"}
    with pytest.raises(CheckpointError, match="no 'lm_head.weight'.*tie_word_embeddings is false"):
        _load(PUBLISHED["config"], shapes)


@pytest.mark.parametrize(
    "name",
    [
        TOWER + "patch_embed.1.reparam_conv.bias",
        TOWER + "network.6.reparam_conv.weight",  # stage 3's RepCPE
        TOWER + "network.10.1.layer_scale_2",
        TOWER + "network.4.23.convffn.conv.bn.running_var",
        TOWER + "conv_exp.se.expand.bias",
        "model.mm_projector.2.bias",
        "model.layers.23.self_attn.k_proj.bias",
    ],
)
def test_a_missing_tensor_is_refused(name):
    shapes = {k: v for k, v in PUBLISHED["tensors"].items() if k != name}
    with pytest.raises(CheckpointError, match="missing weight"):
        _load(PUBLISHED["config"], shapes)


@pytest.mark.parametrize(
    "name,shape",
    [
        (TOWER + "network.9.pe.weight", [1536, 1, 7, 7]),  # half a training-form RepCPE
        (TOWER + "network.11.0.layer_scale", [1536, 1, 1]),  # a sixth stage
        ("model.mm_projector.4.weight", [896, 896]),  # a deeper projector
    ],
)
def test_an_extra_tensor_is_refused(name, shape):
    with pytest.raises(CheckpointError):
        _load(PUBLISHED["config"], {**PUBLISHED["tensors"], name: shape})


def test_a_wrong_shape_is_refused():
    shapes = copy.deepcopy(PUBLISHED["tensors"])
    shapes["model.layers.3.self_attn.k_proj.weight"] = [896, 896]  # 14 kv heads instead of 2
    with pytest.raises(CheckpointError, match=r"k_proj.weight.*\(896, 896\).*\(128, 896\)"):
        _load(PUBLISHED["config"], shapes)


def test_tiny_apple_checkpoints_use_the_published_names(tmp_path):
    """The tiny checkpoints the other tests load name their tensors as Apple's do."""
    folder = builders.save_apple(builders.build_reference(fused=True), tmp_path)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        tiny = {_pattern(k): len(f.get_slice(k).get_shape()) for k in f.keys()}
    published = {_pattern(k): len(shape) for k, shape in PUBLISHED["tensors"].items()}
    assert sorted(tiny) == sorted(published)
    assert tiny == published  # same tensor ranks too
