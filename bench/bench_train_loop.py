"""Training throughput: ``vitsam train``'s step loop against a plain PyTorch loop, in one run.

The plain loop is written the way most users write one: torchvision ``ImageFolder`` on the
CIFAR-10 JPEGs, a ``DataLoader`` with 2 worker processes and transforms v2 (random crop with
4 px padding, flip, to float, normalise), ``torch.optim.AdamW``, cross-entropy. vitsam runs
the calls its training loop makes per step (``vitsam.data.train_batches`` on its uint8 cache
and ``vitsam.train.engine.train_step``) with the ``c10-vit`` preset's settings. Same model
(ViT, width 128, depth 6, 4 heads, patch 4, 32 px), same batch (128), same images.

Also measured in the same run: SAM's step time over the vanilla step time (both vitsam), the
time of one forward + backward alone (the floor SAM pays twice), the machine's fp32 matmul rate
(best of square products, on the same threads), the model's training FLOPs per image
(``torch.utils.flop_counter``, forward + backward) and so the fraction of the matmul rate each
loop reaches; optionally (``--compile``) the vitsam loop with ``train.compile=true``.

    nice -n 10 python bench/bench_train_loop.py --quick        # about 3 minutes on 2 cores
    python bench/bench_train_loop.py --steps 30 --compile --json loop.json

Needs ``../shared/data/cifar10-jpeg.tar.gz`` (or ``$VITSAM_DATA``); skips cleanly without it.
Times are wall-clock per step after warm-up steps, with the process CPU time beside them (the
plain loop's includes its DataLoader workers, read from ``RUSAGE_CHILDREN`` once they exit).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from typing import Any, Callable, Iterator

import torch
from torch import nn

from vitsam.config import apply_overrides
from vitsam.data import train_batches
from vitsam.data import cache, sources
from vitsam.data.config import resolve_cache_dir
from vitsam.data.errors import DataError
from vitsam.models import create_model
from vitsam.presets import get_preset
from vitsam.train import engine

MODEL = ["model.name=vit-t4", "model.kwargs.embed_dim=128", "model.kwargs.depth=6",
         "model.kwargs.num_heads=4", "model.kwargs.patch_size=4"]
BATCH = 128


def cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (DataLoader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(steps: Callable[[], Iterator[None]], warmup: int, n: int) -> dict[str, float]:
    """Wall and CPU seconds per step over ``n`` steps after ``warmup`` steps of ``steps()``;
    CPU time is read after the iterator is closed, so worker processes have exited."""
    it = steps()
    for _ in range(warmup):
        next(it)
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    for _ in range(n):
        next(it)
    wall = time.perf_counter() - t0
    it.close()  # ends the DataLoader: its workers' CPU time joins RUSAGE_CHILDREN
    cpu = cpu_seconds() - cpu0
    return {"step_s": wall / n, "cpu_step_s": cpu / n, "images_per_s": BATCH * n / wall}


# -- the plain loop -------------------------------------------------------------------------

def plain_steps(root: str, mean: tuple, std: tuple, spec: dict[str, Any], seed: int,
                workers: int) -> Callable[[], Iterator[None]]:
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    def run() -> Iterator[None]:
        tf = v2.Compose([v2.ToImage(), v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(),
                         v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
        data = ImageFolder(f"{root}/train", transform=tf)
        loader = DataLoader(data, batch_size=BATCH, shuffle=True, num_workers=workers,
                            drop_last=True, persistent_workers=False)
        torch.manual_seed(seed)
        model = create_model(spec["name"], spec["num_classes"], spec["img_size"],
                             spec["in_chans"], **spec["kwargs"])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        it = iter(loader)
        try:
            while True:
                try:
                    x, y = next(it)
                except StopIteration:
                    it = iter(loader)
                    continue
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
                yield
        finally:
            del it, loader  # shuts the workers down

    return run


# -- vitsam's loop --------------------------------------------------------------------------

def vitsam_steps(tr: engine.Trainer) -> Callable[[], Iterator[None]]:
    """The per-step calls of ``vitsam.train.engine._loop`` (no logging, checkpoints, eval)."""
    def run() -> Iterator[None]:
        tr.model.train()
        epoch = 0
        while True:
            for x, y in train_batches(tr.bundle, BATCH, epoch=epoch, seed=tr.cfg.train.seed,
                                      device=tr.device):
                if tr.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                engine.train_step(tr.net, tr.criterion, x, y, tr.optimizer, tr.scheduler,
                                  tr.scaler, tr.step_cfg)
                yield
            epoch += 1

    return run


def fwd_bwd_steps(tr: engine.Trainer) -> Callable[[], Iterator[None]]:
    """One forward + backward on a fixed batch: the part SAM does twice."""
    x, y = next(train_batches(tr.bundle, BATCH, epoch=0, seed=0, device=tr.device))

    def run() -> Iterator[None]:
        while True:
            tr.model.zero_grad(set_to_none=True)
            tr.criterion(tr.model(x), y).backward()
            yield

    return run


def trainer(*extra: str) -> engine.Trainer:
    cfg = apply_overrides(get_preset("c10-vit"),
                          [*MODEL, f"train.batch_size={BATCH}", "train.device=cpu",
                           "train.precision=fp32", "train.epochs=1", "data.workers=2", *extra])
    return engine.Trainer.build(cfg)


# -- the machine and the model --------------------------------------------------------------

def matmul_gflops(sizes: tuple[int, ...] = (512, 1024, 2048), repeats: int = 5) -> dict[str, float]:
    """Best fp32 GFLOP/s of square ``a @ b`` (2 n^3 FLOPs) over ``sizes``, best of ``repeats``."""
    out = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        best = min(_time(lambda: a @ b) for _ in range(repeats))
        out[str(n)] = 2 * n ** 3 / best / 1e9
    return out


def _time(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def train_flops_per_image(model: nn.Module, img_size: int, in_chans: int) -> float:
    """Forward + backward FLOPs per image (torch.utils.flop_counter: matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(8, in_chans, img_size, img_size)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (about 3 minutes)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per loop")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps before timing")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--compile", action="store_true", help="also time train.compile=true (inductor)")
    ap.add_argument("--json", default=None, help="write the numbers here")
    args = ap.parse_args()
    steps = args.steps or (8 if args.quick else 30)
    warm = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        found = sources.find_shared_cifar10()
    except DataError as exc:
        print(f"bench_train_loop: skipped: {exc}")
        return
    folder = resolve_cache_dir() / f"cifar10-jpeg-{cache.file_digest([found])[:12]}"
    root = str(sources.imagefolder_root(sources.unpack_tarball(found, folder)))

    vanilla = trainer()
    spec, b = vanilla.spec, vanilla.bundle
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
          f"{spec['name']} {dict(spec['kwargs'])}, batch {BATCH}, {len(b.train)} training images, "
          f"{steps} timed steps after {warm}", flush=True)
    rows: dict[str, dict[str, float]] = {}

    def row(name: str, fn: Callable[[], Iterator[None]]) -> None:
        rows[name] = timed(fn, warm, steps)
        r = rows[name]
        print(f"  {name:<28} {r['images_per_s']:7.1f} img/s  {1e3 * r['step_s']:7.1f} ms/step  "
              f"{1e3 * r['cpu_step_s']:7.1f} CPU ms/step", flush=True)

    row("plain PyTorch loop", plain_steps(root, b.mean, b.std, spec, 0, 2))
    row("vitsam", vitsam_steps(vanilla))
    row("vitsam optim.fused=true", vitsam_steps(trainer("optim.fused=true")))
    row("vitsam SAM", vitsam_steps(trainer("optim.sam=true")))
    row("forward+backward alone", fwd_bwd_steps(vanilla))
    if args.compile:
        row("vitsam train.compile=true", vitsam_steps(trainer("train.compile=true")))
    mm = matmul_gflops()
    flops = train_flops_per_image(vanilla.model, b.img_size, b.in_chans)
    peak = max(mm.values())
    v, p, s = rows["vitsam"], rows["plain PyTorch loop"], rows["vitsam SAM"]
    out = {"rows": rows, "matmul_gflops": mm, "train_mflop_per_image": flops / 1e6,
           "vitsam_over_plain": v["images_per_s"] / p["images_per_s"],
           "vitsam_over_plain_cpu": p["cpu_step_s"] / v["cpu_step_s"],
           "sam_over_vanilla": s["step_s"] / v["step_s"],
           "sam_over_vanilla_cpu": s["cpu_step_s"] / v["cpu_step_s"],
           "fraction_of_matmul": {k: r["images_per_s"] * flops / 1e9 / peak for k, r in rows.items()
                                  if k != "forward+backward alone"},
           "threads": torch.get_num_threads(), "steps": steps, "warmup": warm,
           "torch": torch.__version__, "argv": sys.argv}
    fb = rows["forward+backward alone"]["step_s"]
    print(f"matmul fp32: {', '.join(f'{k}: {g:.0f}' for k, g in mm.items())} GFLOP/s (best {peak:.0f})")
    print(f"training FLOPs per image (forward + backward): {flops / 1e6:.0f} MFLOP")
    print(f"vitsam / plain: {out['vitsam_over_plain']:.2f}x images/s "
          f"({out['vitsam_over_plain_cpu']:.2f}x in CPU time per step)")
    print(f"SAM / vanilla step: {out['sam_over_vanilla']:.2f}x wall, "
          f"{out['sam_over_vanilla_cpu']:.2f}x CPU; forward+backward alone {1e3 * fb:.0f} ms: "
          f"vanilla = f+b + {1e3 * (v['step_s'] - fb):.0f} ms, SAM = 2 f+b + "
          f"{1e3 * (s['step_s'] - 2 * fb):.0f} ms")
    for k, f in out["fraction_of_matmul"].items():
        print(f"fraction of the matmul rate, {k}: {f:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
