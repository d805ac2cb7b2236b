"""Benchmark: top Hessian eigenvalues with vitsam against PyHessian and curvlinops (CPU).

Three sections per model (small ViT, MLP-Mixer, ResNet at 32 px, one batch):

1. HVP cost: CPU seconds per Hessian-vector product for vitsam's backends.
2. Equal accuracy (top-1): lambda_max estimate after every HVP for vitsam's Lanczos and for
   PyHessian's power iteration; HVPs and CPU seconds until each is within 1e-2/1e-3/1e-4 of
   the reference (a Lanczos run at tol 1e-8).
3. Default settings: every tool at the same tolerance (1e-3), iteration cap and batch, for
   k = 1 and 5: eigenvalues, HVPs, CPU and wall seconds, ratios to PyHessian, peak memory.
   ``--repeat N`` runs every tool N times, interleaved, and reports median times.

Every measurement runs in its own subprocess so that its peak resident memory can be read
from ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (peak RSS) minus the RSS just before the
call (``/proc/self/statm``): torch allocates outside Python's allocator, so tracemalloc would
see nothing. Times cover the eigenvalue call only (model construction excluded). Tools
(``--tools``): vitsam, vitsam-change (Lanczos stopped by PyHessian's test: relative change of
the eigenvalues between two steps below tol), vitsam-power, vitsam-random (random start
vector), vitsam-func (torch.func HVPs), vitsam@TOL (other tolerance), pyhessian, curvlinops.

    python bench/bench_hessian.py            # full run, about 15 minutes on one core
    python bench/bench_hessian.py --quick    # batch 32, ViT only, about 3 minutes
"""
from __future__ import annotations

import argparse
import gc
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
MODELS = ("vit", "mixer", "resnet")


# ---------------------------------------------------------------------------------------------
# Shared helpers (also used by bench_ntk.py)
# ---------------------------------------------------------------------------------------------
def build_model(name: str, seed: int = 0, num_classes: int = 10) -> nn.Module:
    """Small 32 px models of the three families, built directly with timm."""
    import timm
    from timm.models.mlp_mixer import MlpMixer
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(seed)
    if name == "vit":
        return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2,
                                 embed_dim=128, num_heads=4, num_classes=num_classes)
    if name == "mixer":
        return MlpMixer(num_classes=num_classes, img_size=32, patch_size=4, num_blocks=2,
                        embed_dim=128)
    if name == "resnet":
        return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes,
                      channels=(64, 96, 128, 192))
    raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")


def find_cifar() -> Path | None:
    here = Path(__file__).resolve().parent.parent
    for root in (here.parent / "shared", Path.cwd().parent / "shared"):
        p = root / "data" / "cifar10-jpeg.tar.gz"
        if p.exists():
            return p
    return None


