"""Benchmark: per-image RandAugment on uint8 batches, vitsam's grouped calls against
torchvision's ``v2.RandAugment`` called image by image (what per-example augmentation with
torchvision costs without a PIL round trip).

Both draw 2 ops per image at magnitude 15 of 31 bins, with torchvision's op set and
magnitudes. One thread; the median of ``--repeat`` timed calls after one warm-up each; the
ratio is torchvision's time over vitsam's (higher: vitsam faster).

    python bench/bench_randaugment.py                 # batch 128 and 512 at 32 px
    python bench/bench_randaugment.py --size 224 --batches 64
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.transforms import v2

from vitsam.data.augment import RANDAUG_MAGNITUDE, RANDAUG_OPS, rand_augment, seeded_global_rng


def _time(fn, repeat: int) -> float:
    fn(0)
    times = []
    for i in range(repeat):
        t0 = time.perf_counter()
        fn(i + 1)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ra = v2.RandAugment(num_ops=RANDAUG_OPS, magnitude=RANDAUG_MAGNITUDE)
    print("| batch | size | torchvision per image (ms) | vitsam grouped (ms) | ratio |")
    print("|---|---|---|---|---|")
    for b in args.batches:
        x = torch.randint(0, 256, (b, 3, args.size, args.size), dtype=torch.uint8)

        def tv(seed: int) -> torch.Tensor:
            with seeded_global_rng(seed):
                return torch.stack([ra(img) for img in x])

        t_tv = _time(tv, args.repeat)
        t_vs = _time(lambda seed: rand_augment(x, seed), args.repeat)
        print(f"| {b} | {args.size} | {1e3 * t_tv:.1f} | {1e3 * t_vs:.1f} | {t_tv / t_vs:.2f}x |")


if __name__ == "__main__":
    main()
