"""Where a model runs and in which precision: one rule for every room (ARCHITECTURE.md, "Devices").

* Code that runs a model takes a ``device``. Inside a Ray Train worker it is
  ``ray.train.torch.get_device()`` (the backends pass it down); everywhere else it is an
  explicit argument whose default, :func:`default_device`, is CUDA when this process sees a
  GPU (``torch.device("cuda")``, i.e. the current device of this process: Ray sets
  ``CUDA_VISIBLE_DEVICES`` per worker), else the CPU. Never a hard-coded ``cuda:0``.
* Precision is one of ``fp32``, ``bf16``, ``fp16`` (``auto``: bf16 on a GPU that supports it,
  fp32 otherwise, see :func:`resolve_precision`). Mixed precision is ``torch.autocast`` around
  the forward pass (:func:`autocast`); fp16 also scales the loss (:func:`grad_scaler`).
* Batches move to the device with :func:`move_batch`: pinned host memory and ``non_blocking``
  copies when the target is CUDA; uint8 images travel as uint8 (4x fewer bytes) and become
  float in [0, 1] on the device, the same values :func:`fewshot.model.batches.decode_row_image`
  gives on the CPU.

Math layer: torch only.
"""
from __future__ import annotations

import contextlib
from typing import Literal, Mapping, Sequence

import torch

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_device() -> torch.device:
    """CUDA when this process sees a GPU, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a ``torch.device``; None -> :func:`default_device`."""
    return default_device() if device is None else torch.device(device)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return device.type == "cpu"


def resolve_precision(precision: str | None, device: str | torch.device) -> str:
    """The concrete precision (fp32/bf16/fp16) a run on ``device`` uses.

    ``auto`` (or None): bf16 on a CUDA device that supports it, fp32 everywhere else (on a
    CPU, bf16 autocast is slower than fp32 for this detector and changes results). fp16 needs
    CUDA (its loss scaling is a GPU feature)."""
    device = torch.device(device)
    precision = precision or "auto"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" and bf16_supported(device) else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"--precision fp16 needs a CUDA device (this run is on {device}); use bf16 or fp32")
    if precision == "bf16" and not bf16_supported(device):
        raise ValueError(f"--precision bf16 is not supported on {device}; use fp16 or fp32")
    return precision


def autocast(device: str | torch.device, precision: str):
    """The forward-pass context of ``precision`` on ``device`` (a no-op for fp32)."""
    device = torch.device(device)
    if precision == "fp32" or device.type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(device: str | torch.device, precision: str) -> "torch.amp.GradScaler | None":
    """A loss scaler for fp16 (gradients of small losses underflow in half precision), else None."""
    device = torch.device(device)
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def configure_backends(device: str | torch.device) -> None:
    """Per-process speed settings for ``device``: cuDNN autotuning (the detector's transform
    resizes every image to a fixed size range, so few shapes recur) and TF32 matmuls for the
    fp32 parts on Ampere and later."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _to(t: torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
    if pin and t.device.type == "cpu":
        if not t.is_pinned():
            t = t.pin_memory()
        t = t.to(device, non_blocking=True)
    else:
        t = t.to(device)
    return t


def as_model_image(image: torch.Tensor) -> torch.Tensor:
    """uint8 [3, H, W] -> float [0, 1] (what decode_row_image gives); float images unchanged."""
    return image.float().div_(255.0) if image.dtype == torch.uint8 else image


def move_batch(
    images: Sequence[torch.Tensor],
    targets: Sequence[Mapping[str, torch.Tensor]] | None,
    device: str | torch.device,
) -> tuple[list[torch.Tensor], list[dict] | None]:
    """Images and targets on ``device`` (every tensor of every target); uint8 images are
    copied as uint8 and converted to float [0, 1] there. CUDA targets get pinned host memory
    and ``non_blocking`` copies (ordered on the current stream, so the model sees them done)."""
    device = torch.device(device)
    pin = device.type == "cuda"
    moved = [as_model_image(_to(im, device, pin)) for im in images]
    if targets is None:
        return moved, None
    out = [{k: _to(v, device, pin) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
           for t in targets]
    return moved, out


def pin_batch(images: Sequence[torch.Tensor], targets: Sequence[Mapping]) -> tuple[list, list]:
    """The batch in pinned host memory (done by the data thread, so the step's copy is async)."""
    def pin(t):
        return t.pin_memory() if isinstance(t, torch.Tensor) and t.device.type == "cpu" else t

    return [pin(im) for im in images], [{k: pin(v) for k, v in t.items()} for t in targets]


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
