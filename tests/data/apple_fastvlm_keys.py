"""Write the tensor names and shapes of Apple's published FastVLM-0.5B checkpoint.

Run ``python tests/data/apple_fastvlm_keys.py`` to regenerate
``apple_fastvlm_0.5b_keys.json``. The list is derived from Apple's module structure,
not from this package's key tables, so that a test can check our loader against it:

* ``llava/model/multimodal_encoder/mobileclip/mci.py`` (apple/ml-fastvlm; read from the
  mirror renzhan/ml-fastvlm at f7b1c1cb81dafd8100a6a84174da5f48a6aaa7b7): ``fastvithd()``
  builds ``FastViT(layers=[2, 12, 24, 4, 2], embed_dims=[96, 192, 384, 768, 1536],
  mlp_ratios=[4] * 5, token_mixers=3 x repmixer + 2 x attention, pos_embs=RepCPE(7x7)
  in stages 3 and 4, norm_layer=LayerNormChannel, stem_scale_branch=False,
  inference_mode=True)``. ``FastViT.__init__`` appends, per stage, its RepCPE, its
  blocks, then the PatchEmbed into the next stage to one flat ``network`` list, and ends
  with ``conv_exp`` (a 3x3 MobileOneBlock with squeeze-excite, 2x channels).
* ``llava/model/multimodal_encoder/mobileclip/__init__.py`` (mirror weedge/ml-fastvlm at
  1d693b6c47fbb3fa9a1891c62d82b04116fbe16c): ``MCi`` holds the FastViT as ``.model`` and
  replaces its classifier with ``GlobalPool2D(3072, projection_dim=768)`` (``head.proj``).
* ``llava/model/multimodal_encoder/mobileclip_encoder.py`` (apple/ml-fastvlm at
  ce11b7ff4a767306822826015366991e6ed8bd56): the tower is ``vision_tower.vision_tower``,
  so every tower tensor starts with ``model.vision_tower.vision_tower.model.``.
* ``llava/model/multimodal_projector/builder.py`` (LLaVA; mirror Andersonsr/ml-fastvlm at
  49796cae0323a19c86a17324afa29bfc314c8e94): ``mlp2x_gelu`` is
  ``Sequential(Linear(mm_hidden, hidden), GELU, Linear(hidden, hidden))`` -> ``mm_projector.0/2``.
* ``llava/model/language_model/llava_qwen.py`` (apple/ml-fastvlm at
  003ec9bea7980bb410a75e87a96f84cc2910cce0): ``LlavaQwen2ForCausalLM`` is a transformers
  ``Qwen2ForCausalLM`` (``model.layers.N...``, ``model.norm``, ``lm_head``).
* The published config.json of apple/FastVLM-0.5B: hidden 896, 24 layers, 14 heads,
  2 key/value heads, intermediate 4864, vocab 151936, mm_hidden_size 3072,
  ``tie_word_embeddings: false`` (so ``lm_head.weight`` is stored).

Why the inference (fused) form: ``fastvithd()`` passes ``inference_mode=True``, so the
published tower holds ``reparam_conv`` / ``lkb_reparam`` tensors, not the training
branches (``rbr_conv``, ``rbr_skip``, ``rbr_scale``, ``lkb_origin``, RepCPE ``pe``).
transformers' converter (``models/fast_vlm/convert_fastvlm_weights_to_hf.py``, commit
000c33fdfde12e1ffafbfcdb3c926df5727a00b6) agrees: it renames only ``lkb_reparam`` and
loads into a timm tower built with ``inference_mode=True`` under ``strict=True``. The
ConvFFN's depthwise conv + BatchNorm is never reparameterised in Apple's code and stays
as ``convffn.conv.conv`` + ``convffn.conv.bn`` (with ``num_batches_tracked``). The tower
then has 629 tensors, ``head.proj`` included.
"""

from __future__ import annotations

import json
from pathlib import Path

TOWER = "model.vision_tower.vision_tower.model."
LAYERS = [2, 12, 24, 4, 2]
DIMS = [96, 192, 384, 768, 1536]
MLP_RATIO = 4
MIXERS = ["repmixer", "repmixer", "repmixer", "attention", "attention"]
POS_EMB = [False, False, False, True, True]  # RepCPE, 7x7
CPE_KERNEL = 7
DOWN_PATCH = 7  # PatchEmbed's large kernel
CLS_RATIO = 2
PROJECTION_DIM = 768  # MobileCLIP-L's embedding size (head.proj, unused by FastVLM)
HEAD_DIM = 32  # MHSA head size (no effect on tensor shapes)

TEXT = {"hidden": 896, "layers": 24, "heads": 14, "kv_heads": 2, "intermediate": 4864, "vocab": 151936}
TIED = False

Shapes = dict[str, list[int]]


def conv(out: dict, name: str, c_out: int, c_in_per_group: int, k: int, bias: bool = True) -> None:
    out[name + ".weight"] = [c_out, c_in_per_group, k, k]
    if bias:
        out[name + ".bias"] = [c_out]


def batchnorm(out: dict, name: str, c: int) -> None:
    for part in ("weight", "bias", "running_mean", "running_var"):
        out[f"{name}.{part}"] = [c]
    out[name + ".num_batches_tracked"] = []


def conv_ffn(out: dict, p: str, dim: int) -> None:
    hidden = dim * MLP_RATIO
    conv(out, p + "conv.conv", dim, 1, 7, bias=False)  # depthwise 7x7, groups=dim
    batchnorm(out, p + "conv.bn", dim)
    conv(out, p + "fc1", hidden, dim, 1)
    conv(out, p + "fc2", dim, hidden, 1)


