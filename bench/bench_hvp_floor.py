"""Benchmark: what bounds the time of a top-1 Hessian eigenvalue on CPU.

Top-1 time is (gradient graph) + (number of HVPs) x (cost of one HVP). This script measures
how far each factor is from its floor, on the same models and batch as ``bench_hessian.py``:

1. ``rate``: arithmetic rate of one cached double-backward HVP. FLOPs are counted by
   ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions only), time is CPU
   seconds (median of 3); the peak is the best plain float32 matmul rate measured in the same
   process on the shapes the model uses most. The ratio bounds what any faster exact HVP
   implementation could gain on this machine.
2. ``bf16``: the same HVP under CPU bfloat16 autocast: speed-up and relative error of H v.
3. ``threads``: one cached graph on 2 intra-op threads against the batch split in halves on
   two Python threads (1 intra-op thread each, graphs run concurrently).
4. ``warm``: Lanczos on the Hessian of the first b samples of the batch, then full-batch
   Lanczos (PyHessian's change test, tol 1e-3) started from that Ritz vector; cost in
   full-batch HVP equivalents against the default start.
5. ``compile``: torch.compile (inductor) of the forward-over-reverse HVP ``jvp(grad)``:
   compile time and CPU seconds per product after it, against the eager cached HVP.
6. ``seeds``: top-1 with vitsam (change and residual tests) and PyHessian for seeds
   0..S-1 (the seed sets both tools' random start vector): HVPs and CPU seconds per seed.

    python bench/bench_hvp_floor.py --json floor.json      # about 6 minutes on one core
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hessian import MODELS, build_model, load_batch, measure_hessian

from vitsam.analysis.hessian import (
    HessianOperator,
    _lanczos_top,
    analysis_state,
)

LOSS = nn.CrossEntropyLoss()
SECTIONS = ("rate", "bf16", "threads", "warm", "compile", "seeds")


def cpu_median(fn, n: int = 3, clock=time.process_time) -> float:
    """Median seconds of ``fn()`` over n calls after one warm-up call (CPU time by default)."""
    fn()
    times = []
    for _ in range(n):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return float(np.median(times))


def wall_median(fn, n: int = 3) -> float:
    return cpu_median(fn, n, time.perf_counter)


def peak_gflops(shapes: list[tuple[int, int, int]]) -> float:
    """Best float32 GFLOP/s of plain ``a @ b`` over the given (m, k, n) shapes."""
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        sec = cpu_median(lambda a=a, b=b: a @ b, 5)
        best = max(best, 2 * m * k * n / sec / 1e9)
    return best


def mm_shapes(model: nn.Module, x: torch.Tensor) -> list[tuple[int, int, int]]:
    """(m, k, n) of the forward pass's linear layers (batch folded into m), largest first."""
    shapes: set[tuple[int, int, int]] = set()

    def hook(mod, inp, out):
        a = inp[0]
        shapes.add((a.numel() // a.shape[-1], mod.in_features, mod.out_features))

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return sorted(shapes, key=lambda s: -s[0] * s[1] * s[2])[:4]


def section_rate(model, x, y) -> dict:
    op = HessianOperator(model, LOSS, [(x, y)])
    v = op.random_vector(torch.Generator().manual_seed(0))
    op.matvec(v)  # builds and caches the gradient graph
    with FlopCounterMode(display=False) as fc:
        op.matvec(v)
    flops = fc.get_total_flops()
    sec = cpu_median(lambda: op.matvec(v))
    shapes = mm_shapes(model, x) or [(4096, 128, 384)]
    peak = peak_gflops(shapes + [(1024, 1024, 1024)])
    rate = flops / sec / 1e9
    return {"hvp_cpu_s": sec, "hvp_gflop": flops / 1e9, "hvp_gflops": rate,
            "peak_gflops": peak, "fraction_of_peak": rate / peak}


def section_bf16(model, x, y) -> dict:
    op = HessianOperator(model, LOSS, [(x, y)])
    v = op.random_vector(torch.Generator().manual_seed(0))
    ref = op.matvec(v)
    t32 = cpu_median(lambda: op.matvec(v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        opb = HessianOperator(model, LOSS, [(x, y)])
        hb = opb.matvec(v)
        t16 = cpu_median(lambda: opb.matvec(v))
    return {"fp32_s": t32, "bf16_s": t16, "speedup": t32 / t16,
            "rel_err": float((hb - ref).norm() / ref.norm())}


def section_threads(model, x, y) -> dict:
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        op = HessianOperator(model, LOSS, [(x, y)])
        v = op.random_vector(torch.Generator().manual_seed(0))
        one = wall_median(lambda: op.matvec(v))
        torch.set_num_threads(2)
        intra = wall_median(lambda: op.matvec(v))
        torch.set_num_threads(1)
        h = x.shape[0] // 2
        halves = [HessianOperator(model, LOSS, [(x[:h], y[:h])]),
                  HessianOperator(model, LOSS, [(x[h:], y[h:])])]

        def split() -> None:
            ts = [threading.Thread(target=o.matvec, args=(v,)) for o in halves]
            for t in ts:
                t.start()
            for t in ts:
                t.join()

        inter = wall_median(split)
    finally:
        torch.set_num_threads(old)
    return {"wall_1_thread": one, "wall_2_intra_op": intra, "wall_2_python_threads": inter,
            "speedup_intra_op": one / intra, "speedup_python_threads": one / inter}


def _top(op, v0, tol, test):
    """(theta, Ritz vector, HVPs) of vitsam's top-1 Lanczos with the residual or change test."""
    op.num_hvps = 0
    vals, vecs, _, _ = _lanczos_top(op, 1, tol, 100, v0, None, True, False, test)
    return vals[0], vecs[0], op.num_hvps


def section_warm(model, x, y, subs=(8, 16, 32)) -> list[dict]:
    full = HessianOperator(model, LOSS, [(x, y)])
    v0 = full.start_vector(torch.Generator().manual_seed(0), "gradient")
    lam, u, _ = _top(full, v0, 1e-9, "residual")
    full_s = cpu_median(lambda: full.matvec(v0))
    _, _, n_default = _top(full, v0, 1e-3, "change")
    rows = [{"sub": None, "hvps_full": n_default, "cost": float(n_default), "cos": None}]
    for b in subs:
        sub = HessianOperator(model, LOSS, [(x[:b], y[:b])])
        sub_s = cpu_median(lambda op=sub: op.matvec(v0))
        _, us, n_sub = _top(sub, sub.start_vector(torch.Generator().manual_seed(0), "gradient"),
                            1e-1, "residual")
        theta, _, n_full = _top(full, us, 1e-3, "change")
        rows.append({"sub": b, "hvps_sub": n_sub, "sub_cost": sub_s / full_s,
                     "cos": float(abs(us @ u)), "hvps_full": n_full,
                     "cost": n_full + n_sub * sub_s / full_s, "err": abs(theta - lam) / lam})
    return rows


def section_compile(model, x, y) -> dict:
    op = HessianOperator(model, LOSS, [(x, y)])
    v = op.random_vector(torch.Generator().manual_seed(0))
    ref = op.matvec(v)
    eager = cpu_median(lambda: op.matvec(v))
    names = [n for n, _ in op.named]
    primals = {n: p.detach() for n, p in op.named}
    tangents = dict(zip(names, op.unflatten(v)))

    def loss_of(params):
        return LOSS(torch.func.functional_call(model, params, (x,)), y)

    import torch._inductor.config as inductor_config

    inductor_config.force_disable_caches = True  # time a cold compile, as a first call sees it
    compiled = torch.compile(lambda t: torch.func.jvp(torch.func.grad(loss_of), (primals,), (t,))[1])
    t0 = time.perf_counter()
    out = compiled(tangents)
    first = time.perf_counter() - t0
    per = cpu_median(lambda: compiled(tangents))
    flat = torch.cat([out[n].reshape(-1) for n in names])
    return {"compile_and_first_s": first, "compiled_hvp_s": per, "eager_cached_hvp_s": eager,
            "rel_diff": float((flat - ref).norm() / ref.norm())}


def section_seeds(model, x, y, seeds: int) -> list[dict]:
    """Top-1 per seed through ``bench_hessian.measure_hessian`` (the same calls as its table)."""
    rows = []
    for seed in range(seeds):
        row: dict = {"seed": seed}
        for key, tool in (("vitsam_change", "vitsam-change"), ("vitsam_residual", "vitsam"),
                          ("pyhessian", "pyhessian")):
            r = measure_hessian({"tool": tool, "k": 1, "tol": 1e-3, "max_iter": 100,
                                 "seed": seed}, model, x, y)
            row[key] = (r["hvps"], r["cpu_seconds"], r["eigenvalues"][0])
        rows.append(row)
    return rows


LINES = {
    "rate": "HVP {hvp_gflop:.2f} GFLOP in {hvp_cpu_s:.3f} s = {hvp_gflops:.1f} GFLOP/s; plain "
            "matmul peak {peak_gflops:.1f} GFLOP/s; fraction {fraction_of_peak:.2f}",
    "bf16": "fp32 {fp32_s:.3f} s, bf16 autocast {bf16_s:.3f} s (x{speedup:.2f}), "
            "|Hv error| / |Hv| = {rel_err:.1e}",
    "threads": "1 thread {wall_1_thread:.3f} s; 2 intra-op {wall_2_intra_op:.3f} s "
               "(x{speedup_intra_op:.2f}); halves on 2 Python threads "
               "{wall_2_python_threads:.3f} s (x{speedup_python_threads:.2f})",
    "compile": "compile + first product {compile_and_first_s:.1f} s wall; compiled jvp(grad) "
               "{compiled_hvp_s:.3f} s per HVP; eager cached double backward "
               "{eager_cached_hvp_s:.3f} s; rel diff {rel_diff:.1e}",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--sections", nargs="+", choices=SECTIONS,
                    default=[s for s in SECTIONS if s != "compile"],
                    help="default: all but compile (about 1 minute of compiling per model)")
    ap.add_argument("--data", default="auto", choices=("auto", "cifar", "random"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x, y, source = load_batch(args.batch, args.data)
    print(f"# data {source}, batch {args.batch}, torch {torch.__version__}, "
          f"cpus {os.cpu_count()}, load avg {os.getloadavg()[0]:.1f}", flush=True)
    out: dict = {}
    for name in args.models:
        model = build_model(name).eval()
        res: dict = {}
        with analysis_state(model):
            for sec, fn in (("rate", section_rate), ("bf16", section_bf16),
                            ("threads", section_threads), ("compile", section_compile)):
                if sec in args.sections:
                    res[sec] = fn(model, x, y)
                    print(f"{name:6s} {sec}: " + LINES[sec].format(**res[sec]), flush=True)
            if "warm" in args.sections:
                rows = res["warm"] = section_warm(model, x, y)
                for r in rows:
                    if r["sub"] is None:
                        print(f"{name:6s} warm: default start: {r['hvps_full']} full HVPs",
                              flush=True)
                    else:
                        print(f"{name:6s} warm: sub-batch {r['sub']:2d}: {r['hvps_sub']} HVPs at "
                              f"{r['sub_cost']:.2f} each, cos {r['cos']:.3f}, then "
                              f"{r['hvps_full']} full; total {r['cost']:.1f} full-HVP "
                              f"equivalents, err {r['err']:.1e}", flush=True)
        if "seeds" in args.sections:
            rows = res["seeds"] = section_seeds(model, x, y, args.seeds)
            for r in rows:
                cells = "  ".join(f"{k}: {r[k][0]:3d} HVPs {r[k][1]:5.2f} s {r[k][2]:.5g}"
                                  for k in ("vitsam_change", "vitsam_residual", "pyhessian"))
                print(f"{name:6s} seed {r['seed']}: {cells}", flush=True)
            med = {k: statistics.median(r[k][1] for r in rows)
                   for k in ("vitsam_change", "vitsam_residual", "pyhessian")}
            ratios = [r["vitsam_change"][1] / r["pyhessian"][1] for r in rows]
            print(f"{name:6s} seeds: median CPU s change {med['vitsam_change']:.2f}, residual "
                  f"{med['vitsam_residual']:.2f}, PyHessian {med['pyhessian']:.2f}; per-seed "
                  f"change/PyH {min(ratios):.2f}-{max(ratios):.2f}, ratio of medians "
                  f"{med['vitsam_change'] / med['pyhessian']:.2f}", flush=True)
        out[name] = res
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
