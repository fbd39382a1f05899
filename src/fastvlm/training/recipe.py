"""The fine-tuning recipe: check everything, load, choose what learns, loop, save.

Defaults follow Apple's stage-2 recipe made cheap: LoRA on the decoder's projections,
the projector trained whole, the vision tower frozen. All user input is checked (data
rows, targets, output folder) before the model is loaded or anything is written.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from ..checkpoints.adapter import LoraSettings, save_adapter
from ..device import resolve_device, resolve_dtype
from ..errors import InputError
from .data import collate, load_examples
from .distributed import World, barrier, init_world, local_device, shutdown, wrap
from .loop import LoopSettings, TargetLoss, Trainer, progress_bar, steps_per_epoch, trim_metrics
from .lora import (
    add_lora,
    channels_last_vision,
    check_targets,
    enable_checkpointing,
    lora_tensors,
    set_trainable,
)
from .state import checkpoint_dir, load_state, save_state


@dataclass
class FinetuneConfig:
    model: str
    data: Path
    output: Path
    image_folder: Path | None = None
    full: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)
    train_projector: bool = True
    train_vision: bool = False
    epochs: int = 1
    max_steps: int | None = None
    lr: float = 2e-4
    warmup_steps: int = 0
    batch_size: int = 1
    grad_accum: int = 1
    max_length: int = 2048
    gradient_checkpointing: bool = False
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    eval_data: Path | None = None
    eval_every: int = 0
    save_every: int = 0
    resume: bool = False
    merge: bool = False
    skip_bad_rows: bool = False
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("warmup_steps", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise InputError(f"--{name.replace('_', '-')} must not be negative")
        if self.max_steps is not None and self.max_steps < 1:
            raise InputError("--max-steps must be at least 1")
        if not self.lr > 0:
            raise InputError("--lr must be positive")
        if self.lora.r < 1 or not 0 <= self.lora.dropout < 1:
            raise InputError("--lora-rank must be >= 1 and --lora-dropout in [0, 1)")
        self.lora.targets = check_targets(list(self.lora.targets))
        if self.merge and self.full:
            raise InputError("--merge applies to LoRA; --full already writes a full checkpoint")


def finetune(cfg: FinetuneConfig) -> dict:
    """Run the recipe; returns a summary (steps, first and last loss, output files)."""
    from ..processing import FastVLMProcessor

    device = resolve_device(cfg.device)
    world = init_world(device)
    try:
        device = local_device(device, world)
        processor = FastVLMProcessor.from_pretrained(cfg.model)
        load = partial(
            load_examples,
            processor=processor,
            image_folder=cfg.image_folder,
            max_length=cfg.max_length,
            skip_bad_rows=cfg.skip_bad_rows,
        )
        train_rows = load(cfg.data)
        eval_rows = load(cfg.eval_data) if cfg.eval_data is not None else []
        settings = _loop_settings(cfg, len(train_rows), world)
        _check_output(cfg)
        model, trained_whole = _build_model(cfg, device)
        return _train(cfg, model, trained_whole, processor, train_rows, eval_rows, settings, world, device)
    finally:
        shutdown(world)


def _loop_settings(cfg: FinetuneConfig, n_rows: int, world: World) -> LoopSettings:
    global_batch = cfg.batch_size * cfg.grad_accum * world.size
    per_epoch = steps_per_epoch(n_rows, global_batch)
    if per_epoch == 0:
        raise InputError(
            f"{cfg.data} has {n_rows} usable rows, fewer than one global batch of {global_batch}"
        )
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * per_epoch
    return LoopSettings(
        lr=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        total_steps=total,
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        seed=cfg.seed,
        max_grad_norm=cfg.max_grad_norm,
        eval_every=cfg.eval_every,
        save_every=cfg.save_every,
    )


def _check_output(cfg: FinetuneConfig) -> None:
    if cfg.output.exists() and not cfg.output.is_dir():
        raise InputError(f"--output {cfg.output} is a file; pass a folder")
    has_checkpoint = (checkpoint_dir(cfg.output) / "state.json").is_file()
    if has_checkpoint and not cfg.resume:
        raise InputError(
            f"{cfg.output} already holds a training checkpoint; pass --resume or another --output"
        )
    if cfg.resume and not has_checkpoint:
        raise InputError(f"--resume: {cfg.output} has no checkpoint to continue from; drop --resume to start")


def _build_model(cfg: FinetuneConfig, device: torch.device):
    """The plain model (no fused projections: LoRA wraps q/k/v and gate/up separately)."""
    from ..checkpoints.loader import load_model
    from .export import check_writable

    dtype = torch.float32 if cfg.full else resolve_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)  # LoRA's initial A matrices; DDP then copies rank 0's to all
    model = load_model(cfg.model, dtype=dtype, device=device, progress=cfg.progress)
    if cfg.full or cfg.train_vision:
        check_writable(cfg.model, [n for n, _ in model.vision_tower.named_parameters(prefix="vision_tower")])
    if not cfg.full:
        add_lora(model, cfg.lora)
    whole = set_trainable(model, full=cfg.full, projector=cfg.train_projector, vision=cfg.train_vision)
    channels_last_vision(model)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    return model, whole


def _autocast_dtype(cfg: FinetuneConfig, device: torch.device) -> torch.dtype | None:
    dtype = resolve_dtype(cfg.dtype, device)
    return None if dtype == torch.float32 else dtype


def _train(
    cfg, model, trained_whole, processor, train_rows, eval_rows, s: LoopSettings, world, device
) -> dict:
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    meta = {"seed": cfg.seed, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum}
    meta.update(world_size=world.size, full=cfg.full)
    start = _start(cfg, model, optimizer, meta, world)
    pad_id = processor.tokenizer.pad_token_id or 0
    batches = partial(collate, processor=processor, pad_id=pad_id)
    metrics = cfg.output / "metrics.jsonl"
    trainer = Trainer(
        wrap(TargetLoss(model), world, device),
        optimizer,
        batches,
        s,
        world,
        device,
        _autocast_dtype(cfg, device),
        metrics,
    )
    losses = []
    bar = progress_bar(s.total_steps, start, cfg.progress and world.is_main)
    for step in range(start, s.total_steps):
        record = trainer.train_step(step, train_rows)
        losses.append(record["loss"])
        trainer.log(record)
        bar.set_postfix(
            loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}"
        )
        bar.update(1)
        done = step + 1
        if done < s.total_steps and eval_rows and s.eval_every and done % s.eval_every == 0:
            trainer.log({"step": done, "eval_loss": trainer.evaluate(eval_rows)})
        if done < s.total_steps and s.save_every and done % s.save_every == 0:
            _save_checkpoint(cfg, model, optimizer, done, meta, world)
    bar.close()
    summary = {"steps": s.total_steps, "losses": losses}
    if eval_rows:
        summary["eval_loss"] = trainer.evaluate(eval_rows)
        trainer.log({"step": s.total_steps, "eval_loss": summary["eval_loss"]})
    _save_checkpoint(cfg, model, optimizer, s.total_steps, meta, world)
    if world.is_main:
        summary["output"] = str(_save_result(cfg, model, trained_whole))
    barrier(world)
    return summary


def _start(cfg: FinetuneConfig, model, optimizer, meta: dict, world: World) -> int:
    """The step to begin at: 0, or the checkpoint's with ``--resume`` (later log lines dropped)."""
    cfg.output.mkdir(parents=True, exist_ok=True)
    metrics = cfg.output / "metrics.jsonl"
    if not cfg.resume:
        if world.is_main:
            metrics.unlink(missing_ok=True)
        return 0
    start = load_state(cfg.output, model, optimizer, meta)
    if world.is_main:
        trim_metrics(metrics, start)
    return start


def _save_checkpoint(cfg, model, optimizer, step: int, meta: dict, world: World) -> None:
    if world.is_main:
        save_state(cfg.output, model, optimizer, step, meta)
    barrier(world)


def _save_result(cfg: FinetuneConfig, model, trained_whole: list[str]) -> Path:
    from .export import merge_to_checkpoint, write_checkpoint

    if cfg.full:
        return write_checkpoint(cfg.model, cfg.output, dict(model.named_parameters()))
    tensors = dict(lora_tensors(model))
    for name, param in model.named_parameters():
        if name.split(".", 1)[0] in trained_whole:
            tensors[name] = param
    cfg.lora.modules_to_save = tuple(trained_whole)
    save_adapter(cfg.output, tensors, cfg.lora, str(cfg.model))
    if cfg.merge:
        merge_to_checkpoint(cfg.model, cfg.output, cfg.output / "merged")
        print(f"merged checkpoint written to {cfg.output / 'merged'}", file=sys.stderr)
    return cfg.output
