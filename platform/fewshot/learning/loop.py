"""One explicit training loop, readable top to bottom (torchvision detection-reference style).

``train`` runs ``steps`` SGD steps over an iterator of (images, targets) batches. The model
returns its loss dict; the loop sums it, steps the optimizer with linear warm-up and cosine
decay, clips gradients, and reports smoothed losses (and whatever the balancer applied) to a
callback every ``log_every`` steps. The same loop serves base training and few-shot fine-tuning
(what trains is decided by requires_grad, see ``fewshot.learning.freezing``), inside or outside Ray.

Devices and precision (:mod:`fewshot.model.devices`): ``train`` takes the device the model runs
on (a Ray Train worker passes ``ray.train.torch.get_device()``; in-process callers an explicit
device, CUDA when available by default) and moves every batch there before the model sees it;
the forward pass runs under autocast at the run's precision (fp16 with a gradient scaler).
A step never waits for the device: losses stay tensors and reach the host once per
``log_every`` steps.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Literal

import torch
from torch import nn

from catalog.progress import progress_bar
from fewshot.model.devices import (
    autocast, configure_backends, grad_scaler, model_device, move_batch, resolve_device, resolve_precision,
)


@dataclass(frozen=True)
class TrainConfig:
    """How one run trains (steps, batch, optimizer, schedule)."""

    steps: int = 600
    """Training steps (per worker)."""
    batch_size: int = 8
    """Images per step (per worker)."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """adamw (from-scratch base training and fine-tuning) or sgd with momentum."""
    lr: float = 1e-3
    """Peak learning rate (after warm-up; cosine decay to lr/50 at the last step)."""
    momentum: float = 0.9
    """SGD momentum (sgd only)."""
    weight_decay: float = 1e-4
    """Weight decay."""
    warmup_steps: int = 50
    """Linear warm-up steps from lr/10, capped at a quarter of the run (see `warmup`)."""
    grad_clip: float = 10.0
    """Clip the gradient norm of the trainable parameters at this value (0: off)."""
    log_every: int = 10
    """Log smoothed losses every this many steps (and report a progress line)."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch size must be at least 1, got {self.steps} and {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"the learning rate must be > 0, got {self.lr}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be at least 1, got {self.log_every}")

    @property
    def warmup(self) -> int:
        """The warm-up actually used: ``warmup_steps``, but at most a quarter of the run, so a
        short run (a Tune trial, a few-shot fine-tune) spends most steps at its own rate."""
        return max(1, min(int(self.warmup_steps), int(self.steps) // 4))

    def to_dict(self) -> dict:
        return asdict(self)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD with momentum over the trainable parameters.

    AdamW is the default: training the small detector from scratch on a CPU budget, it reached
    a higher AP50 than SGD from a third of the images (measured on the embedded world).
    """
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters (check the freezing policy)")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose 'adamw' or 'sgd'")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up from lr/10, then cosine decay to lr/50."""
    warmup = cfg.warmup
    if step < warmup:
        return cfg.lr * (0.1 + 0.9 * step / warmup)
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: list[torch.Tensor],
    targets: list[dict[str, torch.Tensor]],
    grad_clip: float,
    *,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    scaler: "torch.amp.GradScaler | None" = None,
) -> dict[str, torch.Tensor]:
    """One optimizer step; returns the detached losses as tensors on the device (no host sync:
    the caller converts them at its logging interval).

    ``device``: the batch is moved there first (:func:`fewshot.model.devices.move_batch`; None
    leaves it where it is). ``precision``: the forward pass runs under ``torch.autocast`` for
    bf16/fp16; ``scaler`` (fp16) scales the loss and skips steps whose gradients overflowed."""
    if device is not None:
        images, targets = move_batch(images, targets, device)
    model.train()
    with autocast(device if device is not None else model_device(model), precision):
        loss_dict = model(images, targets)
    loss = sum(loss_dict.values())
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(trainable_parameters(model), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    out = {k: v.detach() for k, v in loss_dict.items()}
    out["loss"] = loss.detach()
    return out


def _host(metrics: dict) -> dict[str, float]:
    """Tensors and floats -> floats, with one device sync for all the tensors."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in metrics.items() if not isinstance(v, torch.Tensor)}
    if keys:
        values = torch.stack([metrics[k].detach().float().reshape(()) for k in keys]).tolist()
        out.update(zip(keys, values))
    return out


def train(
    model: nn.Module,
    batches: Iterator[tuple[list[torch.Tensor], list[dict]]],
    cfg: TrainConfig,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    extra_metrics: Callable[[], dict[str, float]] | None = None,
    progress: bool = True,
    start_step: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    device: str | torch.device | None = None,
    precision: str = "auto",
    scaler: "torch.amp.GradScaler | None" = None,
) -> dict[str, float]:
    """Run steps ``start_step``..``cfg.steps``; returns the last smoothed metrics.

    ``device`` (default: CUDA when available, else the CPU; a Ray Train worker passes
    ``ray.train.torch.get_device()``): the model is moved there and every batch is moved there
    before it reaches the model. ``precision``: auto/fp32/bf16/fp16
    (:func:`fewshot.model.devices.resolve_precision`). Losses stay on the device; they are
    brought to the host (one sync), checked for NaN/inf and smoothed-logged every
    ``cfg.log_every`` steps and at the last step."""
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    configure_backends(device)
    model.to(device)
    if scaler is None:
        scaler = grad_scaler(device, precision)
    optimizer = optimizer or make_optimizer(model, cfg)
    smoothed: dict = {}
    host: dict[str, float] = {}
    bar = progress_bar(cfg.steps, "train", "step", initial=start_step, disable=not progress)
    for step in range(start_step, cfg.steps):
        images, targets = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        metrics: dict = train_step(model, optimizer, images, targets, cfg.grad_clip,
                                   device=device, precision=precision, scaler=scaler)
        if extra_metrics is not None:
            metrics.update(extra_metrics())
        for k, v in metrics.items():
            smoothed[k] = v if k not in smoothed else 0.9 * smoothed[k] + 0.1 * v
        bar.update(1)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            host = _host(smoothed)
            if not math.isfinite(host["loss"]):
                raise FloatingPointError(
                    f"the loss became {host['loss']} by step {step + 1} (smoothed losses: {host}); "
                    "lower the learning rate" + ("" if precision == "fp32" else " or train with --precision fp32"))
            bar.set_postfix(loss=f"{host['loss']:.3f}", refresh=False)
            if on_log is not None:
                on_log(step + 1, {**host, "lr": optimizer.param_groups[0]["lr"]})
    bar.close()
    return host
