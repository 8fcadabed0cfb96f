#!/usr/bin/env bash
# The CIFAR-100-LT investigation (issue 22) on one lent GPU, one call at a time: JOBS cells train at once, one
# process each under MPS (bench/investigation.py --jobs: each job walks the runs in order and takes any cell no
# other holds), on the fast path; the call stops before its limit and a call made right after continues in the
# same ignored folder (.gpu-work), mid-cell included. Every state, report and checkpoint written since the first
# call's copy comes back packed in $OUT (parts of 15 MiB; the tool returns 8 files). Prepare the data here first (CIFAR-100 cannot be downloaded there):
#
#   python bench/lt_subset_zip.py ../shared/data/cifar100.zip .gpu/data/cifar100.zip --ifs 100
#   device run: bash bench/gpu_investigation.sh 570     (carry .gpu, timeout_s 600; again at once to continue)
#   here, after the last call (stop any CPU cell of the same runs first):
#     cat /work/.device/.../investigation.tgz.part-* | tar xzf - -C bench/results
#     MBIB_DATA_ROOT=../shared/data python bench/investigation.py     # analyses the new cells, writes the report
#
# INV_ARGS replaces the investigation's arguments (a dry run on a CPU: INV_ARGS="--dataset digits-lt --epochs 1 ...");
# run bench/gpu_fast.sh first: if its CUDA tests fail, EXTRA="--set runtime.fast_step=false" trains per batch.
set -u
BUDGET=${1:-570}  # seconds this script may take in all
START=$SECONDS
DEST=${OUT:-/tmp/gpu-investigation-out}
WORK=${WORK:-.gpu-work}
SRC=${SRC:-bench/results}
JOBS=${JOBS:-8}
INV_ARGS=${INV_ARGS:---dataset cifar100-lt --epochs 200}
EXTRA=${EXTRA:-}
mkdir -p "$DEST"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MBIB_DATA_ROOT=${MBIB_DATA_ROOT:-$PWD/.gpu/data}
PY=$(command -v python3 || command -v python)
exec > >(tee "$DEST/log.txt") 2>&1

if [ ! -d "$WORK" ]; then  # the first call: the runs as committed (finished cells are skipped, unfinished continue)
  mkdir -p "$WORK"
  for d in h200 seed1 investigation; do [ -d "$SRC/$d" ] && cp -r "$SRC/$d" "$WORK/"; done
  cp "$SRC"/investigation-*.md "$WORK/" 2>/dev/null  # its hand-written verdicts survive the rewrite
  touch "$WORK/.copied"  # what changes after this comes back
else
  echo "continuing in $WORK (left by the call before)"
fi

. bench/gpu_env.sh  # the machine, and MPS so the jobs' small kernels run side by side

LEFT=$(( BUDGET - (SECONDS - START) - 45 ))  # 45 s for the report and the packing
echo "investigation: $JOBS jobs, $LEFT s: $INV_ARGS"
# timeout signals its whole process group: the jobs stop with the starter, each keeping its last checkpoint
# shellcheck disable=SC2086
timeout -k 10 "$LEFT" $PY bench/investigation.py $INV_ARGS --root "$WORK" --jobs "$JOBS" --set runtime.compile=false $EXTRA
echo "investigation exit code $? after $(( SECONDS - START )) s"
# shellcheck disable=SC2086
$PY bench/investigation.py $INV_ARGS --root "$WORK" --report-only
(cd "$WORK" && find . -type f -newer .copied ! -name '*.lock' | tar czf - -T -) |
  split -b 15m -a 1 - "$DEST/investigation.tgz.part-"
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv 2>/dev/null
[ "${MPS_STATE:-}" = on ] && echo quit | timeout 10 "$MPS"
ls -la "$DEST"
echo "done after $(( SECONDS - START )) s"
