"""Step time of adversarial training (FGSM-RS, PGD-k) and SAM+AT against the vanilla step.

The models are the ``cpu`` study scale's (``vitsam.study.presets._CPU_MODEL``: ViT and Mixer
d128, 6 blocks, patch 8; the ResNet-18 with one block per stage at 1/4 width; 32 px CIFAR-10
shape, each family's optimiser and clipping as in the cells), fed one fixed batch of uniform
[0, 1] pixels normalised with CIFAR-10's statistics, random labels. Each method trains its own
copy of the model through ``vitsam.optim.train_step``, the engine's step, with the attack the
cells use (``StepConfig.attack``; eps 8/255). Timing as ``bench_sam_variants.py``: rounds of
``--block`` steps per method, the methods interleaved within a round so that a change in the
machine's load hits them alike; per step the median over rounds of (block time / block), wall
and process CPU time. Expected cost in forward-backward passes: vanilla 1, SAM 2, FGSM-RS 2
(one input-gradient pass, then the step), SAM+FGSM-RS 3, PGD-k k + 1.

    nice -n 10 python bench/bench_adversarial.py [--quick] [--threads 1] [--batch 128]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from vitsam.models import count_params, create_model, make_spec
from vitsam.optim.adversarial import Attack
from vitsam.optim.factory import build_optimizer
from vitsam.optim.steps import StepConfig, train_step
from vitsam.study.presets import _base

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
EPS = 8 / 255
METHODS = {  # label -> (SAM?, attack kind or None, PGD steps, expected passes)
    "vanilla": (False, None, 1, 1.0),
    "sam": (True, None, 1, 2.0),
    "at (fgsm-rs)": (False, "fgsm", 1, 2.0),
    "sam-at (fgsm-rs)": (True, "fgsm", 1, 3.0),
    "at (pgd-7)": (False, "pgd", 7, 8.0),
}


def bench_family(family: str, batch: int, block: int, rounds: int) -> dict[str, Any]:
    cfg = _base(family, "sam", "cpu")
    spec = make_spec(cfg.model.name, 10, 32, 3, dict(cfg.model.kwargs))
    g = torch.Generator().manual_seed(0)
    mean = torch.tensor(CIFAR_MEAN).view(1, -1, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, -1, 1, 1)
    x = (torch.rand(batch, 3, 32, 32, generator=g) - mean) / std
    y = torch.randint(0, 10, (batch,), generator=g)
    loss = nn.CrossEntropyLoss()
    runs = {}
    for label, (sam, kind, steps, _) in METHODS.items():
        torch.manual_seed(0)
        model = create_model(spec["name"], spec["num_classes"], spec["img_size"], spec["in_chans"],
                             **spec["kwargs"]).train()
        attack = Attack(kind, EPS, CIFAR_MEAN, CIFAR_STD, steps=steps) if kind else None
        runs[label] = {"model": model, "opt": build_optimizer(model, replace(cfg.optim, sam=sam)),
                       "cfg": StepConfig(clip_norm=cfg.train.clip_norm, attack=attack),
                       "times": [], "cpu": []}
    params = count_params(runs["vanilla"]["model"])
    for r in runs.values():  # warm-up
        for k in range(2):
            train_step(r["model"], loss, x, y, r["opt"], cfg=r["cfg"], key=k)
    for i in range(rounds):
        for r in runs.values():
            t0, c0 = time.perf_counter(), time.process_time()
            for k in range(block):
                train_step(r["model"], loss, x, y, r["opt"], cfg=r["cfg"], key=i * block + k)
            r["times"].append((time.perf_counter() - t0) / block)
            r["cpu"].append((time.process_time() - c0) / block)
    base = statistics.median(runs["vanilla"]["times"])
    base_cpu = statistics.median(runs["vanilla"]["cpu"])
    rows = []
    for label, r in runs.items():
        med, cpu = statistics.median(r["times"]), statistics.median(r["cpu"])
        rows.append({"method": label, "ms_per_step": 1e3 * med, "vs_vanilla": med / base,
                     "cpu_ms_per_step": 1e3 * cpu, "cpu_vs_vanilla": cpu / base_cpu,
                     "expected_passes": METHODS[label][3]})
    return {"family": family, "model": spec["name"], "kwargs": spec["kwargs"], "params": params,
            "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=["vit", "mixer", "resnet"],
                    choices=["vit", "mixer", "resnet"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--block", type=int, default=5, help="steps per timed block")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="3 rounds of 3 steps")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.quick:
        args.block, args.rounds = 3, 3
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s), batch {args.batch}, {args.rounds} rounds x {args.block} steps")
    results = []
    for fam in args.families:
        res = bench_family(fam, args.batch, args.block, args.rounds)
        results.append(res)
        print(f"\n{fam} ({res['model']} {res['kwargs']}, {res['params'] / 1e6:.2f}M params)")
        print(f"{'method':<18} {'ms/step':>8} {'x vanilla':>9} {'cpu ms':>8} {'x vanilla':>9} "
              f"{'expected':>8}")
        for r in res["rows"]:
            print(f"{r['method']:<18} {r['ms_per_step']:8.1f} {r['vs_vanilla']:9.2f} "
                  f"{r['cpu_ms_per_step']:8.1f} {r['cpu_vs_vanilla']:9.2f} {r['expected_passes']:8.2f}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
