#!/usr/bin/env bash
# Table 1's IF-100 cells on one lent GPU in one call: the cells train at once (bench/reproduce.py --jobs), the
# grid stops before the call's limit, and the state, report, log and every cell's checkpoint (finished or not:
# an unfinished cell continues from it) are copied to $OUT. That machine has its own torch and no Ray or MLflow,
# so the cells use --runner plain. Prepare the data here first (CIFAR-100 cannot be downloaded there):
#
#   echo /.gpu/ >> .git/info/exclude
#   python bench/lt_subset_zip.py ../shared/data/cifar100.zip .gpu/data/cifar100.zip --ifs 100
#   device run: bash bench/gpu_grid.sh 585   (carry .gpu, timeout_s 600)
#
# GRID_ARGS replaces the grid's arguments (a dry run on a CPU: GRID_ARGS="--dataset digits-lt ...").
set -u
BUDGET=${1:-585}  # seconds this script may take in all
START=$SECONDS
DEST=${OUT:-/tmp/gpu-grid-out}
WORK=${WORK:-bench/results/h200}
GRID_ARGS=${GRID_ARGS:---dataset cifar100-lt --epochs 200 --methods bsce,mbib,ce,bib --ifs 100 --appendix-j}
JOBS=${JOBS:-5}
mkdir -p "$DEST"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MBIB_DATA_ROOT=${MBIB_DATA_ROOT:-$PWD/.gpu/data}
PY=$(command -v python3 || command -v python)
exec > >(tee "$DEST/log.txt") 2>&1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
$PY -c "import torch, os, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', os.cpu_count(), 'cpus', platform.platform())"

# MPS lets the cells' small kernels run side by side
source bench/mps_start.sh

LEFT=$(( BUDGET - (SECONDS - START) - 40 ))  # 40 s for the report and the copies
echo "grid: $JOBS jobs, $LEFT s: $GRID_ARGS"
# shellcheck disable=SC2086
timeout -k 10 "$LEFT" $PY bench/reproduce.py $GRID_ARGS --runner plain --jobs "$JOBS" --out "$WORK" \
  --set runtime.compile=false
echo "grid exit code $? after $(( SECONDS - START )) s"
# shellcheck disable=SC2086
$PY bench/reproduce.py $GRID_ARGS --runner plain --out "$WORK" --report-only
cp "$WORK"/*.md "$WORK"/*.state.json "$DEST"/
cp "$WORK"/cells/*/*.pt "$DEST"/ 2>/dev/null
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv 2>/dev/null
ls -la "$DEST"
echo "done after $(( SECONDS - START )) s"
