"""The command line shared by studies/*.py: --smoke, --epochs, --set and the rest; errors as one line."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from mbib import console, tracking
from mbib.study.console import print_study_summary
from mbib.config import parse_sets
from mbib.errors import ConfigError, MBIBError
from mbib.study.search import StudyStopped, run_study
from mbib.study.spec import SELECTION_SPLIT, DatasetSpec, StudySpec


# enough steps to learn digits in minutes on a laptop CPU (~600 images x 15 epochs at batch 16); the 2-epoch warm-up
# also ramps beta (loss.vsd_warmup_epochs follows it), without which VSD collapses z on a schedule this short
SMOKE_OVERRIDES = {"optim.epochs": 15, "optim.batch_size": 16, "optim.lr": 0.05, "optim.warmup_epochs": 2,
                   "optim.schedule": "cosine", "optim.milestones": "", "optim.milestone_factors": "",
                   "runtime.eval_every": 1, "runtime.cpus_per_worker": 1, "runtime.use_gpu": False}
SMOKE_GRACE_EPOCHS = 5  # ASHA's first rung: digits accuracy says little before the warm-up ends
SMOKE_SUBSET = {"data.limit_train": 600, "data.limit_test": 1000}  # MNIST-LT and CIFAR: digits-lt's size


def smoke_datasets(data_root: str | None = None) -> list[DatasetSpec]:
    """Offline data: subsets of CIFAR-100-LT when present, else MNIST-LT (when its npz is present) and sklearn digits."""
    from mbib.data.cifar import CIFAR100, has_cifar

    root = data_root or os.environ.get("MBIB_DATA_ROOT")
    if root and has_cifar(Path(root), CIFAR100):
        return [DatasetSpec(f"cifar100-lt-if{f}", {"data.dataset": "cifar100-lt", "data.imbalance_factor": f,
                                                  "data.data_root": root, **SMOKE_SUBSET}) for f in (100, 10)]
    out = []
    if root and (Path(root) / "mnist10k.npz").is_file():
        out.append(DatasetSpec("mnist-lt-if10", {"data.dataset": "mnist-lt", "data.imbalance_factor": 10,
                                                 "data.data_root": str(Path(root).resolve()), **SMOKE_SUBSET}))
    # all of it (585 images at IF 10): every shot group of the paper's (>100, 20-100, <20 images) holds classes
    out.append(DatasetSpec("digits-lt-if10", {"data.dataset": "digits-lt", "data.imbalance_factor": 10}))
    return out


def smoke_name(datasets: list[DatasetSpec]) -> str:
    """The smoke study's MLflow experiment, named after the data it holds ("digits-lt-mbib-smoke")."""
    kinds = dict.fromkeys(str(ds.overrides["data.dataset"]) for ds in datasets)  # in order, once each
    return f"{'+'.join(kinds)}-mbib-smoke"


def chosen_datasets(datasets: list[DatasetSpec], only: str) -> list[DatasetSpec]:
    """The data sets --only names, in the study's order; an unknown key is one line naming the known ones."""
    keys = [k.strip() for k in only.split(",") if k.strip()]
    known = {ds.key for ds in datasets}
    if not keys or set(keys) - known:
        raise ConfigError(f"--only {only}: this study's data sets are {', '.join(sorted(known))}")
    return [ds for ds in datasets if ds.key in keys]


