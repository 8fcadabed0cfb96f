"""`mbib` command line: train, evaluate, export. Errors print as one line, never a traceback."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from mbib.errors import MBIBError

# flag -> dotted config key; every other setting goes through --set KEY=VALUE
TRAIN_FLAGS: dict[str, tuple[str, type, str]] = {
    "dataset": ("data.dataset", str, "cifar100-lt, cifar10-lt, mnist-lt, digits-lt, npz:PATH, imagefolder:PATH "
                "(a folder or .zip with train/<class>/ and test/<class>/), imagenet-lt, inat2018"),
    "data_root": ("data.data_root", str, "folder holding the data (default $MBIB_DATA_ROOT)"),
    "imbalance_factor": ("data.imbalance_factor", float, "IF = n_max / n_min of the long-tailed training set "
                         "(image folders: used as stored unless given)"),
    "augment": ("data.augment", str, "standard (crop+flip) or strong (AutoAugment+Cutout)"),
    "arch": ("model.arch", str, "resnet32, resnet10, resnet50, resnext50_32x4d"),
    "method": ("loss.method", str, "mbib, bib, ce, focal, bsce, ldam-drw, ... (see mbib.methods.METHODS)"),
    "beta": ("loss.beta", float, "weight of the VSD loss (Eq. 9)"),
    "a": ("loss.a", float, "weight of BIB(v1, z) (Eq. 11)"),
    "b": ("loss.b", float, "weight of BIB(v2, z) (Eq. 11)"),
    "m": ("loss.m", float, "class re-weighting exponent (Eq. 7)"),
    "gamma": ("loss.gamma", float, "distillation temperature exponent"),
    "epochs": ("optim.epochs", int, "training epochs"),
    "batch_size": ("optim.batch_size", int, "global batch size"),
    "lr": ("optim.lr", float, "base learning rate"),
    "num_workers": ("runtime.num_workers", int, "Ray Train workers (DDP)"),
    "eval_every": ("runtime.eval_every", int, "evaluate and checkpoint every N epochs"),
    "max_failures": ("runtime.max_failures", int, "worker failures to recover from"),
    "storage_path": ("runtime.storage_path", str, "where Ray Train writes checkpoints (shared storage on a cluster)"),
    "seed": ("runtime.seed", int, "random seed"),
    "experiment": ("experiment", str, "MLflow experiment name"),
    "run_name": ("run_name", str, "run name"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's usage dump becomes one line
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model on Ray Train", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="cifar100-lt", help="cifar100-lt, imagenet-lt, imagenet-lt-resnext50, inat2018, inat2018-200ep")
    for name, (_, typ, text) in TRAIN_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=text)
    p.add_argument("--use-gpu", dest="use_gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="use GPUs (default: when the cluster has them)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any other setting, e.g. --set optim.weight_decay=5e-4")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.add_argument("--verbose", action="store_true", help="show Ray's worker logs, not only the progress bar")


def config_from_args(args: argparse.Namespace):
    from mbib.config import parse_sets, resolve_config

    overrides: dict[str, Any] = {key: getattr(args, name) for name, (key, _, _) in TRAIN_FLAGS.items()
                                 if getattr(args, name) is not None and name != "epochs"}  # epochs scale the schedule
    if args.use_gpu is not None:
        overrides["runtime.use_gpu"] = args.use_gpu
    return resolve_config(args.preset, {**overrides, **parse_sets(args.overrides)}, epochs=args.epochs)


def cmd_train(args: argparse.Namespace) -> int:
    from mbib.train.runner import run_training
    from mbib.train.report import print_summary

    from mbib.console import set_verbose

    set_verbose(args.verbose)
    cfg = config_from_args(args)
    outcome = run_training(cfg, track=not args.no_track, tracking_uri=args.tracking_uri)
    print_summary(cfg, outcome)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mbib.train.report import evaluate_checkpoint, print_eval

    print_eval(evaluate_checkpoint(args.checkpoint, data_root=args.data_root, device=args.device))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="mbib", description="Mixture of Balanced Information Bottlenecks: train, evaluate, export")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _train_parser(sub)
    ev = sub.add_parser("evaluate", help="evaluate a checkpoint on its test set")
    ev.add_argument("checkpoint")
    ev.add_argument("--data-root", default=None)
    ev.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    sub.add_parser("export", help="export a checkpoint to ONNX (see `mbib export --help`)", add_help=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        from mbib.export import main as export_main

        return _guard(lambda: export_main(argv[1:]))
    args = parser.parse_args(argv)
    return _guard(lambda: {"train": cmd_train, "evaluate": cmd_evaluate}[args.command](args))


def _guard(fn) -> int:
    try:
        return int(fn() or 0)
    except MBIBError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
