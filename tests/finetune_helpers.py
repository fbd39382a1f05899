"""Small datasets and runners shared by the fine-tuning tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastvlm import cli

CPU = ["--device", "cpu", "--dtype", "float32"]


def write_dataset(folder: Path, n: int = 8, *, name: str = "train.jsonl", text_only_every: int = 0) -> Path:
    """``n`` LLaVA-style rows: a small solid-colour image, a question, one shared answer
    (a random tiny model can memorise it in a few steps)."""
    from PIL import Image

    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (40, 32), (29 * i % 256, 255 - 23 * i % 256, 90)).save(folder / "img" / f"{i}.png")
        turns = [
            {"from": "human", "value": f"<image>\nDescribe picture {i}."},
            {"from": "gpt", "value": "It is one plain colour."},
        ]
        row = {"conversations": turns, "image": f"img/{i}.png"}
        if text_only_every and i % text_only_every == 0:
            del row["image"]
            turns[0]["value"] = turns[0]["value"].removeprefix("<image>\n")
        rows.append(row)
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def finetune(ckpt: Path, data: Path, out: Path, *extra: str) -> int:
    return cli.main(
        ["finetune", "--model", str(ckpt), "--data", str(data), "--output", str(out), *CPU, *extra]
    )


def losses(out: Path) -> list[float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


def image_inputs(processor, image: Path):
    conv = [
        {"role": "user", "content": [{"type": "image", "path": str(image)}, {"type": "text", "text": "Hi"}]}
    ]
    return processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)


def ours_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


def hf_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())
