#!/usr/bin/env bash
# Start, or continue from wherever this clone is, the committed CIFAR-100-LT study (bench/results/study-cifar100-lt).
# Sized for a 2-core CPU: 8 trials, two at a time on one core each (faster here than one on two), ASHA rungs at 20,
# 60 and 180 epochs of 200 (~450 epochs expected in all). Stop it any time (Ctrl-C, a kill); the next run continues.
#
#     MBIB_DATA_ROOT=../shared/data bash bench/run_study.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's mbib, for the driver and Ray's workers
d=bench/results/study-cifar100-lt
exec python studies/cifar_grid.py --only cifar100-lt-if100 --num-samples 8 --grace-period 20 --reduction-factor 3 \
  --max-concurrent 2 --gpus-per-trial 0 --set runtime.cpus_per_worker=1 --data-root "${MBIB_DATA_ROOT:-../shared/data}" \
  --storage-path "$d/runs" --tracking-uri "sqlite:///$d/mlflow.db" --resume
