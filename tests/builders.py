"""Tiny random-weight FastVLM checkpoints built with the reference libraries.

transformers (``FastVlmForConditionalGeneration``) and timm (``fastvit_mci3``) act
as oracles: each builder returns the saved folder and the reference model that
wrote it, so tests compare outputs on identical weights and inputs.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

os.environ.setdefault("TIMM_FUSED_ATTN", "0")  # the original tower uses explicit attention

TINY_VISION = {
    "layers": [1, 2, 1, 1, 1],
    "embed_dims": [8, 16, 32, 64, 64],
    "mlp_ratios": [2, 2, 2, 2, 2],
}
TINY_TEXT = {
    "model_type": "qwen2",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
IMAGE_TOKEN_ID = 151646
REAL_VOCAB = 152000  # what the published transformers checkpoints use
SMALL_VOCAB = 1024
SMALL_IMAGE_TOKEN_ID = 1000
IMAGE_SIZE = 128  # total stride 64 -> a 2x2 map -> 4 image tokens


def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """Give BatchNorm statistics and layer scales values far from their identity init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                module.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                module.weight.copy_(torch.rand(c, generator=g) + 0.5)
                module.bias.copy_(torch.randn(c, generator=g) * 0.2)
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.copy_(torch.rand(param.shape, generator=g) * 0.5 + 0.5)


