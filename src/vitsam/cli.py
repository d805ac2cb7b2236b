"""The ``vitsam`` command line: train, pretrain, probe, eval, analyze, prune, corrupt, import,
finetune, study, report, models, presets, demo."""
from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any, Callable

from .config import ConfigError
from .train.signals import Interrupted

# Errors that carry a message meant for the user (OSError: missing files, a file where a folder
# is expected, a full disk, no permission); anything else is a bug and shows its traceback.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, RuntimeError, KeyError)


def _cmd_models(args: argparse.Namespace) -> None:
    import torch

    from .models import MODELS, count_params, create_model

    print(f"{'name':<14} {'family':<7} {'params':>9}  {'img':>4}  description")
    for name, info in MODELS.items():
        # Parameter counts as the paper reports them: 1000 classes at the intended size; the
        # meta device builds the shapes without allocating weights.
        classes = 1000 if info.img_size == 224 else 10
        with torch.device("meta"):
            n = count_params(create_model(name, classes, info.img_size, 3))
        print(f"{name:<14} {info.family:<7} {n / 1e6:>8.1f}M  {info.img_size:>4}  "
              f"{info.description} [{classes} classes]")
    print("\nAny timm model name works too (randomly initialised).")


def _cmd_presets(args: argparse.Namespace) -> None:
    from .presets import PRESETS

    for name, make in PRESETS.items():
        print(f"{name:<22} {make().description}")


def _cmd_train(args: argparse.Namespace) -> None:
    from .config import RunConfig, apply_overrides
    from .presets import get_preset
    from .train.distributed import is_main_process
    from .train.engine import train

    if args.resume:
        if args.overrides or args.preset or args.smoke or args.run_dir or args.config:
            raise ValueError("--resume continues a run in its own folder with its saved config; "
                             "drop --preset, --smoke, --config, --run-dir and the overrides")
        final = train(resume=args.resume, progress=not args.quiet)
    else:
        if args.config and (args.preset or args.smoke):
            raise ValueError("--config gives the whole starting config; drop --preset and --smoke")
        cfg = (_config_file(args.config) if args.config else
               get_preset(args.preset, smoke_size=args.smoke) if args.preset else RunConfig())
        cfg = apply_overrides(cfg, args.overrides)
        final = train(cfg, run_dir=args.run_dir, progress=not args.quiet)
    if is_main_process():  # under torchrun, rank 0 alone prints
        _print_final([final])


def _config_file(path: str) -> Any:
    """The RunConfig saved in ``path`` (a run's config.json, or a study cell's)."""
    from .config import RunConfig, from_dict
    from .io import read_json

    try:
        return from_dict(RunConfig, read_json(path, "run config"))
    except ConfigError as exc:
        raise ConfigError(f"{exc} (in {path}; correct it there)") from None


