"""Parity report: our model against transformers' FastVLM on the same random weights.

Builds the same tiny checkpoints the test suite uses (fused and training-form towers,
both checkpoint layouts), runs both implementations in float32 and prints the largest
relative difference, max |ours - ref| / max |ref|, per output plus greedy token
equality. The last line is one JSON object.

    python benchmarks/parity.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import builders  # noqa: E402
from fastvlm import FastVLM  # noqa: E402

N_IMG = (builders.IMAGE_SIZE // 64) ** 2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def prompt(g: torch.Generator, n_text: int, image_id: int) -> torch.Tensor:
    ids = torch.randint(3, 900, (n_text,), generator=g)
    return torch.cat([ids[:2], torch.full((N_IMG,), image_id), ids[2:]])


def compare(ours, ref, image_id: int, ref_image_id: int) -> dict:
    g = torch.Generator().manual_seed(0)
    px = torch.rand(2, 3, builders.IMAGE_SIZE, builders.IMAGE_SIZE, generator=g)
    a, b = prompt(g, 12, image_id), prompt(g, 5, image_id)
    ids = torch.full((2, len(a)), 0)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate((a, b)):
        ids[row, len(a) - len(seq) :], mask[row, len(a) - len(seq) :] = seq, 1
    ref_ids = ids.masked_fill(ids == image_id, ref_image_id)
    text = torch.randint(3, 900, (1, 9), generator=g)
    labels = ref_ids[:1].masked_fill(ref_ids[:1] == ref_image_id, -100)
    out = {}
    out["image_features"] = rel(ours.encode_images(px), ref.model.get_image_features(px).pooler_output)
    mine, theirs = (
        ours(ids[:1], pixel_values=px[:1], labels=labels),
        ref(ref_ids[:1], pixel_values=px[:1], labels=labels),
    )
    out["logits_single"] = rel(mine.logits, theirs.logits)
    out["loss"] = abs(float(mine.loss) - float(theirs.loss)) / abs(float(theirs.loss))
    real = mask.bool()
    out["logits_left_padded_batch"] = rel(
        ours(ids, pixel_values=px, attention_mask=mask).logits[real],
        ref(ref_ids, pixel_values=px, attention_mask=mask).logits[real],
    )
    out["logits_text_only"] = rel(ours(text).logits, ref(text).logits)
    same = []
    for kw, ref_kw in [
        ({"input_ids": ids[:1], "pixel_values": px[:1]}, {"input_ids": ref_ids[:1], "pixel_values": px[:1]}),
        (
            {"input_ids": ids, "attention_mask": mask, "pixel_values": px},
            {"input_ids": ref_ids, "attention_mask": mask, "pixel_values": px},
        ),
        ({"input_ids": text}, {"input_ids": text}),
    ]:
        mine_ids = ours.generate(**kw, max_new_tokens=16)
        their_ids = ref.generate(**ref_kw, max_new_tokens=16, do_sample=False)
        same.append(mine_ids[:, -16:].tolist() == their_ids[:, -16:].tolist())
    out["greedy_tokens_identical"] = all(same)
    return out


def main() -> int:
    torch.set_grad_enabled(False)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fused, layout in [
            ("fast_vlm fused", True, "hf"),
            ("fast_vlm training-form", False, "hf"),
            ("llava_qwen2 fused", True, "apple"),
            ("llava_qwen2 training-form", False, "apple"),
        ]:
            ref = builders.build_reference(fused=fused, seed=1)
            folder = Path(tmp) / name.replace(" ", "_")
            if layout == "hf":
                builders.save_reference(ref, folder)
            else:
                builders.save_apple(ref, folder)
            ours = FastVLM.from_pretrained(folder, dtype=torch.float32, device="cpu", progress=False)
            results[name] = compare(ours, ref, ours.config.image_token_id, ref.config.image_token_id)
    keys = list(next(iter(results.values())))
    print("| output | " + " | ".join(results) + " |")
    print("|---" * (len(results) + 1) + "|")
    for key in keys:
        cells = [
            ("yes" if v[key] else "NO") if isinstance(v[key], bool) else f"{v[key]:.1e}"
            for v in results.values()
        ]
        print(f"| {key} | " + " | ".join(cells) + " |")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
