"""LoRA training step time and peak memory: fastvlm finetune's step vs transformers + PEFT.

Writes a random-weight checkpoint (transformers layout) of the chosen shape, then runs
each side in a fresh subprocess, with gradient checkpointing off and on: the same batch
(one image, ~300 tokens of which the answer is the last ``--answer-tokens``), LoRA r=8 on
q,k,v,o,gate,up,down, the projector trained whole, AdamW, bf16 autocast. Reports the
median wall and CPU time of ``--steps`` timed steps (after one warm-up step; on a shared
machine CPU time is the steadier figure) and the peak resident set (VmHWM). Prints a
table and ends with one JSON line.

    python benchmarks/finetune.py [--size 0.5b|tiny] [--image-size 1024] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, statistics, sys, time, torch
side, folder, image_size, tokens, answer, steps, ckpt = sys.argv[1:8]
image_size, tokens, answer, steps, ckpt = int(image_size), int(tokens), int(answer), int(steps), ckpt == "1"
torch.manual_seed(0)
n_image = (image_size // 64) ** 2
text = torch.randint(0, 150000, (1, tokens - n_image))
ids = torch.cat([text[:, :5], torch.full((1, n_image), 151646), text[:, 5:]], dim=1)
labels = torch.full_like(ids, -100)
labels[:, -answer:] = ids[:, -answer:]
pixels = torch.rand(1, 3, image_size, image_size)
mask = torch.ones_like(ids)
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
if side == "transformers":
    from peft import LoraConfig, get_peft_model
    from transformers import FastVlmForConditionalGeneration
    model = FastVlmForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=targets,
                        modules_to_save=["multi_modal_projector"])
    model = get_peft_model(model, config)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    def loss_fn():
        return model(input_ids=ids, attention_mask=mask, pixel_values=pixels.bfloat16(), labels=labels).loss
else:
    from fastvlm.checkpoints.loader import load_model
    from fastvlm.checkpoints.adapter import LoraSettings
    from fastvlm.training.lora import add_lora, channels_last_vision, set_trainable
    from fastvlm.training.loop import TargetLoss
    from fastvlm.training.lora import enable_checkpointing
    base = load_model(folder, dtype=torch.bfloat16, device="cpu", progress=False)
    add_lora(base, LoraSettings())
    set_trainable(base, full=False, projector=True, vision=False)
    channels_last_vision(base)
    if ckpt:
        enable_checkpointing(base)
    model = TargetLoss(base).train()
    n = int((labels[:, 1:] != -100).sum())
    def loss_fn():
        return model(ids, mask, labels, pixels) / n
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4)
times, cpu, losses = [], [], []
for step in range(steps + 1):
    start, start_cpu = time.perf_counter(), time.process_time()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
    losses.append(float(loss))
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
result = {"step_s": statistics.median(times[1:]), "cpu_s": statistics.median(cpu[1:]), "peak_rss_mib": peak}
print(json.dumps({**result, "losses": losses}))
"""


def write_checkpoint(folder: Path, size: str) -> None:
    import torch

    from fastvlm.bench.sides import SIZES, reference_from_config
    from fastvlm.config import TextConfig

    text = SIZES[size] if size in SIZES else TextConfig(152000, 64, 96, 2, 4, 2, tie_word_embeddings=True)
    reference_from_config(text, torch.bfloat16).save_pretrained(folder)


def run_side(side: str, folder: Path, args, checkpointing: bool) -> dict:
    argv = [
        side,
        str(folder),
        args.image_size,
        args.tokens,
        args.answer_tokens,
        args.steps,
        int(checkpointing),
    ]
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, argv)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"{side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="0.5b", help="0.5b, 1.5b, 7b (decoder shapes) or tiny")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=300, help="row length, image tokens included")
    parser.add_argument("--answer-tokens", type=int, default=32, help="labelled tokens at the end of the row")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_checkpoint(folder, args.size)
        for checkpointing in (False, True):
            for side in ("transformers", "fastvlm"):
                results[f"{side}{' +ckpt' if checkpointing else ''}"] = run_side(
                    side, folder, args, checkpointing
                )
    print(
        f"# LoRA step, {args.size} shape, bf16 autocast, batch 1, {args.image_size}px image, "
        f"{args.tokens} tokens ({args.answer_tokens} labelled), median of {args.steps} steps"
    )
    print("| side | gradient checkpointing | step (s) | CPU time (s) | peak RSS (MiB) | step-0 loss |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        side, ckpt = name.split(" ")[0], "on" if "+ckpt" in name else "off"
        row = f"| {side} | {ckpt} | {r['step_s']:.3f} | {r['cpu_s']:.3f} | {r['peak_rss_mib']:.0f} |"
        print(row + f" {r['losses'][0]:.4f} |")
    ratios = {}
    for suffix in ("", " +ckpt"):
        ref, ours = results["transformers" + suffix], results["fastvlm" + suffix]
        key = "checkpointing" if suffix else "plain"
        ratios[key] = {
            "speedup": ref["step_s"] / ours["step_s"],
            "cpu_speedup": ref["cpu_s"] / ours["cpu_s"],
            "memory_ratio": ours["peak_rss_mib"] / ref["peak_rss_mib"],
        }
    print(
        json.dumps({"size": args.size, "image_size": args.image_size, "results": results, "ratios": ratios})
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
