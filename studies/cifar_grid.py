"""CIFAR-100-LT study: Optuna TPE over beta, a, b, m, gamma for IF 100, 50 and 10, 200 epochs per trial.

    python studies/cifar_grid.py --smoke     # minutes on a laptop CPU, offline data
    python studies/cifar_grid.py             # the full study (GPU cluster; see docs/clusters.md)
"""

import sys

from mbib.study.cli import study_main
from mbib.study.spec import DatasetSpec

DATASETS = [DatasetSpec(f"cifar100-lt-if{f}", {"data.dataset": "cifar100-lt", "data.imbalance_factor": f})
            for f in (100, 50, 10)]

if __name__ == "__main__":
    sys.exit(study_main(sys.argv[1:], prog="studies/cifar_grid.py", name="cifar100-lt-mbib", preset_name="cifar100-lt",
                        datasets=DATASETS, num_samples=24, max_concurrent=8, gpus_per_trial=0.25))
