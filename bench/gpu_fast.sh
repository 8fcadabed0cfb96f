#!/usr/bin/env bash
# The fast path's GPU checks in one call of under 9 minutes (issue 23): the CUDA tests, images/s of the bare and
# the MBIB step eager / graphed / compiled / both, one whole 200-epoch MBIB IF-100 cell, and 1-16 processes
# sharing the GPU under MPS. Prepare the data here first (CIFAR-100 cannot be downloaded there):
#
#   python bench/lt_subset_zip.py ../shared/data/cifar100.zip .gpu/data/cifar100.zip --ifs 100
#   device run: bash bench/gpu_fast.sh    (carry .gpu, timeout_s 600; expected run time 8-9 minutes)
#
# Results: $OUT/gpu_fast_h200.json and .md (commit them to bench/results/), the log beside them.
set -u
BUDGET=${1:-500}  # seconds the measurements may take; MPS start and the report come on top
DEST=${OUT:-/tmp/gpu-fast-out}
mkdir -p "$DEST"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MBIB_DATA_ROOT=${MBIB_DATA_ROOT:-$PWD/.gpu/data}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}  # the compiled modes share it
PY=$(command -v python3 || command -v python)
exec > >(tee "$DEST/log.txt") 2>&1

. bench/gpu_env.sh  # the machine, and MPS for the shared-GPU section
timeout -k 10 $(( BUDGET + 30 )) $PY bench/gpu_check.py --out "$DEST/gpu_fast_h200.json" --data-root "$MBIB_DATA_ROOT" \
  --sections device fast_tests cell modes shared --budget-s "$BUDGET"
echo "gpu_check exit code $?"
$PY bench/fast_report.py "$DEST/gpu_fast_h200.json" "$DEST/gpu_fast_h200.md" --mps "$MPS_STATE"
[ "$MPS_STATE" = on ] && echo quit | timeout 10 "$MPS"
echo "done after $SECONDS s"
