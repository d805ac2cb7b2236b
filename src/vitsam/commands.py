"""Sub-commands that drive the analysis and evaluation packages: analyze, prune, eval, corrupt,
import, finetune."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from .config import check_device


def _add_analyze(sub: Any) -> None:
    from .analysis.runner import ANALYSES

    s = sub.add_parser("analyze", help="Hessian, NTK, landscape, sparsity, attention of runs",
                       description="Analyse one or more run folders. Numbers go to each run's "
                                   "analysis.json, figures next to it; with several runs, "
                                   "comparison figures go to --out.")
    s.add_argument("runs", nargs="+", metavar="RUN_DIR")
    for name in ANALYSES:
        s.add_argument(f"--{name}", action="store_true", help=f"run the {name} analysis")
    s.add_argument("--all", action="store_true", help="every analysis")
    s.add_argument("--batches", type=int, default=4, help="batches of data per analysis")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--seed", type=int, default=0, help="which images are drawn")
    s.add_argument("--device", default="cpu")
    s.add_argument("--checkpoint", default="last", help="checkpoint name (default: last)")
    s.add_argument("--set", nargs="*", default=[], metavar="NAME.KEY=VALUE",
                   help="analysis settings, e.g. hessian.k=5 landscape.steps=11 ntk.seeds=[0,1,2]")
    s.add_argument("--out", help="folder for comparison figures (default: <first run>/../compare)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_cmd_analyze)


def _cmd_analyze(args: argparse.Namespace) -> None:
    from .analysis.runner import ANALYSES, Request, analyze, draw, summarize
    from .train.checkpoint import run_labels

    names = list(ANALYSES) if args.all else [n for n in ANALYSES if getattr(args, n)]
    if not names:
        raise ValueError("choose at least one analysis: " +
                         " ".join(f"--{n}" for n in ANALYSES) + " (or --all)")
    if args.batches < 1 or args.batch_size < 1:
        raise ValueError("--batches and --batch-size must be positive")
    check_device(args.device)
    req = Request(names, args.batches, args.batch_size, args.seed, args.device, args.checkpoint,
                  list(args.set))
    per_run = {}
    for run_dir in args.runs:
        entries = analyze(run_dir, req, progress=not args.quiet)
        per_run[run_dir] = entries
        for name, entry in entries.items():
            draw(name, [(Path(run_dir).name, entry["result"])], Path(run_dir))
        print(f"\n{run_dir}")
        for name, entry in entries.items():
            print(f"  {name:<10} {summarize(name, entry['result'])}  ({entry['time_s']:.1f}s)")
        print(f"  -> {Path(run_dir) / 'analysis.json'}")
    if len(args.runs) > 1:
        out = Path(args.out) if args.out else Path(args.runs[0]).parent / "compare"
        labels = run_labels(args.runs)
        for name in names:
            draw(name, [(lab, per_run[r][name]["result"]) for lab, r in zip(labels, args.runs)],
                 out)
        print(f"comparison figures -> {out}")
        if (out / "hessian_per_block.md").exists() and "hessian" in names:
            print("\nHessian per block (" + ", ".join(labels) + "):\n"
                  + (out / "hessian_per_block.md").read_text())


def _add_prune(sub: Any) -> None:
    s = sub.add_parser("prune", help="remove idle MLP units; writes a new run folder",
                       description="Structured pruning of MLP hidden units that never activate "
                                   "on a calibration set (optionally down to a ratio).")
    s.add_argument("runs", nargs="+", metavar="RUN_DIR")
    s.add_argument("--out", required=True, help="new run folder for the pruned model (with "
                                                "several runs: a folder holding one per run "
                                                "and the overlaid curve)")
    s.add_argument("--calib", type=int, default=256, help="calibration images (train split)")
    s.add_argument("--ratio", type=float, help="also remove the least active units down to "
                                               "this fraction of all MLP units removed")
    s.add_argument("--tol", type=float, default=1e-6, help="|activation| below which a unit "
                                                            "counts as dead")
    s.add_argument("--finetune-steps", type=int, default=0)
    s.add_argument("--curve", action="store_true", help="accuracy against fraction removed")
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--device", default="cpu")
    s.add_argument("--no-speed", action="store_true", help="skip measuring images/s")
    s.set_defaults(func=_cmd_prune)


def _cmd_prune(args: argparse.Namespace) -> None:
    from .analysis.prune import DEFAULT_RATIOS, figures, prune_run

    from .train.checkpoint import run_labels

    check_device(args.device)
    several = len(args.runs) > 1
    names = [Path(r).name for r in args.runs]
    if several and len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"several runs are named {', '.join(twice)}; their pruned copies would "
                         f"share {Path(args.out) / twice[0]}: prune them in separate calls")
    curves = []
    for run, label in zip(args.runs, run_labels(args.runs)):
        out = Path(args.out) / Path(run).name if several else Path(args.out)
        rep = prune_run(run, out, calib=args.calib, ratio=args.ratio, tol=args.tol,
                        finetune_steps=args.finetune_steps, batch_size=args.batch_size,
                        device=args.device, measure_speed=not args.no_speed,
                        curve_ratios=DEFAULT_RATIOS if args.curve else None)
        _print_prune(run, rep)
        print(f"pruned run -> {out}")
        if "curve" in rep:
            curves.append((label, rep["curve"]))
    if several and curves:
        print(f"accuracy against units removed -> {figures(curves, args.out)[0]}")


def _print_prune(run: str, rep: dict[str, Any]) -> None:
    rows = [("parameters", "params_before", "params_after", "{:,.0f}"),
            ("FLOPs / image", "flops_before", "flops_after", "{:,.0f}"),
            ("images/s", "images_per_s_before", "images_per_s_after", "{:,.1f}"),
            ("test accuracy", "test_acc_before", "test_acc_after", "{:.4f}")]
    print(f"\n{Path(run).name}\n{'':<16} {'before':>16} {'after':>16}")
    for label, a, b, fmt in rows:
        if a in rep and b in rep:
            print(f"{label:<16} {fmt.format(rep[a]):>16} {fmt.format(rep[b]):>16}")


def _add_eval(sub: Any) -> None:
    s = sub.add_parser("eval", help="accuracy, calibration, corruptions, shifts, throughput",
                       description="Evaluate runs: top-1/top-5/ECE on the test split, and "
                                   "optionally on a corruption set, other test folders, ReaL-"
                                   "style labels, and throughput. Results go to eval.json.")
    s.add_argument("runs", nargs="+", metavar="RUN_DIR")
    s.add_argument("--data", help="evaluate on this data source's test split instead of the "
                                  "run's own (same classes), e.g. cifar10 with --root")
    s.add_argument("--root", help="root folder for --data")
    s.add_argument("--corruptions", metavar="DIR", help="a set built by `vitsam corrupt`")
    s.add_argument("--baseline", help="RUN_DIR (or 'alexnet' for true ImageNet-C) for mCE")
    s.add_argument("--folder", metavar="DIR", help="a second test folder of the training "
                                                   "classes (ImageNet-V2 style)")
    s.add_argument("--mapped-folder", metavar="DIR", help="a folder whose classes map onto a "
                                                          "subset of the training classes")
    s.add_argument("--mapping", metavar="JSON", help="{folder class: training class} for "
                                                     "--mapped-folder (ImageNet-R/A style)")
    s.add_argument("--real", metavar="JSON", help="multi-label (ReaL-style) label sets for the "
                                                  "test split, or for --real-images: {path relative "
                                                  "to the test folder: [labels]}, or a list in "
                                                  "file-name order")
    s.add_argument("--real-images", metavar="DIR", help="images the --real labels refer to")
    s.add_argument("--bad-files", choices=("error", "skip"),
                   help="image files of --folder, --mapped-folder, --real-images (and --data) that "
                        "cannot be decoded: stop naming them all (error), or leave them out and "
                        "count them (skip); default: the run's data.bad_files")
    s.add_argument("--throughput", action="store_true", help="inference and training images/s")
    s.add_argument("--attack", choices=("pgd", "autoattack"),
                   help="robust accuracy under an L-inf attack, beside clean accuracy on the same "
                        "images: PGD with random restarts, or torchattacks' standard AutoAttack")
    s.add_argument("--attack-eps", type=_fraction, default=8 / 255, metavar="EPS",
                   help="L-inf radius in pixel units of [0, 1] images (default 8/255)")
    s.add_argument("--attack-steps", type=int, default=20, help="PGD iterations (default 20)")
    s.add_argument("--attack-restarts", type=int, default=2, help="PGD random starts (default 2)")
    s.add_argument("--attack-step-size", type=_fraction, metavar="ALPHA",
                   help="PGD step in pixel units (default 2.5 * eps / steps)")
    s.add_argument("--attack-samples", type=int, metavar="N",
                   help="attack a seeded subset of N test images (AutoAttack is slow on CPU)")
    s.add_argument("--attack-seed", type=int, default=0, help="the subset's and starts' seed")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--device", default="cpu")
    s.add_argument("--checkpoint", default="last")
    s.add_argument("--out", help="folder for comparison figures (default: <first run>/../compare)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_cmd_eval)


def _fraction(text: str) -> float:
    """A number or a fraction such as 8/255 (argparse type: a bad one is a usage error)."""
    from .config import ConfigError, _number

    try:
        return _number(text)
    except (ValueError, ConfigError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a fraction like 8/255") from None


def _cmd_eval(args: argparse.Namespace) -> None:
    from .eval.runner import EvalRequest, evaluate_run, report

    if bool(args.mapping) != bool(args.mapped_folder):
        raise ValueError("--mapping and --mapped-folder go together")
    if args.baseline and not args.corruptions:
        raise ValueError("--baseline needs --corruptions (mCE is relative to a baseline's errors)")
    if args.root and not args.data:
        raise ValueError("--root goes with --data (the data source it is the root of)")
    attack_opts = [o for o, v, d in (("--attack-steps", args.attack_steps, 20),
                                     ("--attack-restarts", args.attack_restarts, 2),
                                     ("--attack-step-size", args.attack_step_size, None),
                                     ("--attack-samples", args.attack_samples, None)) if v != d]
    if attack_opts and not args.attack:
        raise ValueError(f"{attack_opts[0]} goes with --attack pgd or --attack autoattack")
    if args.real_images and not args.real:
        raise ValueError("--real-images goes with --real (the labels of those images)")
    check_device(args.device)
    req = EvalRequest(args.data, args.root, args.corruptions, args.folder, args.mapped_folder,
                      args.mapping, args.real, args.real_images, args.throughput,
                      args.batch_size, args.device, args.checkpoint, args.bad_files,
                      args.attack, args.attack_eps, args.attack_steps, args.attack_restarts,
                      args.attack_step_size, args.attack_samples, args.attack_seed)
    results = {run: evaluate_run(run, req, progress=not args.quiet) for run in args.runs}
    report(results, req, args.baseline, args.out, progress=not args.quiet)
    for run in args.runs:
        print(f"-> {Path(run) / 'eval.json'}")


def _add_corrupt(sub: Any) -> None:
    from .data.corruptions import PARAM_SETS

    s = sub.add_parser("corrupt", help="build a '-C' corruption benchmark of a test set",
                       description="Apply the 15 standard corruptions (optionally the 4 held-out "
                                   "ones) at 5 severities to a test split; deterministic, "
                                   "parallel, resumable. Evaluate with `vitsam eval --corruptions`.")
    s.add_argument("--out", required=True, help="folder of the corruption set")
    s.add_argument("--data", default="mnist5k", help="data source (as data.source)")
    s.add_argument("--root", help="root folder for the data source")
    s.add_argument("--run", metavar="RUN_DIR", help="use this run's data set and image size")
    s.add_argument("--img-size", type=int, help="resize images to this size first")
    s.add_argument("--params", choices=PARAM_SETS, default="imagenet-c",
                   help="corruption parameters: ImageNet-C's or the milder CIFAR-10-C's")
    s.add_argument("--extra", action="store_true", help="add the 4 held-out corruptions")
    s.add_argument("--corruptions", help="comma-separated subset of corruption names")
    s.add_argument("--severities", default="1,2,3,4,5")
    s.add_argument("--limit", type=int, help="a seeded random subset of this many test images")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_cmd_corrupt)


def _cmd_corrupt(args: argparse.Namespace) -> None:
    from .data.corruptions import build_corruption_set, contact_sheet, incomplete_reason, load_corruption_set
    from .eval.runner import corruption_source

    try:
        severities = [int(v) for v in args.severities.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--severities {args.severities!r} must be comma-separated integers "
                         "from 1 to 5, e.g. 1,3,5") from None
    names = None
    if args.corruptions is not None:
        names = [c.strip() for c in args.corruptions.split(",") if c.strip()]
        if not names:
            raise ValueError("--corruptions lists no names; give comma-separated corruption "
                             "names (e.g. gaussian_noise,fog) or leave it out for all")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be a positive number of images, got {args.limit}")
    if args.img_size is not None and args.img_size < 1:
        raise ValueError(f"--img-size must be a positive number of pixels, got {args.img_size}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file; give a folder for the corruption set")
    images, labels, desc = corruption_source(args.data, args.root, args.run, args.img_size,
                                             args.limit, args.seed)
    out = build_corruption_set(images, labels, args.out, params=args.params, corruptions=names,
                               severities=severities, extra=args.extra, seed=args.seed,
                               workers=args.workers, progress=not args.quiet, source=desc)
    sheet = contact_sheet(images[0], Path(out) / "contact_sheet.png", params=args.params,
                          corruptions=names, severities=severities, extra=args.extra,
                          seed=args.seed)
    built = (f"{len(labels)} images x {len(names or []) or (19 if args.extra else 15)} corruptions "
             f"x {len(severities)} severities ({args.params} parameters)")
    # Parts other builds of this folder requested may still be missing (one may still be running).
    why = incomplete_reason(load_corruption_set(out))
    if why:
        print(f"{built} built in {out}, but the set is incomplete: {why}; another `vitsam corrupt` "
              f"on {out} may still be building them (evaluate once it ends), else re-run "
              f"`vitsam corrupt --out {out}` with the arguments that asked for them\n"
              f"contact sheet -> {sheet}")
    else:
        print(f"{built} -> {out}\ncontact sheet -> {sheet}")


def _add_import(sub: Any) -> None:
    from .data.config import SOURCES

    s = sub.add_parser("import", help="a released ViT/Mixer checkpoint (.npz, timm .safetensors) "
                                      "as a run folder",
                       description="Map the .npz files of google-research/vision_transformer "
                                   "(ViT, Mixer; e.g. the SAM checkpoints) or a timm ViT/Mixer "
                                   "state dict saved as .safetensors onto the zoo's model, and "
                                   "write a run folder that analyze, eval, prune, finetune read.")
    s.add_argument("file", metavar="FILE", help="the .npz or .safetensors file (never downloaded)")
    s.add_argument("--out", required=True, help="new run folder")
    s.add_argument("--model", help="zoo model to map onto (default: the one of the file's shapes)")
    s.add_argument("--data", choices=SOURCES, help="data the run is analysed and evaluated on "
                                                   "(default: imagefolder, with --root)")
    s.add_argument("--root", help="root folder for --data (e.g. an ImageNet train/ val/ tree)")
    s.add_argument("--crop-pct", type=float, help="evaluation crop (default: timm's for these "
                                                  "weights, 0.9 ViT, 0.875 Mixer)")
    s.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides of the run folder, e.g. optim.sam=true optim.rho=0.05 "
                        "data.val_split=val")
    s.set_defaults(func=_cmd_import)


def _cmd_import(args: argparse.Namespace) -> None:
    from .train.importer import describe_import, import_checkpoint

    if args.root and not args.data:
        raise ValueError("--root goes with --data (the data source it is the root of)")
    summary = import_checkpoint(args.file, args.out, model=args.model, data=args.data,
                                root=args.root, crop_pct=args.crop_pct, overrides=list(args.set))
    print(describe_import(summary))


def _add_finetune(sub: Any) -> None:
    from .data.config import SOURCES

    s = sub.add_parser("finetune", help="fine-tune a run (or an imported checkpoint) on other "
                                        "data, at another resolution",
                       description="Train a new run starting from RUN_DIR's weights: new "
                                   "classifier for the new classes, ViT position embedding "
                                   "resampled to --img-size; SGD (momentum 0.9, lr 0.01, no "
                                   "weight decay) unless --set says otherwise (optim.sam=true "
                                   "for SAM).")
    s.add_argument("run", metavar="RUN_DIR")
    s.add_argument("--data", required=True, choices=SOURCES, help="the new data source")
    s.add_argument("--root", help="root folder for --data")
    s.add_argument("--img-size", type=int, help="image size (default: the source model's)")
    s.add_argument("--checkpoint", default="last", help="checkpoint of RUN_DIR (default: last)")
    s.add_argument("--out", required=True, help="folder of the new run")
    s.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. train.epochs=3 optim.sam=true optim.lr=0.003")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_finetune)


def _cmd_finetune(args: argparse.Namespace) -> None:
    from .cli import _print_final
    from .train.engine import train
    from .train.finetune import finetune_config

    if Path(args.out).resolve() == Path(args.run).resolve():
        raise ValueError("--out must differ from RUN_DIR; the fine-tuned model is a new run")
    cfg = finetune_config(args.run, args.data, args.root, args.img_size, args.checkpoint,
                          list(args.set))
    final = train(cfg, run_dir=args.out, progress=not args.quiet)
    init = final.get("init") or {}
    grid = init.get("pos_embed")
    if init:  # model.init_from=null: the same recipe from random weights (a scratch baseline)
        print(f"started from {init.get('from')} ({init.get('checkpoint')}): classifier "
              f"{init.get('head')}" + (f", position embedding {grid[0]}x{grid[0]} -> "
                                       f"{grid[1][0]}x{grid[1][1]}" if grid else ""))
    else:
        print("started from random weights (model.init_from=null)")
    _print_final([final])


def register_all() -> list[Callable[[Any], None]]:
    """Functions that each add one sub-command to the ``vitsam`` parser."""
    return [_add_analyze, _add_prune, _add_eval, _add_corrupt, _add_import, _add_finetune]
