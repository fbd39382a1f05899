"""Key tables: Apple (llava_qwen2) names -> transformers (fast_vlm) names -> ours.

Every checkpoint is first renamed into the transformers layout, then into our
module names by a prefix table. Both directions are plain tables so they can be
read and checked against the published converter.
"""

from __future__ import annotations

import re

import torch

from ..config import VisionConfig

# transformers (fast_vlm) prefix -> our module prefix.
HF_TO_OURS: dict[str, str] = {
    "model.vision_tower.timm_model.": "vision_tower.",
    "model.multi_modal_projector.": "projector.",
    "model.language_model.": "language_model.",
    "lm_head.": "lm_head.",
}

# Apple prefix -> transformers prefix (applied once, first match wins).
APPLE_PREFIXES: dict[str, str] = {
    "model.vision_tower.vision_tower.model.": "model.vision_tower.timm_model.",
    "model.mm_projector.0.": "model.multi_modal_projector.linear_1.",
    "model.mm_projector.2.": "model.multi_modal_projector.linear_2.",
    "model.layers.": "model.language_model.layers.",
    "model.embed_tokens.": "model.language_model.embed_tokens.",
    "model.norm.": "model.language_model.norm.",
    "lm_head.": "lm_head.",
}

# Apple (MobileCLIP) module names -> timm names, inside the vision tower.
APPLE_VISION_RENAMES: list[tuple[str, str]] = [
    (r"^patch_embed\.", "stem."),
    (r"^conv_exp\.", "final_conv."),
    (r"\.lkb_reparam\.", ".reparam_conv."),
    (r"\.lkb_origin\.", ".large_conv."),
    (r"\.rbr_conv\.", ".conv_kxk."),
    (r"\.rbr_scale\.", ".conv_scale."),
    (r"\.rbr_skip\.", ".identity."),
    (r"\.se\.reduce\.", ".se.fc1."),
    (r"\.se\.expand\.", ".se.fc2."),
    (r"\.convffn\.", ".mlp."),
    (r"\.layer_scale(_[12])?$", r".layer_scale\1.gamma"),
]

# Apple keys with no counterpart: the CLIP image projection head.
APPLE_IGNORED = re.compile(r"^model\.vision_tower\.vision_tower\.model\.head\.")


def apple_network_table(cfg: VisionConfig) -> dict[int, str]:
    """Apple's flat ``network.N`` list -> timm ``stages.S`` sub-module prefixes.

    Each stage contributes, in order: its patch embed, its RepCPE, its blocks. For the
    published tower this is 0->stage 0; 1,2->1; 3,4->2; 5,6,7->3; 8,9,10->4.
    """
    table, n = {}, 0
    for s, down in enumerate(cfg.stage_downsamples()):
        if down:
            table[n], n = f"stages.{s}.downsample.", n + 1
        if cfg.pos_embs[s]:
            table[n], n = f"stages.{s}.pos_emb.", n + 1
        table[n], n = f"stages.{s}.blocks.", n + 1
    return table


def apple_to_hf(key: str, network: dict[int, str]) -> str | None:
    """Rename one Apple key into the transformers layout; None for keys to drop."""
    if APPLE_IGNORED.match(key):
        return None
    for old, new in APPLE_PREFIXES.items():
        if key.startswith(old):
            key = new + key[len(old) :]
            break
    prefix = "model.vision_tower.timm_model."
    if not key.startswith(prefix):
        return key
    inner = key[len(prefix) :]
    match = re.match(r"network\.(\d+)\.(.*)$", inner)
    if match:
        target = network.get(int(match.group(1)))
        if target is None:
            return key  # reported later as unexpected
        rest = match.group(2)
        if target.endswith("pos_emb."):
            rest = re.sub(r"^pe\.", "pos_enc.", rest)  # training-form RepCPE
        inner = target + rest
    for pattern, repl in APPLE_VISION_RENAMES:
        inner = re.sub(pattern, repl, inner)
    return prefix + inner


def hf_to_ours(key: str) -> str | None:
    for old, new in HF_TO_OURS.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def ours_to_hf(name: str) -> str:
    """Our module name -> the transformers (fast_vlm) key."""
    for hf, ours in HF_TO_OURS.items():
        if name.startswith(ours):
            return hf + name[len(ours) :]
    raise ValueError(f"no transformers name for {name!r}")


BN_EPS = 1e-5  # timm's BatchNorm2d default, which the loader's folding assumes
_FFN_CONV = re.compile(r"^(vision_tower\..*\.mlp\.conv\.)(weight|bias)$")


def unfold_ffn_conv(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our folded ConvFFN conv -> timm's conv + BatchNorm (identity statistics, our bias).

    Checkpoints and timm keep the BatchNorm; we fold it at load. Other tensors pass as is.
    With running_var = 1 - eps the BatchNorm divides by exactly 1, so it only adds the bias.
    """
    match = _FFN_CONV.match(name)
    if match is None:
        return {name: tensor}
    p = match.group(1)
    if match.group(2) == "weight":
        return {p + "conv.weight": tensor}
    return {
        p + "bn.bias": tensor,
        p + "bn.weight": torch.ones_like(tensor),
        p + "bn.running_mean": torch.zeros_like(tensor),
        p + "bn.running_var": torch.full_like(tensor, 1.0 - BN_EPS),
        p + "bn.num_batches_tracked": torch.tensor(0),
    }
