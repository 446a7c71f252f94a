"""The parts of the benchmarks' training step: trunk and head, 8-bit image, normalisation, peak memory.

Pure torch and torchvision, no ``lightstream`` import: the reference library's worker
(``reference/reference_worker.py``) runs in its own virtual environment, where ``lightstream`` is
the other package of that name, and builds the same step from these.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torchvision import models

MEAN, STD = (0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255)
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def build(model: str, device: str, channels_last: bool = False) -> tuple[nn.Sequential, nn.Module]:
    """A torchvision classifier's trunk (children up to its pooling, eval mode) and a max-pool head."""
    net = getattr(models, model)(weights=None)
    trunk = nn.Sequential(*list(net.children())[:-2]).eval().to(device)
    if channels_last:
        trunk = trunk.to(memory_format=torch.channels_last)
    head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(net.fc.in_features, 2)).to(device)
    return trunk, head


def normalise(image: torch.Tensor) -> torch.Tensor:
    """An 8-bit image as float, normalised by ``MEAN`` and ``STD`` (0–255 scale)."""
    mean = torch.tensor(MEAN, device=image.device).view(1, -1, 1, 1)
    std = torch.tensor(STD, device=image.device).view(1, -1, 1, 1)
    return (image.float() - mean) / std


def make_image(size: int, device: str, channels_last: bool = False, kind: str = "uint8") -> torch.Tensor:
    """A random ``[1, 3, size, size]`` image, 8-bit (as slides are) or float32."""
    if kind == "uint8":
        image = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, device=device)
    else:
        image = torch.randn(1, 3, size, size, device=device)
    return image.to(memory_format=torch.channels_last) if channels_last else image


def peak_memory(device: str) -> float:
    """Peak GiB since the last :func:`reset_peak`: CUDA allocations, or the process's RSS on the CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    match = re.search(r"^VmHWM:\s+(\d+) kB", _PROC_STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise OSError("no VmHWM in /proc/self/status (peak RSS needs Linux)")
    return int(match.group(1)) * 1024 / 2**30


def reset_peak(device: str) -> None:
    """Reset the peak that :func:`peak_memory` reports (the kernel's ``VmHWM`` mark on the CPU)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        _PROC_CLEAR_REFS.write_text("5")
    except OSError as error:
        raise OSError("cannot reset the peak RSS (needs Linux /proc/self/clear_refs)") from error


# ---------------------------------------------------------------- one configuration in a fresh process
StepFactory = Callable[[nn.Sequential, nn.Module, torch.Tensor, dict], Callable[[], torch.Tensor]]


def freeze_batchnorm(trunk: nn.Module) -> None:
    """No gradients for BatchNorm's affine parameters (they are frozen in eval mode anyway);
    the reference library's users freeze them, and its tiles would count their overlap twice."""
    for module in trunk.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.requires_grad_(False)


def run_worker(config: dict, make_step: StepFactory) -> None:
    """Measure one configuration in this process and print the result as one JSON line.

    ``config``: ``model``, ``device``, ``dtype``, ``tile``, ``reps``, ``fixture`` (a file with the
    ``trunk`` and ``head`` state dicts and the ``image``), ``whole`` (the whole-image step's feature
    map and gradients: written when ``save_whole``, else compared with when it exists).
    ``make_step(trunk, head, image, config)`` returns a function running one training step (forward
    and backward of trunk and head) that returns the trunk's output.
    """
    device = config["device"]
    fixture = torch.load(config["fixture"])
    trunk, head = build(config["model"], device)
    trunk.load_state_dict(fixture["trunk"])
    head.load_state_dict(fixture["head"])
    freeze_batchnorm(trunk)
    image = fixture["image"].to(device)
    step = make_step(trunk, head, image, config)
    parameters = [*trunk.parameters(), *head.parameters()]

    first, fmap = timed(step, device)  # kernel selection, caches; its gradients are checked
    grads = {name: p.grad.detach().float().cpu() for name, p in trunk.named_parameters() if p.grad is not None}
    result: dict[str, float | None] = {"first_seconds": first, "grad_diff": None, "fmap_diff": None}
    whole = Path(config["whole"])
    if config.get("save_whole"):
        torch.save({"fmap": fmap.detach().float().cpu(), "grads": grads}, whole)
    elif whole.exists():
        expected = torch.load(whole)
        result["fmap_diff"] = relative_difference(fmap.detach().float().cpu(), expected["fmap"])
        result["grad_diff"] = max(relative_difference(grads.get(name, torch.zeros_like(g)), g)
                                  for name, g in expected["grads"].items())
    del fmap, grads
    for p in parameters:
        p.grad = None

    reset_peak(device)
    baseline = peak_memory(device)  # model, image, libraries and caches, before the timed steps
    seconds = [timed(step, device)[0] for _ in range(config["reps"])]
    peak = peak_memory(device)
    result.update(seconds=statistics.median(seconds), peak_gib=peak, step_gib=peak - baseline)
    print(json.dumps(result))


def timed(step: Callable[[], torch.Tensor], device: str) -> tuple[float, torch.Tensor]:
    """Seconds of one ``step()`` (the device synchronised before and after), and its result."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference relative to ``expected``'s largest magnitude (inf if shapes differ)."""
    if actual.shape != expected.shape:
        return math.inf
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