def load_batch(n: int, data: str = "auto", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    """n normalised 32x32 images and labels: CIFAR-10 test images read straight from the
    shared tarball (nothing unpacked), or Gaussian noise with random labels."""
    path = find_cifar() if data in ("auto", "cifar") else None
    if data == "cifar" and path is None:
        raise SystemExit("--data cifar: ../shared/data/cifar10-jpeg.tar.gz not found")
    gen = torch.Generator().manual_seed(seed)
    if path is None:
        x = torch.randn(n, 3, 32, 32, generator=gen)
        return x, torch.randint(0, 10, (n,), generator=gen), "random"
    from PIL import Image

    members: list[tuple[str, bytes]] = []
    with tarfile.open(path, "r:gz") as tar:
        for m in tar:
            if m.isfile() and m.name.startswith("cifar10/test/") and m.name.endswith(".jpg"):
                members.append((m.name, tar.extractfile(m).read()))
            elif members and not m.name.startswith("cifar10/test/"):
                break  # the test split comes first in the archive
    members.sort()
    classes = sorted({name.split("/")[2] for name, _ in members})
    pick = torch.randperm(len(members), generator=gen)[:n].tolist()
    imgs, labels = [], []
    for i in pick:
        name, raw = members[i]
        arr = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=np.float32) / 255.0
        imgs.append(torch.from_numpy(arr).permute(2, 0, 1))
        labels.append(classes.index(name.split("/")[2]))
    x = torch.stack(imgs)
    x = (x - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return x, torch.tensor(labels), "cifar10-test"


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_worker(spec: dict) -> dict:
    """Run one measurement in this process; returns a JSON-able dict."""
    torch.set_num_threads(spec["threads"])
    script = spec.get("script", "hessian")
    data = torch.load(spec["data_file"])
    model = build_model(spec["model"], seed=0).eval()
    gc.collect()
    base = current_rss_mb()
    if script == "ntk":
        from bench_ntk import measure  # noqa: E402  (same folder)
        out = measure(spec, model, data["x"])
    elif spec["tool"].startswith("traj-"):
        out = trajectory(spec, model, data["x"], data["y"])
    elif spec["tool"] == "hvp-costs":
        out = hvp_costs(spec, model, data["x"], data["y"])
    else:
        out = measure_hessian(spec, model, data["x"], data["y"])
    out["peak_mb"] = peak_rss_mb() - base
    return out


def spawn(spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# The Hessian tools
# ---------------------------------------------------------------------------------------------
def measure_hessian(spec: dict, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    from vitsam.models.attention import math_attention

    tool, k, tol, cap = spec["tool"], spec["k"], spec["tol"], spec["max_iter"]
    loss = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    c0 = time.process_time()
    if tool.startswith("vitsam"):
        from vitsam.analysis.hessian import top_eigenvalues

        # "vitsam[-variant][@tol]": the variant switches one setting away from the defaults.
        variant, _, tol_str = tool.partition("@")
        tol = float(tol_str) if tol_str else tol
        method = "power" if variant == "vitsam-power" else "lanczos"
        start = "random" if variant == "vitsam-random" else "gradient"
        backend = "func" if variant == "vitsam-func" else "auto"
        stop = "change" if variant == "vitsam-change" else "residual"
        r = top_eigenvalues(model, loss, [(x, y)], k=k, method=method, tol=tol, max_iter=cap,
                            start=start, backend=backend, stop=stop, seed=spec["seed"])
        vals, hvps = r.eigenvalues, r.num_hvps
    elif tool == "pyhessian":
        import importlib

        ph = importlib.import_module("pyhessian.hessian")  # the module, not the class
        counter = {"n": 0}
        orig = ph.hessian_vector_product

        def counted(*a):
            counter["n"] += 1
            return orig(*a)

        ph.hessian_vector_product = counted
        # PyHessian double-backpropagates through the model; timm's fused CPU attention has
        # no double backward, so the explicit softmax path is switched on around it.
        try:
            with math_attention(model):
                torch.manual_seed(spec["seed"])
                h = ph.hessian(model, loss, data=(x, y), cuda=False)
                vals, _ = h.eigenvalues(maxIter=cap, tol=tol, top_n=k)
        finally:
            ph.hessian_vector_product = orig
        hvps = counter["n"]
        model.zero_grad(set_to_none=True)
    elif tool == "curvlinops":
        from curvlinops import HessianLinearOperator
        from scipy.sparse.linalg import LinearOperator, eigsh

        with math_attention(model):
            params = [p for p in model.parameters() if p.requires_grad]
            op = HessianLinearOperator(model, loss, params, [(x, y)], check_deterministic=False)
            lin = op.to_scipy()
            counter = {"n": 0}
            inner = lin.matvec

            def mv(v):  # count products without touching curvlinops
                counter["n"] += 1
                return inner(v)

            counted = LinearOperator(lin.shape, matvec=mv, dtype=lin.dtype)
            v0 = np.random.default_rng(spec["seed"]).standard_normal(lin.shape[0]).astype(lin.dtype)
            w = eigsh(counted, k=k, which="LA", tol=tol, v0=v0, maxiter=cap,
                      return_eigenvectors=False, ncv=max(2 * k + 1, 20))
        vals = sorted((float(v) for v in w), reverse=True)
        hvps = counter["n"]
    else:
        raise ValueError(f"unknown tool {tool!r}")
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"eigenvalues": [float(v) for v in vals], "hvps": hvps, "seconds": seconds,
            "cpu_seconds": cpu}


def trajectory(spec: dict, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """lambda_max estimate after every HVP, with cumulative CPU seconds since the start.

    ``traj-vitsam``: vitsam's Lanczos (default start) run to a residual of 1e-9;
    ``traj-pyhessian``: PyHessian's power iteration with its tolerance set to 1e-9, i.e. an
    oracle that stops PyHessian exactly when it first gets close enough (never slower than
    PyHessian's own stopping rule at equal accuracy).
    """
    import importlib

    from vitsam.models.attention import math_attention

    loss, cap = nn.CrossEntropyLoss(), spec["max_iter"]
    c0 = time.process_time()
    hist: list[tuple[int, float, float]] = []  # (hvps, cpu seconds, estimate)
    if spec["tool"] == "traj-vitsam":
        from vitsam.analysis.hessian import HessianOperator, analysis_state, lanczos

        with analysis_state(model):
            op = HessianOperator(model, loss, [(x, y)])
            v0 = op.start_vector(torch.Generator().manual_seed(spec["seed"]), "gradient")

            def stop(theta, s, b):
                hist.append((op.num_hvps, time.process_time() - c0, float(theta[-1])))
                return b * abs(s[-1, -1]) <= 1e-9 * abs(theta[-1])

            lanczos(op.matvec, v0, cap, stop)
    else:
        ph = importlib.import_module("pyhessian.hessian")
        orig = ph.hessian_vector_product

        def logged(grads, params, v):
            hv = orig(grads, params, v)
            rq = float(sum((a * b).sum() for a, b in zip(hv, v)))
            hist.append((len(hist) + 1, time.process_time() - c0, rq))
            return hv

        ph.hessian_vector_product = logged
        with math_attention(model):
            torch.manual_seed(spec["seed"])
            h = ph.hessian(model, loss, data=(x, y), cuda=False)
            h.eigenvalues(maxIter=cap, tol=1e-9, top_n=1)
    return {"history": hist}


def hvp_costs(spec: dict, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """CPU seconds per HVP: cached double backward (one batch), double backward recomputing
    the graph (the multi-batch path), and torch.func jvp-over-grad; median of 3 after warm-up."""
    from vitsam.analysis.hessian import HessianOperator, analysis_state

    out = {}
    with analysis_state(model):
        for label, backend, cache in (("autograd-cached", "autograd", True),
                                      ("autograd", "autograd", False), ("func", "func", False)):
            op = HessianOperator(model, nn.CrossEntropyLoss(), [(x, y)], backend, cache)
            v = op.random_vector(torch.Generator().manual_seed(0))
            op.matvec(v)
            times = []
            for _ in range(3):
                c0 = time.process_time()
                op.matvec(v)
                times.append(time.process_time() - c0)
            out[label] = float(np.median(times))
    return out


def steps_to(hist: list, ref: float, rel: float) -> tuple[int, float] | None:
    """First (hvps, cpu s) after which the estimate stays within rel of ref."""
    ok = None
    for n, c, v in hist:
        if abs(v - ref) <= rel * abs(ref):
            ok = ok or (n, c)
        else:
            ok = None
    return ok


TOOLS_K1 = ["vitsam", "vitsam-change", "vitsam-power", "pyhessian", "curvlinops"]
TOOLS_KN = ["vitsam", "vitsam-change", "pyhessian", "curvlinops"]


def median_run(runs: list[dict]) -> dict:
    """One row from repeated runs of the same spec: the first run's results with the median
    wall, CPU seconds and peak memory (each taken separately)."""
    ok = [r for r in runs if "seconds" in r]
    if len(ok) < len(runs):
        return next(r for r in runs if "seconds" not in r)
    row = dict(ok[0])
    for key in ("seconds", "cpu_seconds", "peak_mb"):
        row[key] = float(np.median([r[key] for r in ok]))
    row["repeats"] = len(ok)
    return row


def report(rows: list[dict]) -> None:
    """Add ratios against the PyHessian row of the same (model, k) and print one line each."""
    ph = next((r for r in rows if r["tool"] == "pyhessian" and "seconds" in r), None)
    nan = float("nan")
    for row in rows:
        if "seconds" not in row:
            print(f"{row['model']:6s} k={row['k']} {row['tool']:14s} ERROR {row.get('error')}")
            continue
        if ph:
            row["wall_vs_pyhessian"] = row["seconds"] / ph["seconds"]
            row["cpu_vs_pyhessian"] = row["cpu_seconds"] / ph["cpu_seconds"]
            row["lmax_diff_vs_pyhessian"] = (abs(row["eigenvalues"][0] - ph["eigenvalues"][0])
                                             / abs(ph["eigenvalues"][0]))
        print(f"{row['model']:6s} k={row['k']} {row['tool']:14s} "
              f"lmax={row['eigenvalues'][0]:9.5g} err={row.get('rel_err_lmax', nan):7.1e} "
              f"errk={row.get('max_rel_err', nan):7.1e} hvps={row['hvps']:4d} "
              f"cpu={row['cpu_seconds']:6.1f}s wall={row['seconds']:6.1f}s "
              f"cpu/PyH={row.get('cpu_vs_pyhessian', nan):5.2f} "
              f"wall/PyH={row.get('wall_vs_pyhessian', nan):5.2f} "
              f"dlmax/PyH={row.get('lmax_diff_vs_pyhessian', nan):7.1e} "
              f"peak={row['peak_mb']:5.0f}MB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 32, ViT only")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 5])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--max-iter", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per tool in the default-settings section (median times)")
    ap.add_argument("--data", default="auto", choices=("auto", "cifar", "random"))
    ap.add_argument("--tools", nargs="+", help="override the tool list (default: "
                    f"{' '.join(TOOLS_K1)} for k=1, {' '.join(TOOLS_KN)} for k>1)")
    ap.add_argument("--skip", nargs="*", default=[], choices=("default", "accuracy", "hvp"),
                    help="sections to leave out")
    ap.add_argument("--json", type=Path, help="also write all rows to this JSON file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return
    if args.quick:
        args.batch, args.models = 32, ["vit"]
    if args.repeat < 1:
        raise SystemExit("--repeat must be at least 1")
    x, y, source = load_batch(args.batch, args.data)
    tmp = tempfile.NamedTemporaryFile(suffix=".pt", delete=False)
    torch.save({"x": x, "y": y}, tmp.name)
    print(f"# data: {source}, batch {args.batch}, tol {args.tol}, max_iter {args.max_iter}, "
          f"threads {args.threads}, repeat {args.repeat}, torch {torch.__version__}, cpus {os.cpu_count()}, "
          f"load avg {os.getloadavg()[0]:.1f}")
    out: dict = {"default": [], "accuracy": [], "hvp": []}
    try:
        for name in args.models:
            common = dict(model=name, seed=0, threads=args.threads, data_file=tmp.name)
            # Ground truth for the accuracy columns: a tight vitsam Lanczos run.
            ref = spawn(dict(common, tool="vitsam", k=max(args.ks), tol=1e-8, max_iter=200))
            if "eigenvalues" not in ref:
                print(f"{name}: reference run failed: {ref.get('error')}")
                continue
            print(f"## {name}: reference top-{max(args.ks)} = "
                  + ", ".join(f"{v:.6g}" for v in ref["eigenvalues"]))
            if "hvp" not in args.skip:
                r = spawn(dict(common, tool="hvp-costs"))
                r["model"] = name
                out["hvp"].append(r)
                print(f"{name:6s} CPU s per HVP: cached double backward "
                      f"{r['autograd-cached']:.3f}, "
                      f"double backward {r['autograd']:.3f}, torch.func jvp(grad) {r['func']:.3f}")
            if "accuracy" not in args.skip:
                lref = ref["eigenvalues"][0]
                trajs = {t: spawn(dict(common, tool=t, max_iter=args.max_iter))
                         for t in ("traj-vitsam", "traj-pyhessian")}
                for rel in (1e-2, 1e-3, 1e-4):
                    got = {t: steps_to(r.get("history", []), lref, rel) for t, r in trajs.items()}
                    cells = []
                    for t, g in got.items():
                        cells.append(f"{t[5:]}: " + (f"{g[0]:3d} HVPs {g[1]:6.1f}s" if g else
                                                     f">{args.max_iter} HVPs"))
                    a, b = got["traj-vitsam"], got["traj-pyhessian"]
                    ratio = f"cpu vitsam/PyH={a[1] / b[1]:.2f}" if a and b else ""
                    print(f"{name:6s} |lmax-ref|<={rel:.0e}: " + "  ".join(cells) + "  " + ratio)
                    out["accuracy"].append({"model": name, "rel": rel, **got})
            if "default" in args.skip:
                continue
            for k in args.ks:
                tools = args.tools or (TOOLS_K1 if k == 1 else TOOLS_KN)
                specs = [dict(common, tool=t, k=k, tol=args.tol, max_iter=args.max_iter)
                         for t in tools]
                runs: list[list[dict]] = [[] for _ in specs]
                for _ in range(args.repeat):  # interleaved, so load changes hit every tool
                    for spec, got in zip(specs, runs):
                        got.append(spawn(spec))
                rows = []
                for spec, got in zip(specs, runs):
                    row = {**spec, **median_run(got)}
                    row.pop("data_file")
                    if "eigenvalues" in row:
                        got = np.asarray(row["eigenvalues"][:k])
                        want = np.asarray(ref["eigenvalues"][:k])
                        row["rel_err_lmax"] = float(abs(got[0] - want[0]) / abs(want[0]))
                        row["max_rel_err"] = float(np.max(np.abs(got - want) / np.abs(want)))
                    rows.append(row)
                report(rows)
                out["default"] += rows
    finally:
        os.unlink(tmp.name)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
