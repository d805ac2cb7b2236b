"""Inference and training throughput (images/s, and per core as the paper reports it).

Both functions run warm-up iterations first (allocator, kernel selection, lazy init), then time
each repeat separately around a device synchronisation, so a GPU's asynchronous queue is
drained inside the timed region. ``images_per_s`` = images of the timed repeats / their total
time; ``ms_per_batch`` = median repeat time. Per core: on CPU divided by the intra-op threads
torch used; on GPU it is per GPU (one device). The clock can be replaced (``timer``) to check
the bookkeeping without timing anything.
"""
from __future__ import annotations

import copy
import inspect
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..models.modes import eval_mode
from ..optim import SAM, train_step

Timer = Callable[[], float]


def _device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available; use device='cpu'")
    return dev


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (CPU)."""
    if threads is None:
        yield
        return
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _check_counts(batch_size: int, img_size: int, in_chans: int, warmup: int, repeats: int) -> None:
    for name, v, low in (("batch_size", batch_size, 1), ("img_size", img_size, 1), ("in_chans", in_chans, 1),
                         ("warmup", warmup, 0), ("repeats", repeats, 1)):
        if not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")


def _summary(times: list[float], batch_size: int, dev: torch.device, settings: dict[str, Any]) -> dict[str, Any]:
    total = sum(times)
    if total <= 0:
        raise ValueError("the timer measured no time; use a clock with finer resolution")
    ips = batch_size * len(times) / total
    cores = torch.get_num_threads() if dev.type == "cpu" else 1
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "images_per_s": ips,
        "images_per_s_per_core": ips / cores,
        "ms_per_batch": 1000 * statistics.median(times),
        "settings": {**settings, "device": str(dev), "device_name": device_name, "threads": torch.get_num_threads(),
                     "per_core_divisor": cores, "images_timed": batch_size * len(times),
                     "torch": torch.__version__},
    }


@torch.no_grad()
def inference_throughput(
    model: nn.Module,
    batch_size: int,
    img_size: int,
    in_chans: int = 3,
    device: str | torch.device = "cpu",
    warmup: int = 2,
    repeats: int = 5,
    threads: int | None = None,
    timer: Timer = time.perf_counter,
) -> dict[str, Any]:
    """Forward-pass throughput of ``model`` in eval mode on random (batch_size, in_chans, img_size, img_size) input.

    Returns ``{images_per_s, images_per_s_per_core, ms_per_batch (median), settings}``. Every
    module's own train/eval mode is restored afterwards; the weights are not touched.
    """
    _check_counts(batch_size, img_size, in_chans, warmup, repeats)
    dev = _device(device)
    with eval_mode(model), _threads(threads):
        x = torch.randn(batch_size, in_chans, img_size, img_size, generator=torch.Generator().manual_seed(0)).to(dev)
        for _ in range(warmup):
            model(x)
        _sync(dev)
        times = []
        for _ in range(repeats):
            t0 = timer()
            model(x)
            _sync(dev)
            times.append(timer() - t0)
        settings = {"mode": "inference", "batch_size": batch_size, "img_size": img_size, "in_chans": in_chans,
                    "warmup": warmup, "repeats": repeats}
        return _summary(times, batch_size, dev, settings)


def _constructor_kwargs(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimiser's settings that its constructor accepts (``defaults`` can hold internal keys)."""
    accepted = inspect.signature(type(opt).__init__).parameters
    return {k: v for k, v in opt.defaults.items() if k in accepted}


def training_throughput(
    model: nn.Module,
    optimizer_factory: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    batch_size: int,
    img_size: int,
    in_chans: int = 3,
    sam: bool = False,
    steps: int = 5,
    warmup: int = 2,
    device: str | torch.device = "cpu",
    rho: float = 0.05,
    num_classes: int | None = None,
    threads: int | None = None,
    timer: Timer = time.perf_counter,
) -> dict[str, Any]:
    """Throughput of full training steps (forward, backward, update), without or with SAM.

    ``optimizer_factory(params)`` builds the base optimiser (e.g. ``lambda p: torch.optim.AdamW(p, lr=1e-3)``).
    With ``sam`` it is wrapped in ``vitsam.optim.SAM`` (same class and settings, radius ``rho``);
    each step is ``vitsam.optim.train_step``, as in training. A deep copy of ``model`` is trained,
    so the caller's weights are unchanged. Returns the keys of ``inference_throughput`` with
    ``steps`` as repeats, plus ``settings['sam']``.
    """
    _check_counts(batch_size, img_size, in_chans, warmup, steps)
    if sam and not rho > 0:
        raise ValueError(f"rho must be > 0 with SAM, got {rho}")
    dev = _device(device)
    net = copy.deepcopy(model).to(dev).train()
    base = optimizer_factory(net.parameters())
    if not isinstance(base, torch.optim.Optimizer):
        raise ValueError("optimizer_factory must return a torch.optim.Optimizer, e.g. lambda p: torch.optim.SGD(p, lr=0.1)")
    if isinstance(base, SAM):
        if not sam:
            raise ValueError("optimizer_factory returned a SAM optimiser but sam=False; return the base "
                             "optimiser and choose with sam=True/False")
        opt = base
    elif sam:
        opt = SAM(net.parameters(), type(base), rho=rho, **_constructor_kwargs(base))
    else:
        opt = base
    with _threads(threads):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch_size, in_chans, img_size, img_size, generator=gen).to(dev)
        with torch.no_grad():
            classes = num_classes or net(x[:1]).shape[1]
        y = torch.randint(0, classes, (batch_size,), generator=gen).to(dev)
        criterion = nn.CrossEntropyLoss()

        def one_step() -> None:
            train_step(net, criterion, x, y, opt)

        for _ in range(warmup):
            one_step()
        _sync(dev)
        times = []
        for _ in range(steps):
            t0 = timer()
            one_step()
            _sync(dev)
            times.append(timer() - t0)
        settings = {"mode": "training", "sam": sam, "rho": rho if sam else None, "batch_size": batch_size,
                    "img_size": img_size, "in_chans": in_chans, "warmup": warmup, "repeats": steps,
                    "optimizer": type(opt).__name__}
        return _summary(times, batch_size, dev, settings)


def sam_overhead(model: nn.Module, optimizer_factory: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
                 batch_size: int, img_size: int, in_chans: int = 3, **kwargs: Any) -> dict[str, Any]:
    """Training throughput without and with SAM, and their ratio (SAM costs about 2x)."""
    plain = training_throughput(model, optimizer_factory, batch_size, img_size, in_chans, sam=False, **kwargs)
    with_sam = training_throughput(model, optimizer_factory, batch_size, img_size, in_chans, sam=True, **kwargs)
    return {"plain": plain, "sam": with_sam, "slowdown": plain["images_per_s"] / with_sam["images_per_s"]}
