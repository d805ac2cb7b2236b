"""Cost of one SimCLR pre-training step (two views + NT-Xent, plain and SAM) for each cell of
``vitsam study contrastive --scale cpu``, and of the features its probe computes.

    python bench/bench_pretrain_step.py [--steps 4] [--scale cpu]

One thread; prints the seconds of each step (the first includes warm-up; the median of the
others is the number to use) and of computing features of 2,000 test images.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from vitsam.data import train_batches
from vitsam.data.sample import random_subset
from vitsam.pretrain.probe import features
from vitsam.study.presets import get_study, study_cells
from vitsam.train.engine import Trainer, train_step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--scale", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{'cell':<22} {'steps/epoch':>11} {'median step s':>13} {'features(2000) s':>16}")
    for c in study_cells(get_study("contrastive"), args.scale, (0,)):
        tr = Trainer.build(c.config)
        it = train_batches(tr.bundle, c.config.train.batch_size, epoch=0, seed=0, device=tr.device)
        times = []
        for k in range(args.steps):
            x, y = next(it)
            t0 = time.perf_counter()
            x, y = tr.pretrain.batch(x, y, k, tr.bundle)
            train_step(tr.net, tr.criterion, x, y, tr.optimizer, tr.scheduler, tr.scaler,
                       tr.step_cfg)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        features(tr.model.encoder, random_subset(tr.bundle.test, 2000, 0), tr.bundle, tr.device)
        feat = time.perf_counter() - t0
        print(f"{c.name:<22} {tr.timeline.steps_per_epoch:>11} "
              f"{statistics.median(times[1:] or times):>13.3f} {feat:>16.2f}", flush=True)


if __name__ == "__main__":
    main()
