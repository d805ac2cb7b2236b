"""Benchmark: empirical NTK condition number, vitsam (vmapped torch.func Jacobians in chunks)
against a per-sample Jacobian loop (one ``torch.autograd.grad`` call per sample and output).

Same models, inputs and thread count for both; each measurement runs in its own subprocess
(peak RSS delta, see bench_hessian.py). Also reports kappa at initialisation over three seeds,
the number the paper compares across families.

    python bench/bench_ntk.py            # 128 CIFAR-10 inputs (random if the data is absent)
    python bench/bench_ntk.py --quick    # 32 inputs, ViT only, no seed average
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench_hessian import MODELS, build_model, load_batch, spawn


def loop_kernel(model: nn.Module, x: torch.Tensor, convention: str) -> torch.Tensor:
    """Baseline: explicit per-sample Jacobian rows by autograd, then J J^T in float64."""
    from vitsam.models.attention import math_attention

    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    with math_attention(model):
        for i in range(x.shape[0]):
            out = model(x[i:i + 1])[0]
            outs = [out.sum()] if convention == "sum-logits" else list(out)
            per = []
            for j, o in enumerate(outs):
                g = torch.autograd.grad(o, params, retain_graph=j < len(outs) - 1)
                per.append(torch.cat([t.reshape(-1) for t in g]))
            rows.append(torch.stack(per))
    jac = torch.stack(rows)  # (N, R, P)
    if convention == "full":
        flat = jac.reshape(-1, jac.shape[-1]).double()
    else:
        flat = jac.reshape(jac.shape[0], -1).double()
    return flat @ flat.T


def measure(spec: dict, model: nn.Module, x: torch.Tensor) -> dict:
    """Worker body (called by bench_hessian.run_worker in a fresh process)."""
    from vitsam.analysis.ntk import ntk_at_init, ntk_condition_number

    x = x[: spec["n"]]
    conv = spec["convention"]
    t0, c0 = time.perf_counter(), time.process_time()
    if spec["tool"] == "vitsam":
        r = ntk_condition_number(model, x, conv, chunk=spec["chunk"])
        kappa, lmax, lmin = r.kappa, r.lambda_max, r.lambda_min
        extra = {}
    elif spec["tool"] == "loop":
        ev = np.linalg.eigvalsh(loop_kernel(model.eval(), x, conv).numpy())
        kappa, lmax, lmin = ev[-1] / ev[0], ev[-1], ev[0]
        extra = {}
    elif spec["tool"] == "vitsam-init":
        out = ntk_at_init(lambda s: build_model(spec["model"], seed=s), x, seeds=(0, 1, 2),
                          convention=conv, chunk=spec["chunk"])
        kappa, lmax, lmin = out["kappa_mean"], out["lambda_max"][0], out["lambda_min"][0]
        extra = {"kappa_std": out["kappa_std"], "kappas": out["kappas"]}
    else:
        raise ValueError(f"unknown tool {spec['tool']!r}")
    return {"kappa": float(kappa), "lambda_max": float(lmax), "lambda_min": float(lmin),
            "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--n", type=int, default=128, help="number of inputs (sum-logits)")
    ap.add_argument("--n-classes-conv", type=int, default=32,
                    help="inputs for the trace/full conventions, whose Jacobians are C times "
                         "larger (the loop baseline holds all of them, several GB)")
    ap.add_argument("--conventions", nargs="+", default=["sum-logits", "trace"],
                    choices=["sum-logits", "trace", "full"])
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", default="auto", choices=("auto", "cifar", "random"))
    ap.add_argument("--no-init", action="store_true", help="skip the 3-seed kappa at init")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.n, args.n_classes_conv, args.models, args.no_init = 32, 16, ["vit"], True
    x, y, source = load_batch(args.n, args.data)
    tmp = tempfile.NamedTemporaryFile(suffix=".pt", delete=False)
    torch.save({"x": x, "y": y}, tmp.name)
    print(f"# data: {source}, N={args.n}, chunk {args.chunk}, threads {args.threads}, "
          f"torch {torch.__version__}, load avg {os.getloadavg()[0]:.1f}")
    rows = []
    try:
        for name in args.models:
            for conv in args.conventions:
                group = []
                tools = ["vitsam", "loop"]
                if not args.no_init and conv == args.conventions[0]:
                    tools.append("vitsam-init")
                for tool in tools:
                    n = args.n if conv == "sum-logits" else min(args.n, args.n_classes_conv)
                    spec = dict(script="ntk", model=name, tool=tool, convention=conv, n=n,
                                chunk=args.chunk, threads=args.threads, data_file=tmp.name)
                    row = {**spec, **spawn(spec)}
                    row.pop("data_file")
                    group.append(row)
                base = next((r for r in group if r["tool"] == "loop" and "seconds" in r), None)
                for r in group:
                    if "seconds" not in r:
                        print(f"{name:6s} {conv:10s} {r['tool']:12s} ERROR {r.get('error')}")
                        continue
                    if base and r["tool"] != "vitsam-init":
                        r["cpu_vs_loop"] = r["cpu_seconds"] / base["cpu_seconds"]
                        r["wall_vs_loop"] = r["seconds"] / base["seconds"]
                        r["kappa_rel_diff_vs_loop"] = (abs(r["kappa"] - base["kappa"])
                                                       / base["kappa"])
                    std = f" +- {r['kappa_std']:.4g} (3 seeds)" if "kappa_std" in r else ""
                    ratio = (f"cpu/loop={r['cpu_vs_loop']:5.2f} wall/loop={r['wall_vs_loop']:5.2f} "
                             f"dkappa={r['kappa_rel_diff_vs_loop']:.1e}" if "cpu_vs_loop" in r else "")
                    print(f"{name:6s} {conv:10s} N={r['n']:<4d}{r['tool']:12s} "
                          f"kappa={r['kappa']:10.5g}{std} "
                          f"wall={r['seconds']:6.1f}s cpu={r['cpu_seconds']:6.1f}s {ratio} "
                          f"peak={r['peak_mb']:6.0f}MB", flush=True)
                rows += group
    finally:
        os.unlink(tmp.name)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