def repmixer_block(out: dict, p: str, dim: int) -> None:
    conv(out, p + "token_mixer.reparam_conv", dim, 1, 3)  # depthwise 3x3
    conv_ffn(out, p + "convffn.", dim)
    out[p + "layer_scale"] = [dim, 1, 1]


def attention_block(out: dict, p: str, dim: int) -> None:
    out[p + "norm.weight"] = [dim]  # LayerNormChannel
    out[p + "norm.bias"] = [dim]
    out[p + "token_mixer.qkv.weight"] = [3 * dim, dim]  # qkv_bias=False
    out[p + "token_mixer.proj.weight"] = [dim, dim]
    out[p + "token_mixer.proj.bias"] = [dim]
    conv_ffn(out, p + "convffn.", dim)
    out[p + "layer_scale_1"] = [dim, 1, 1]
    out[p + "layer_scale_2"] = [dim, 1, 1]


def patch_embed(out: dict, p: str, c_in: int, c_out: int) -> None:
    conv(out, p + "proj.0.lkb_reparam", c_out, 1, DOWN_PATCH)  # groups=c_in
    conv(out, p + "proj.1.reparam_conv", c_out, c_out, 1)


def stem(out: dict, dim: int) -> None:
    conv(out, TOWER + "patch_embed.0.reparam_conv", dim, 3, 3)
    conv(out, TOWER + "patch_embed.1.reparam_conv", dim, 1, 3)  # depthwise
    conv(out, TOWER + "patch_embed.2.reparam_conv", dim, dim, 1)


def vision_tower(out: dict) -> None:
    stem(out, DIMS[0])
    network: list[tuple[str, int]] = []  # (kind, stage) in FastViT.__init__ order
    for i in range(len(LAYERS)):
        if POS_EMB[i]:
            network.append(("cpe", i))
        network.append(("blocks", i))
        if i < len(LAYERS) - 1:
            network.append(("down", i))
    for n, (kind, i) in enumerate(network):
        p = f"{TOWER}network.{n}."
        if kind == "cpe":
            conv(out, p + "reparam_conv", DIMS[i], 1, CPE_KERNEL)  # groups=dim
        elif kind == "down":
            patch_embed(out, p, DIMS[i], DIMS[i + 1])
        else:
            block = repmixer_block if MIXERS[i] == "repmixer" else attention_block
            for b in range(LAYERS[i]):
                block(out, f"{p}{b}.", DIMS[i])
    wide = DIMS[-1] * CLS_RATIO
    conv(out, TOWER + "conv_exp.reparam_conv", wide, 1, 3)  # groups=DIMS[-1]
    squeezed = int(wide * 0.0625)  # SEBlock rd_ratio
    conv(out, TOWER + "conv_exp.se.reduce", squeezed, wide, 1)
    conv(out, TOWER + "conv_exp.se.expand", wide, squeezed, 1)
    out[TOWER + "head.proj"] = [wide, PROJECTION_DIM]


def projector(out: dict, mm_hidden: int) -> None:
    h = TEXT["hidden"]
    out["model.mm_projector.0.weight"] = [h, mm_hidden]
    out["model.mm_projector.0.bias"] = [h]
    out["model.mm_projector.2.weight"] = [h, h]
    out["model.mm_projector.2.bias"] = [h]


def qwen2(out: dict) -> None:
    h, head = TEXT["hidden"], TEXT["hidden"] // TEXT["heads"]
    kv = TEXT["kv_heads"] * head
    out["model.embed_tokens.weight"] = [TEXT["vocab"], h]
    for n in range(TEXT["layers"]):
        p = f"model.layers.{n}."
        for name, rows in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
            out[f"{p}self_attn.{name}.weight"] = [rows, h]
            out[f"{p}self_attn.{name}.bias"] = [rows]
        out[p + "self_attn.o_proj.weight"] = [h, h]
        out[p + "mlp.gate_proj.weight"] = [TEXT["intermediate"], h]
        out[p + "mlp.up_proj.weight"] = [TEXT["intermediate"], h]
        out[p + "mlp.down_proj.weight"] = [h, TEXT["intermediate"]]
        out[p + "input_layernorm.weight"] = [h]
        out[p + "post_attention_layernorm.weight"] = [h]
    out["model.norm.weight"] = [h]
    if not TIED:
        out["lm_head.weight"] = [TEXT["vocab"], h]


def published_shapes() -> Shapes:
    out: Shapes = {}
    vision_tower(out)
    projector(out, DIMS[-1] * CLS_RATIO)
    qwen2(out)
    return out


def main() -> None:
    shapes = published_shapes()
    config = {
        "model_type": "llava_qwen2",
        "architectures": ["LlavaQwen2ForCausalLM"],
        "hidden_size": TEXT["hidden"],
        "intermediate_size": TEXT["intermediate"],
        "num_hidden_layers": TEXT["layers"],
        "num_attention_heads": TEXT["heads"],
        "num_key_value_heads": TEXT["kv_heads"],
        "vocab_size": TEXT["vocab"],
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": TIED,
        "mm_vision_tower": "mobileclip_l_1024",
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": DIMS[-1] * CLS_RATIO,
        "image_aspect_ratio": "pad",
        "tokenizer_model_max_length": 8192,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    }
    # One tensor a line, so a diff shows exactly which names or shapes changed.
    rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in shapes.items())
    head = json.dumps({"checkpoint": "apple/FastVLM-0.5B", "config": config})[:-1]
    path = Path(__file__).with_name("apple_fastvlm_0.5b_keys.json")
    path.write_text(head + ', "tensors": {\n' + rows + "\n}}\n")
    tower = sum(k.startswith(TOWER) for k in shapes)
    print(f"wrote {len(shapes)} tensors ({tower} in the vision tower) to {path}")


if __name__ == "__main__":
    main()
