"""SAM's own cost: vitsam.optim.SAM against the most used PyTorch SAM, in the same run.

The peer is davda54/sam's ``sam.py`` (not vendored: give its path with ``--peer``). Both are
driven through the shared API (``first_step`` / ``second_step``) on the same model with the
same gradients, so the timed part is the optimiser's own work: the gradient norm, building and
applying the perturbation, restoring the weights and the base optimiser's step. A full training
step (two forward/backward passes) is timed too, to show how much of a step that work is.
The updates of both are compared (they must agree to float precision).

    python bench/bench_sam.py --peer /path/to/davda54-sam/sam.py [--threads 1] [--repeats 20]
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

from vitsam.models import count_params, create_model
from vitsam.optim import SAM

MODELS = {
    "vit-s16@224": ("vit-s16", 224, {}),
    "vit-t4@32": ("vit-t4", 32, {}),
    "resnet50@224": ("resnet50", 224, {}),
}


def load_peer(path: str) -> type:
    spec = importlib.util.spec_from_file_location("peer_sam", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}; give the path of davda54/sam's sam.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.SAM


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def optimizer_work(opt: torch.optim.Optimizer, params: list[nn.Parameter],
                   g1: list[torch.Tensor], g2: list[torch.Tensor]) -> Callable[[], None]:
    """first_step with gradients g1, second_step with gradients g2 (no forward/backward)."""
    def run() -> None:
        for p, g in zip(params, g1):
            p.grad = g
        opt.first_step()
        for p, g in zip(params, g2):
            p.grad = g
        opt.second_step()
    return run


def full_step(opt: torch.optim.Optimizer, model: nn.Module, x: torch.Tensor,
              y: torch.Tensor) -> Callable[[], None]:
    loss_fn = nn.CrossEntropyLoss()

    def run() -> None:
        opt.zero_grad(set_to_none=True)  # never accumulate into the shared test gradients
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)
    return run


def bench(name: str, peer_cls: type, repeats: int, batch: int) -> dict[str, Any]:
    model_name, img, kw = MODELS[name]
    torch.manual_seed(0)
    base = create_model(model_name, 1000 if img == 224 else 10, img, 3, **kw)
    params = list(base.parameters())
    gen = torch.Generator().manual_seed(1)
    g1 = [torch.randn(p.shape, generator=gen) for p in params]
    g2 = [torch.randn(p.shape, generator=gen) for p in params]
    row: dict[str, Any] = {"model": name, "params": count_params(base), "tensors": len(params)}
    finals, setups = {}, {}
    for tool, cls in (("vitsam", SAM), ("peer", peer_cls)):  # one identical step each, untimed
        model = create_model(model_name, 1000 if img == 224 else 10, img, 3, **kw)
        model.load_state_dict(base.state_dict())
        ps = list(model.parameters())
        opt = cls(ps, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        optimizer_work(opt, ps, g1, g2)()
        finals[tool] = [p.detach().clone() for p in ps]
        setups[tool] = (model, ps, opt)
    nocos = SAM(setups["vitsam"][1], torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
                track_cosine=False)
    row["vitsam_nocos_opt_ms"] = median_ms(optimizer_work(nocos, setups["vitsam"][1], g1, g2),
                                           repeats)
    for tool, (model, ps, opt) in setups.items():
        row[f"{tool}_opt_ms"] = median_ms(optimizer_work(opt, ps, g1, g2), repeats)
        x = torch.randn(batch, 3, img, img, generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
        row[f"{tool}_step_ms"] = median_ms(full_step(opt, model, x, y), max(3, repeats // 5), 1)
    row["max_abs_update_diff"] = max(float((a - b).abs().max())
                                     for a, b in zip(finals["vitsam"], finals["peer"]))
    row["opt_ratio"] = row["vitsam_opt_ms"] / row["peer_opt_ms"]
    row["step_ratio"] = row["vitsam_step_ms"] / row["peer_step_ms"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer", required=True, help="path of davda54/sam's sam.py")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peer = load_peer(args.peer)
    print(f"torch {torch.__version__}, {args.threads} thread(s); times are medians in ms; "
          "ratio = vitsam / peer (below 1: vitsam faster)")
    print("opt = the optimiser's own work (first_step + second_step); 'no cos' = vitsam without "
          "the clean/perturbed gradient cosine it logs")
    print(f"{'model':<14} {'params':>8} {'tensors':>7} {'opt vitsam':>11} {'no cos':>7} "
          f"{'opt peer':>9} {'ratio':>6} {'step vitsam':>12} {'step peer':>10} {'ratio':>6} "
          f"{'max |dw|':>9}")
    for name in args.models:
        r = bench(name, peer, args.repeats, args.batch)
        print(f"{r['model']:<14} {r['params'] / 1e6:>7.1f}M {r['tensors']:>7} "
              f"{r['vitsam_opt_ms']:>11.1f} {r['vitsam_nocos_opt_ms']:>7.1f} "
              f"{r['peer_opt_ms']:>9.1f} {r['opt_ratio']:>6.2f} "
              f"{r['vitsam_step_ms']:>12.0f} {r['peer_step_ms']:>10.0f} {r['step_ratio']:>6.2f} "
              f"{r['max_abs_update_diff']:>9.1e}", flush=True)


if __name__ == "__main__":
    main()