def study_parser(prog: str, description: str):
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a few tiny trials on offline data (minutes on a laptop CPU)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted study from Tune's experiment state")
    p.add_argument("--name", default=None, help="study name: MLflow experiment and folder under --storage-path")
    p.add_argument("--num-samples", type=int, default=None, help="trials per data set")
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial (the full budget ASHA compares to)")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials running at once")
    p.add_argument("--gpus-per-trial", type=float, default=None,
                   help="GPUs per trial, a fraction to share one (0.25: 4 trials per GPU); 0 trains on CPUs")
    p.add_argument("--only", default=None, metavar="KEYS",
                   help="run only these data sets, comma-separated (e.g. cifar100-lt-if100)")
    p.add_argument("--grace-period", type=int, default=None, help="ASHA's first rung in epochs (default epochs/10)")
    p.add_argument("--reduction-factor", type=int, default=3,
                   help="ASHA keeps the best 1/N of the trials at each rung (rungs at grace, grace*N, ...)")
    p.add_argument("--seed", type=int, default=0, help="Optuna TPE seed")
    p.add_argument("--selection-split", type=float, default=SELECTION_SPLIT,
                   help="share of each class's test images that chooses epochs and trials; the rest reports "
                        "(0: the whole test set does both, an optimistic number)")
    p.add_argument("--storage-path", default=None, help="Tune/Train results, s3://bucket/path on a cluster (default ./mbib_runs)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--data-root", default=None, help="folder holding the data (default $MBIB_DATA_ROOT)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any training setting for every trial, e.g. --set optim.batch_size=256")
    p.add_argument("--verbose", action="store_true", help="Ray's own status boxes and worker logs instead of the trial table")
    return p


def study_spec(args, *, name: str, preset_name: str, datasets: list[DatasetSpec], num_samples: int,
               max_concurrent: int, gpus_per_trial: float) -> StudySpec:
    """The study the shared flags ask for: --smoke swaps in offline data and the smoke schedule, --epochs scales
    the schedule (warm-up, milestones, DRW epoch), --set goes on top."""
    reshape: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    grace_period = args.grace_period
    if args.smoke:
        datasets, preset_name = smoke_datasets(args.data_root), "cifar100-lt"
        name = smoke_name(datasets)
        reshape = dict(SMOKE_OVERRIDES)
        num_samples, max_concurrent, gpus_per_trial = 4, 2, 0.0
        grace_period = grace_period or SMOKE_GRACE_EPOCHS
    elif args.data_root:
        overrides["data.data_root"] = args.data_root
        os.environ["MBIB_DATA_ROOT"] = str(Path(args.data_root).resolve())  # a moved study's trials find it here
    if args.only:
        datasets = chosen_datasets(datasets, args.only)
    gpus_per_trial = gpus_per_trial if args.gpus_per_trial is None else args.gpus_per_trial
    if gpus_per_trial < 0 or (gpus_per_trial > 1 and not float(gpus_per_trial).is_integer()):
        raise ConfigError(f"--gpus-per-trial {gpus_per_trial:g}: Ray takes a fraction up to 1 (trials share a GPU) "
                          "or a whole number of GPUs; pass e.g. 0.25 or 2")
    if args.reduction_factor < 2:
        raise ConfigError(f"--reduction-factor {args.reduction_factor}: ASHA keeps 1/N of the trials at each rung, "
                          "so N must be at least 2 (3 is Ray's default)")
    overrides.update(parse_sets(args.overrides))
    return StudySpec(name=args.name or name, preset=preset_name, datasets=datasets, overrides=overrides,
                     epochs=args.epochs, reshape=reshape, num_samples=args.num_samples or num_samples,
                     max_concurrent=args.max_concurrent or max_concurrent,
                     gpus_per_trial=gpus_per_trial,
                     grace_period=grace_period, reduction_factor=args.reduction_factor, seed=args.seed, selection_split=args.selection_split,
                     storage_path=args.storage_path,
                     tracking_uri=args.tracking_uri)


def study_main(argv, *, prog: str, name: str, preset_name: str, datasets: list[DatasetSpec],
               num_samples: int, max_concurrent: int, gpus_per_trial: float) -> int:
    """Parse the shared study flags, run the study, print where MLflow keeps it; errors as one line."""
    import time

    args = study_parser(prog, f"Ray Tune + Optuna study of MBIB's loss settings ({name})").parse_args(argv)
    console.set_verbose(args.verbose)
    started = time.monotonic()
    try:
        spec = study_spec(args, name=name, preset_name=preset_name, datasets=datasets, num_samples=num_samples,
                          max_concurrent=max_concurrent, gpus_per_trial=gpus_per_trial)
        outcomes = run_study(spec, resume=args.resume)
    except StudyStopped as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 130  # the shell's code for a run ended by Ctrl-C
    except MBIBError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    uri = tracking.tracking_uri(spec.tracking_uri)
    print_study_summary(outcomes, uri, tracking.ui_command(uri), time.monotonic() - started)
    return 0