def _special_ids(vocab: int) -> dict:
    if vocab > IMAGE_TOKEN_ID:
        return {}
    return {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def build_reference(
    *,
    fused: bool = True,
    tied: bool = False,
    vocab: int = SMALL_VOCAB,
    seed: int = 0,
    image_token_id: int | None = None,
    text_overrides: dict | None = None,
    overrides: dict | None = None,
):
    """A reference FastVlmForConditionalGeneration with tiny random weights (float32, eval).

    ``text_overrides`` and ``overrides`` change text_config and top-level config fields.
    """
    from transformers import FastVlmConfig, FastVlmForConditionalGeneration

    torch.manual_seed(seed)
    image_token_id = (
        image_token_id
        if image_token_id is not None
        else (IMAGE_TOKEN_ID if vocab > IMAGE_TOKEN_ID else SMALL_IMAGE_TOKEN_ID)
    )
    num_features = TINY_VISION["embed_dims"][-1] * 2
    config = FastVlmConfig(
        vision_config={
            "model_type": "timm_wrapper",
            "architecture": "fastvit_mci3",
            "hidden_size": num_features,
            "do_pooling": False,
            "model_args": {**TINY_VISION, "inference_mode": False},
        },
        text_config={
            **TINY_TEXT,
            "vocab_size": vocab,
            "tie_word_embeddings": tied,
            **_special_ids(vocab),
            **(text_overrides or {}),
        },
        image_token_index=image_token_id,
        image_seq_length=(IMAGE_SIZE // 64) ** 2,
        tie_word_embeddings=tied,
        **(overrides or {}),
    )
    model = FastVlmForConditionalGeneration(config).eval()
    _randomize_(model, seed)
    if fused:
        from timm.utils.model import reparameterize_model

        reparameterize_model(model.model.vision_tower.timm_model, inplace=True)
        model.config.vision_config.model_args = {**TINY_VISION, "inference_mode": True}
    return model


def save_reference(model, folder: Path, *, max_shard_size: str | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return folder


# ---- Apple (llava_qwen2) layout, made by renaming a transformers checkpoint -----------


def _network_index(stage: int, part: str) -> int:
    """The published mapping's inverse for the default layout of 5 stages with RepCPE in 3, 4."""
    table = {
        (0, "blocks"): 0,
        (1, "downsample"): 1,
        (1, "blocks"): 2,
        (2, "downsample"): 3,
        (2, "blocks"): 4,
        (3, "downsample"): 5,
        (3, "pos_emb"): 6,
        (3, "blocks"): 7,
        (4, "downsample"): 8,
        (4, "pos_emb"): 9,
        (4, "blocks"): 10,
    }
    return table[(stage, part)]


def hf_key_to_apple(key: str) -> str:
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    if key.startswith("model.multi_modal_projector.linear_1."):
        return "model.mm_projector.0." + key.split("linear_1.", 1)[1]
    if key.startswith("model.multi_modal_projector.linear_2."):
        return "model.mm_projector.2." + key.split("linear_2.", 1)[1]
    if not key.startswith("model.vision_tower.timm_model."):
        return key
    inner = key[len("model.vision_tower.timm_model.") :]
    m = re.match(r"stages\.(\d)\.(downsample|pos_emb|blocks)\.(.*)$", inner)
    if m:
        stage, part, rest = int(m.group(1)), m.group(2), m.group(3)
        if part == "pos_emb":
            rest = re.sub(r"^pos_enc\.", "pe.", rest)
        inner = f"network.{_network_index(stage, part)}.{rest}"
    inner = re.sub(r"^stem\.", "patch_embed.", inner)
    inner = re.sub(r"^final_conv\.", "conv_exp.", inner)
    for ours, apple in [
        (".reparam_conv.", ".reparam_conv."),
        (".se.fc1.", ".se.reduce."),
        (".se.fc2.", ".se.expand."),
        (".mlp.", ".convffn."),
        (".large_conv.", ".lkb_origin."),
        (".conv_kxk.", ".rbr_conv."),
        (".conv_scale.", ".rbr_scale."),
        (".identity.", ".rbr_skip."),
    ]:
        inner = inner.replace(ours, apple)
    # The large-kernel conv of the patch embeds is "lkb_reparam" in Apple's code.
    inner = re.sub(r"(network\.\d+\.proj\.0)\.reparam_conv\.", r"\1.lkb_reparam.", inner)
    inner = re.sub(r"\.layer_scale(_[12])?\.gamma$", r".layer_scale\1", inner)
    return "model.vision_tower.vision_tower.model." + inner


def save_apple(model, folder: Path) -> Path:
    """Write ``model`` (default 5-stage tower layout) as an Apple llava_qwen2 checkpoint."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {hf_key_to_apple(k): v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    # Apple checkpoints carry the CLIP projection head; it must be ignored.
    state["model.vision_tower.vision_tower.model.head.proj"] = torch.zeros(8, 8)
    save_file(state, str(folder / "model.safetensors"))
    text = model.config.text_config
    config = {
        "model_type": "llava_qwen2",
        "architectures": ["LlavaQwen2ForCausalLM"],
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "vocab_size": text.vocab_size,
        "max_position_embeddings": text.max_position_embeddings,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": bool(model.config.tie_word_embeddings),
        "mm_vision_tower": "mobileclip_l_1024",
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": model.config.vision_config.hidden_size,
        "image_aspect_ratio": "pad",
        "tokenizer_model_max_length": 8192,
        # Our extension for non-standard towers; the published checkpoints omit it.
        "vision_model_args": TINY_VISION,
        "eos_token_id": 151645,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


# ---- complete checkpoints: weights + processor files, with the real Qwen2 tokenizer --------


def shared_assets() -> Path | None:
    """``shared/assets`` beside the checkout (or $FASTVLM_SHARED_ASSETS), if present."""
    env = os.environ.get("FASTVLM_SHARED_ASSETS")
    if env:
        return Path(env) if Path(env).is_dir() else None
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "shared" / "assets"
        if candidate.is_dir():
            return candidate
    return None


def save_hf_processor(folder: Path, image_size: int = IMAGE_SIZE) -> Path:
    """Write processor files exactly as the transformers FastVLM converter configures them."""
    from transformers import AddedToken, AutoTokenizer, CLIPImageProcessor, LlavaProcessor

    assets = shared_assets() / "tokenizer-qwen2"
    template = json.loads((assets / "chat_template.fastvlm-hf.json").read_text())["chat_template"]
    tokenizer = AutoTokenizer.from_pretrained(str(assets), chat_template=template)
    tokenizer.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
    image_processor = CLIPImageProcessor(
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.0, 0.0, 0.0],
        image_std=[1.0, 1.0, 1.0],
        size={"shortest_edge": image_size},
    )
    processor = LlavaProcessor(tokenizer=tokenizer, image_processor=image_processor)
    processor.patch_size = 64
    processor.save_pretrained(folder)
    return folder


def tiny_checkpoint(folder: Path, *, fmt: str = "fast_vlm", seed: int = 0, fused: bool = True):
    """A complete tiny checkpoint (real tokenizer, 152000-row vocabulary, 128x128 images).

    Returns (folder, reference model). ``fmt`` is "fast_vlm" or "llava_qwen2".
    """
    import shutil

    ref = build_reference(vocab=REAL_VOCAB, seed=seed, fused=fused)
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "fast_vlm":
        save_reference(ref, folder)
        save_hf_processor(folder)
        # Instruct checkpoints stop on <|im_end|> as well as <|endoftext|>.
        (folder / "generation_config.json").write_text(
            json.dumps({"eos_token_id": [151645, 151643], "pad_token_id": 151643})
        )
    else:
        save_apple(ref, folder)
        config = json.loads((folder / "config.json").read_text())
        config["mm_vision_tower"] = f"mobileclip_l_{IMAGE_SIZE}"
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            shutil.copy(shared_assets() / "tokenizer-qwen2" / name, folder / name)
    return folder, ref
