"""The training loop in plain sight: forward, loss, backward, clip, step, schedule, log.

One optimiser step sees a global batch of ``batch_size * grad_accum * world_size`` rows.
The loss is the mean over every target token of that global batch, whatever its split
into micro-batches and processes, so N processes give the losses of one. Data order is
a seeded permutation per epoch and dropout is reseeded per (step, rank): the step number
alone says where a run is, which makes ``--resume`` exact.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..models.fastvlm import causal_padding_mask
from .data import IGNORE, Example
from .distributed import World, all_sum, no_sync


@dataclass(frozen=True)
class LoopSettings:
    lr: float
    warmup_steps: int
    total_steps: int
    batch_size: int
    grad_accum: int
    seed: int
    max_grad_norm: float = 1.0
    eval_every: int = 0
    save_every: int = 0


def lr_at(step: int, s: LoopSettings) -> float:
    """Linear warmup to ``lr``, then cosine decay to zero at ``total_steps``."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.total_steps - s.warmup_steps)
    return s.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def steps_per_epoch(n_rows: int, global_batch: int) -> int:
    return n_rows // global_batch


def step_rows(step: int, n_rows: int, s: LoopSettings, world: World) -> list[list[int]]:
    """This rank's micro-batches (row indices) for optimiser step ``step``."""
    global_batch = s.batch_size * s.grad_accum * world.size
    per_epoch = steps_per_epoch(n_rows, global_batch)
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(s.seed + epoch)).tolist()
    rows = order[index * global_batch : (index + 1) * global_batch]
    B, W = s.batch_size, world.size
    return [rows[(a * W + world.rank) * B : (a * W + world.rank + 1) * B] for a in range(s.grad_accum)]


class TargetLoss(nn.Module):
    """The model's forward with the LM head run only where a label is predicted.

    Answers are a small part of a row (the image alone is 256 positions), and the head is
    the widest matmul of a small model: skipping it (and its float32 logits) elsewhere
    saves time and memory without changing the loss. DDP wraps this module.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels, pixel_values=None) -> torch.Tensor:
        m = self.model
        input_ids = input_ids.to(m.device)
        B, T = input_ids.shape
        features = m.encode_images(pixel_values) if pixel_values is not None else None
        embeds = m.embed(input_ids, features)  # (B, T, D)
        positions = torch.arange(T, device=m.device).expand(B, T)
        # No padding (one row, or rows of equal length): plain causal attention, SDPA's fast path.
        mask = None if bool(attention_mask.all()) else causal_padding_mask(attention_mask.to(m.device))
        hidden = m.language_model(embeds, positions, mask)
        shifted = F.pad(labels.to(m.device), (0, 1), value=IGNORE)[:, 1:]  # (B, T): t predicts t + 1
        keep = shifted != IGNORE
        logits = m.logits(hidden[keep])  # (n_targets, V)
        return F.cross_entropy(logits.float(), shifted[keep], reduction="sum")


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


class Trainer:
    """Owns the model (maybe DDP-wrapped), the optimiser and the metrics file."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        collate: Callable[[list[Example]], dict[str, torch.Tensor]],
        settings: LoopSettings,
        world: World,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        metrics_path: Path | None,
    ) -> None:
        self.model, self.optimizer, self.collate, self.s = model, optimizer, collate, settings
        self.world, self.device, self.autocast_dtype = world, device, autocast_dtype
        self.metrics_path = metrics_path
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self._autocast():
            return self.model(**{k: v.to(self.device) for k, v in batch.items()})

    @torch.enable_grad()  # whatever the caller's mode: training in a no_grad context is still training
    def train_step(self, step: int, examples: list[Example]) -> dict[str, float]:
        """One optimiser step over this rank's micro-batches; returns the logged numbers."""
        start = time.perf_counter()
        torch.manual_seed(self.s.seed * 1_000_003 + step * self.world.size + self.world.rank)  # dropout
        micro = [
            self.collate([examples[i] for i in rows])
            for rows in step_rows(step, len(examples), self.s, self.world)
        ]
        local = [
            float(sum(count_targets(b) for b in micro)),
            float(sum(int(b["attention_mask"].sum()) for b in micro)),
        ]
        targets, tokens = all_sum(local, self.world, self.device)
        lr = lr_at(step, self.s)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for a, batch in enumerate(micro):
            with no_sync(self.model, a < len(micro) - 1):
                summed = self._forward(batch)
                # DDP averages gradients over ranks; scaling by size makes that a global-token mean.
                (summed * (self.world.size / max(targets, 1.0))).backward()
            total += float(summed.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.s.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        (loss,) = all_sum([total], self.world, self.device)
        elapsed = time.perf_counter() - start
        return {
            "step": step + 1,
            "loss": loss / max(targets, 1.0),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens": int(tokens),
            "tokens_per_s": tokens / elapsed,
        }

    @torch.no_grad()
    def evaluate(self, examples: list[Example]) -> float:
        """Mean target-token loss over ``examples``, sharded across ranks."""
        self.model.eval()
        mine = examples[self.world.rank :: self.world.size]
        summed, targets = 0.0, 0.0
        for i in range(0, len(mine), self.s.batch_size):
            batch = self.collate(mine[i : i + self.s.batch_size])
            summed += float(self._forward(batch))
            targets += count_targets(batch)
        self.model.train()
        summed, targets = all_sum([summed, targets], self.world, self.device)
        return summed / max(targets, 1.0)

    def log(self, record: dict) -> None:
        if self.metrics_path is not None and self.world.is_main:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def trim_metrics(path: Path, upto_step: int) -> None:
    """On resume, drop logged lines from steps after the checkpoint (they will be redone)."""
    if not path.is_file():
        return
    keep = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if json.loads(line)["step"] <= upto_step
    ]
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def progress_bar(total: int, start: int, enabled: bool):
    """A tqdm bar over optimiser steps (off on other ranks and when stderr is not a terminal)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=start, desc="fine-tuning", unit="step", disable=not enabled, dynamic_ncols=True
    )
