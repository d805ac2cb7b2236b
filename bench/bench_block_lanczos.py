"""Benchmark: block Lanczos (batched HVPs) against single-vector Lanczos on CPU.

Same small ViT / MLP-Mixer / ResNet (32 px, seed-0 initialisation) and CIFAR-10 test batch as
``bench_hessian.py``. For every model and k (top-1 and top-5 by default) it runs vitsam's
``top_eigenvalues`` with ``method="lanczos"`` and with ``method="block-lanczos"`` for every
block size, all at the same tolerance and residual test, and prints per run: HVPs, operator
passes (one per ``matvec`` or ``matmat`` call), CPU and wall seconds, the largest relative error
of the k eigenvalues against a tight reference (single-vector Lanczos at tol 1e-9), and the
CPU and wall ratios block / single.

``--chunks N`` splits the batch into N batches: the operator then rebuilds each batch's
gradient graph on every pass (the multi-batch path, as for 1,024 images in chunks), which a
block step pays once for b vectors. With one chunk the graph is cached and reused.

Everything runs in one process on ``--threads`` intra-op threads (1 by default); each
configuration runs ``--repeat`` times, interleaved, and the medians of the times are reported.

    python bench/bench_block_lanczos.py --json block.json      # all models, chunks 1 and 4
    python bench/bench_block_lanczos.py --quick                # ViT, batch 32, chunks 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hessian import MODELS, build_model, load_batch  # noqa: E402

from vitsam.analysis.hessian import top_eigenvalues  # noqa: E402

LOSS = nn.CrossEntropyLoss()


def split(x: torch.Tensor, y: torch.Tensor, chunks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(torch.chunk(x, chunks), torch.chunk(y, chunks)))


def measure(model: nn.Module, batches, k: int, method: str, b: int, tol: float,
            max_iter: int) -> dict:
    """One eigenvalue call: eigenvalues, HVPs, passes, CPU and wall seconds."""
    c0, t0 = time.process_time(), time.perf_counter()
    r = top_eigenvalues(model, LOSS, batches, k=k, method=method, block_size=b, tol=tol,
                        max_iter=max_iter)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    return {"eigenvalues": r.eigenvalues, "hvps": r.num_hvps,
            "passes": -(-r.num_hvps // r.block_size), "converged": r.converged,
            "cpu_s": cpu, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="ViT only, batch 32, chunks 1")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 5])
    ap.add_argument("--block-sizes", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--chunks", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--max-iter", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--data", default="auto", choices=("auto", "cifar", "random"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.models, args.batch, args.chunks = ["vit"], 32, [1]
    if args.repeat < 1 or args.threads < 1:
        raise SystemExit("--repeat and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    x, y, source = load_batch(args.batch, args.data)
    print(f"# data {source}, batch {args.batch}, tol {args.tol}, max_iter {args.max_iter}, "
          f"threads {args.threads}, repeat {args.repeat}, torch {torch.__version__}, "
          f"cpus {os.cpu_count()}, load avg {os.getloadavg()[0]:.1f}", flush=True)
    rows: list[dict] = []
    for name in args.models:
        model = build_model(name).eval()
        ref = top_eigenvalues(model, LOSS, [(x, y)], k=max(args.ks), tol=1e-9, max_iter=400)
        want = np.asarray(ref.eigenvalues)
        print(f"## {name}: reference top-{max(args.ks)} "
              + ", ".join(f"{v:.6g}" for v in want), flush=True)
        for chunks in args.chunks:
            batches = split(x, y, chunks)
            for k in args.ks:
                runs = [("lanczos", 1)] + [("block-lanczos", b) for b in args.block_sizes]
                got: list[list[dict]] = [[] for _ in runs]
                for _ in range(args.repeat):  # interleaved, so load changes hit every run
                    for (method, b), out in zip(runs, got):
                        out.append(measure(model, batches, k, method, b, args.tol,
                                           args.max_iter))
                base = None
                for (method, b), out in zip(runs, got):
                    row = dict(out[0], model=name, chunks=chunks, k=k, method=method, b=b,
                               load_avg=os.getloadavg()[0])
                    for key in ("cpu_s", "wall_s"):
                        row[key] = statistics.median(o[key] for o in out)
                    vals = np.asarray(row["eigenvalues"][:k])
                    row["err"] = float(np.max(np.abs(vals - want[:k]) / np.abs(want[:k])))
                    base = base or row
                    row["cpu_ratio"] = row["cpu_s"] / base["cpu_s"]
                    row["wall_ratio"] = row["wall_s"] / base["wall_s"]
                    rows.append(row)
                    print(f"{name:6s} chunks={chunks} k={k} {method:13s} b={b} "
                          f"hvps={row['hvps']:4d} passes={row['passes']:4d} "
                          f"cpu={row['cpu_s']:6.1f}s wall={row['wall_s']:6.1f}s "
                          f"err={row['err']:.1e} conv={row['converged']} "
                          f"cpu/single={row['cpu_ratio']:.2f} "
                          f"wall/single={row['wall_ratio']:.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
