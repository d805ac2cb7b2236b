"""Step time of each SAM variant relative to the base optimiser, on the cpu-scale ViT and Mixer.

The models are the ``cpu`` study scale's (``vitsam.study.presets._CPU_MODEL``: ViT and Mixer
d128, 6 blocks, patch 8, 32 px CIFAR-10 shape, AdamW, clipping at 1.0 as in the cells), fed one
fixed batch of Gaussian noise with random labels. Each variant trains its own copy of the model
through ``vitsam.optim.train_step``, the engine's step. Timing: rounds of ``--block`` steps per
variant, the variants interleaved within a round so that a change in the machine's load hits
them alike; the time per step (wall and process CPU time) is the median over rounds of
(block time / block). ``--block`` is
a multiple of LookSAM's k, so every block holds the same share of SAM steps; random SAM's share
is whatever its seeded draws give, printed beside it. The expected cost is the module docstring
of ``vitsam.optim.variants``: forward-backward passes per step, base optimiser = 1.

    nice -n 10 python bench/bench_sam_variants.py [--quick] [--threads 1] [--batch 128]
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
from vitsam.optim.factory import build_optimizer
from vitsam.optim.steps import StepConfig, train_step
from vitsam.study.presets import _base

VARIANTS = {  # label -> (optim overrides, expected passes per step)
    "base (AdamW)": ({"sam": False}, lambda o: 1.0),
    "sam": ({"sam": True, "sam_variant": "full"}, lambda o: 2.0),
    "looksam": ({"sam": True, "sam_variant": "looksam"}, lambda o: 1 + 1 / o.looksam_k),
    "sam-on": ({"sam": True, "sam_variant": "sam-on"}, lambda o: 2.0),
    "random": ({"sam": True, "sam_variant": "random"}, lambda o: 1 + o.sam_prob),
}


def build(family: str, batch: int) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
    cfg = _base(family, "sam", "cpu")
    spec = make_spec(cfg.model.name, 10, 32, 3, dict(cfg.model.kwargs))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return cfg, spec, x, y


def bench_family(family: str, batch: int, block: int, rounds: int) -> dict[str, Any]:
    cfg, spec, x, y = build(family, batch)
    step_cfg = StepConfig(clip_norm=cfg.train.clip_norm)
    loss = nn.CrossEntropyLoss()
    runs = {}
    for label, (over, _) in VARIANTS.items():
        torch.manual_seed(0)
        model = create_model(spec["name"], spec["num_classes"], spec["img_size"], spec["in_chans"],
                             **spec["kwargs"])
        model.train()
        opt = build_optimizer(model, replace(cfg.optim, **over))
        runs[label] = {"model": model, "opt": opt, "times": [], "cpu": [], "perturbed": 0, "steps": 0}
    params = count_params(runs["sam"]["model"])
    for label, r in runs.items():  # warm-up: one SAM step and one plain step each
        for _ in range(2):
            train_step(r["model"], loss, x, y, r["opt"], cfg=step_cfg)
    for r in runs.values():  # the timed blocks start at a LookSAM SAM step
        if hasattr(r["opt"], "steps_taken"):
            r["opt"].steps_taken = r["opt"].perturbed_steps = 0
    for _ in range(rounds):
        for label, r in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(block):
                out = train_step(r["model"], loss, x, y, r["opt"], cfg=step_cfg)
                r["perturbed"] += int(out.get("perturbed", 0))
            r["times"].append((time.perf_counter() - t0) / block)
            r["cpu"].append((time.process_time() - c0) / block)
            r["steps"] += block
    base = statistics.median(runs["base (AdamW)"]["times"])
    base_cpu = statistics.median(runs["base (AdamW)"]["cpu"])
    rows = []
    for label, r in runs.items():
        med = statistics.median(r["times"])
        over, expect = VARIANTS[label]
        o = replace(cfg.optim, **over)
        share = r["perturbed"] / r["steps"]
        cpu = statistics.median(r["cpu"])
        rows.append({"variant": label, "ms_per_step": 1e3 * med, "vs_base": med / base,
                     "cpu_ms_per_step": 1e3 * cpu, "cpu_vs_base": cpu / base_cpu,
                     "perturbed_share": share, "expected_passes": expect(o),
                     "passes_at_share": 1.0 if label.startswith("base") else 1 + share})
    return {"family": family, "model": spec["name"], "kwargs": spec["kwargs"], "params": params,
            "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=["vit", "mixer"], choices=["vit", "mixer"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--block", type=int, default=10, help="steps per timed block (a multiple of k)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="3 rounds of 5 steps")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.quick:
        args.block, args.rounds = 5, 3
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s), batch {args.batch}, {args.rounds} rounds x {args.block} steps")
    results = []
    for fam in args.families:
        res = bench_family(fam, args.batch, args.block, args.rounds)
        results.append(res)
        print(f"\n{fam} ({res['model']} {res['kwargs']}, {res['params'] / 1e6:.2f}M params)")
        print(f"{'variant':<14} {'ms/step':>8} {'x base':>7} {'cpu ms':>8} {'x base':>7} "
              f"{'SAM steps':>9} {'passes':>7} {'expected':>8}")
        for r in res["rows"]:
            print(f"{r['variant']:<14} {r['ms_per_step']:8.1f} {r['vs_base']:7.2f} "
                  f"{r['cpu_ms_per_step']:8.1f} {r['cpu_vs_base']:7.2f} "
                  f"{r['perturbed_share']:9.2f} {r['passes_at_share']:7.2f} {r['expected_passes']:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