def _print_final(finals: list[dict[str, Any]]) -> None:
    print(f"\n{'run':<22} {'test acc':>9} {'train acc':>10} {'time':>8} {'img/s':>7}  folder")
    for f in finals:
        ips = f.get("train_images_per_s") or 0.0
        print(f"{f['name']:<22} {f['test_acc'] * 100:>8.2f}% {f['train_acc'] * 100:>9.2f}% "
              f"{f['wall_time_s']:>7.1f}s {ips:>7.0f}  {f['run_dir']}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from .study.presets import get_study
    from .study.runner import run_study
    from .study.tables import collect
    from .study.reading import demo_reading

    study = get_study("demo")
    out = Path(args.out)
    print(f"vitsam demo: ViT and ResNet, each with and without SAM, on the embedded MNIST-5k "
          f"digits (4,000 train / 1,000 test), {args.workers} at a time; results under {out}/")
    record = run_study(study, "smoke" if args.smoke else "cpu", out, seeds=(0,),
                       workers=args.workers, overrides=args.overrides, progress=not args.quiet,
                       command="vitsam demo")
    rows = collect(out, record)
    print(f"\n{'':<20} {'test':>7} {'train':>7} {'lambda_max (loss)':>19} {'lambda_max (loss)':>19}"
          f"\n{'run':<20} {'acc':>7} {'acc':>7} {'training images':>19} {'shifted images':>19} "
          f"{'time':>6} {'img/s':>6}  folder")
    for r in rows:
        final = json.loads((out / r["name"] / "final.json").read_text())
        lam = [f"{r.get(k, float('nan')):.4g} ({r.get(k + '_loss', float('nan')):.3f})"
               if k in r else "-" for k in ("lambda_max", "lambda_max_aug")]
        print(f"{r['name']:<20} {r['test_acc'] * 100:>6.2f}% {r['train_acc'] * 100:>6.2f}% "
              f"{lam[0]:>19} {lam[1]:>19} {final['wall_time_s']:>5.0f}s "
              f"{final.get('train_images_per_s') or 0:>6.0f}  {out / r['name']}")
    print("\n" + demo_reading(rows))
    vit, vit_sam = (out / r["name"] for r in rows if r["family"] == "vit")
    print(f"\nNext: the loss landscapes and class-token attention of the two ViTs, and a report:\n"
          f"  vitsam analyze {vit} {vit_sam} --landscape --attention\n"
          f"  vitsam report {out}")


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors (unknown option, invalid choice, missing argument) as the one
    ``vitsam: error:`` line every other error prints, exit status 2; ``-h`` still shows usage."""

    def error(self, message: str) -> typing.NoReturn:
        hint = f" (see `{self.prog} --help`)"
        self.exit(2, f"vitsam: error: {message.strip().splitlines()[0]}{hint}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vitsam", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("train", help="train a model (preset + dotted overrides)")
    s.add_argument("--preset", help="named preset (see `vitsam presets`)")
    s.add_argument("--smoke", action="store_true", help="the preset's tiny smoke size")
    s.add_argument("--config", metavar="JSON", help="start from this config file (a run's "
                                                    "config.json) instead of a preset")
    s.add_argument("--run-dir", help="run folder (default: runs/<name>-<time>)")
    s.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("overrides", nargs="*", help="key=value, e.g. train.epochs=50 optim.rho=0.1")
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("demo", help="ViT and ResNet, with and without SAM, on MNIST-5k")
    s.add_argument("--out", default="runs/demo", help="folder for the four runs")
    s.add_argument("--smoke", action="store_true", help="tiny sizes (seconds, for tests)")
    s.add_argument("--workers", type=int, default=2, help="runs trained at once (default 2)")
    s.add_argument("--quiet", action="store_true")
    s.add_argument("overrides", nargs="*", help="key=value applied to every run")
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("models", help="list model names, parameter counts and image sizes")
    s.set_defaults(func=_cmd_models)
    s = sub.add_parser("presets", help="list the named experiment presets")
    s.set_defaults(func=_cmd_presets)

    for register in _plugins():
        register(sub)
    return p


def _plugins() -> list[Callable[[Any], None]]:
    """Sub-commands defined next to the code they drive (eval, analyze, prune, corrupt)."""
    from .commands import register_all
    from .pretrain.command import add_pretrain, add_probe
    from .report.command import add_report
    from .study.command import add_study

    return [*register_all(), add_pretrain, add_probe, add_study, add_report]


def error_line(exc: BaseException) -> str:
    """The one line printed for an expected error."""
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        # str(KeyError('x')) is "'x'": say what it is.
        return f"missing key {exc.args[0]!r} ({type(exc).__name__})"
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:  # usage errors and --help exit inside argparse; return their status instead
        args, extra = parser.parse_known_args(argv)
        # argparse stops filling a positional list at the first option: `train a=1 --smoke b=2`
        # leaves b=2 over. Overrides may sit anywhere on the line, so gather them here.
        if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    debug = args.debug or os.environ.get("VITSAM_DEBUG") == "1"
    try:
        from .progress import line_interval

        line_interval()  # a bad VITSAM_PROGRESS_INTERVAL is refused before any work
        args.func(args)
    except Interrupted as exc:  # SIGINT/SIGTERM in training: a checkpoint was written
        again = "" if args.command in ("train", "finetune") else f", as does the same `vitsam {args.command}`"
        print(f"vitsam: {exc}{again}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        hint = ("; `vitsam train --resume RUN_DIR` continues from the last checkpoint"
                if args.command in ("train", "demo", "finetune") else
                "; `vitsam corrupt` with the same arguments finishes the set"
                if args.command == "corrupt" else "")
        print(f"vitsam: interrupted{hint}", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as exc:
        if debug:
            raise
        print(f"vitsam: error: {error_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
