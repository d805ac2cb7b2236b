"""``vitsam pretrain`` and ``vitsam probe``."""
from __future__ import annotations

import argparse
from typing import Any

from .simclr import OBJECTIVES


def add_pretrain(sub: Any) -> None:
    s = sub.add_parser("pretrain", help="self-supervised pre-training (SimCLR), plain or SAM",
                       description="Pre-train a run preset's model without labels: SimCLR's "
                                   "NT-Xent on two random views of each image, through the "
                                   "training engine (optim.sam=true for SAM). The run folder "
                                   "resumes like a training run; `vitsam probe` and `vitsam "
                                   "finetune` read it.")
    s.add_argument("--objective", default="simclr", choices=OBJECTIVES)
    s.add_argument("--preset", help="named run preset (see `vitsam presets`)")
    s.add_argument("--smoke", action="store_true", help="the preset's tiny smoke size")
    s.add_argument("--run-dir", help="run folder (default: runs/<objective>-<name>-<time>)")
    s.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted pre-training run")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("overrides", nargs="*",
                   help="key=value, e.g. train.epochs=50 optim.sam=true pretrain.temperature=0.2")
    s.set_defaults(func=_cmd_pretrain)


def _cmd_pretrain(args: argparse.Namespace) -> None:
    from ..train.engine import train
    from . import pretrain_config

    if args.resume:
        if args.overrides or args.preset or args.smoke or args.run_dir:
            raise ValueError("--resume continues a run in its own folder with its saved config; "
                             "drop --preset, --smoke, --run-dir and the overrides")
        final = train(resume=args.resume, progress=not args.quiet)
    else:
        if not args.preset:
            raise ValueError("give --preset (e.g. --preset mnist-vit; `vitsam presets` lists them)")
        cfg = pretrain_config(args.preset, args.objective, args.smoke, args.overrides)
        final = train(cfg, run_dir=args.run_dir, progress=not args.quiet)
    if "probe_acc" not in final:
        raise ValueError(f"{final['run_dir']} is a supervised run; `vitsam train --resume` "
                         "continues those")
    print(f"\n{final['name']}: contrastive loss {_last(final, 'loss')}, linear probe "
          f"{final['probe_acc'] * 100:.2f}% test ({final['train_acc'] * 100:.2f}% train), "
          f"kNN {final['knn_acc'] * 100:.2f}%, {final['wall_time_s']:.1f}s\n  -> {final['run_dir']}")


def _last(final: dict[str, Any], key: str) -> str:
    from pathlib import Path

    from ..io import read_jsonl

    vals = [r[key] for r in read_jsonl(Path(final["run_dir"]) / "metrics.jsonl") if key in r]
    return f"{vals[-1]:.4f}" if vals else "n/a"


def add_probe(sub: Any) -> None:
    from ..data.config import SOURCES

    s = sub.add_parser("probe", help="linear probe (and kNN) on a run's frozen features",
                       description="Fit multinomial logistic regression (full-batch L-BFGS) on "
                                   "the frozen features of RUN_DIR's encoder (a pre-training run, "
                                   "or any run without its classifier) and report its test "
                                   "accuracy; written to RUN_DIR/probe.json.")
    s.add_argument("run", metavar="RUN_DIR")
    s.add_argument("--data", choices=SOURCES, help="data source (default: the run's own)")
    s.add_argument("--root", help="root folder for --data")
    s.add_argument("--checkpoint", default="last", help="checkpoint of RUN_DIR (default: last)")
    s.add_argument("--train-samples", type=int, default=10000,
                   help="training images the probe is fitted on (default 10000; 0 = all)")
    s.add_argument("--test-samples", type=int, default=0, help="test images (default 0 = all)")
    s.add_argument("--l2", type=float, default=1e-4, help="L2 penalty on the probe's weights")
    s.add_argument("--knn-k", type=int, default=20, help="neighbours of the kNN vote")
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=_cmd_probe)


def _cmd_probe(args: argparse.Namespace) -> None:
    from ..config import check_device
    from .probe import probe_run

    check_device(args.device)
    res = probe_run(args.run, args.data, args.root, args.checkpoint,
                    args.train_samples or None, args.test_samples or None, args.l2, args.knn_k,
                    args.device)
    print(f"{args.run} ({res['checkpoint']}, {res['encoder']} features, {res['feature_dim']} "
          f"wide) on {res['data']}: linear probe {res['test_acc'] * 100:.2f}% test "
          f"({res['train_acc'] * 100:.2f}% train, {res['train_images']} images, {res['iters']} "
          f"L-BFGS evaluations), kNN {res['knn_acc'] * 100:.2f}%")
