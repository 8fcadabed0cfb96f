#!/usr/bin/env bash
# The CIFAR-100-LT study (studies/cifar_grid.py) through Ray Tune, Ray Train and MLflow on the lent GPU machine,
# which has PyTorch but no Ray, MLflow or Optuna and reaches no package registry. Prepare here, once:
#
#   python bench/study_wheels.py .whl --python 3.12     # .whl/part1 (Ray, trimmed), .whl/part2 (the rest)
#   python bench/lt_subset_zip.py ../shared/data/cifar100.zip .gpu/data/cifar100.zip   # IF 10/50/100, 37 MiB
#
# then three device calls, each started within 30 s of the one before (ignored folders a call leaves, here
# .study/, stay that long), each carrying only its own folder (the tree itself takes 17 MiB of the 64):
#
#   bash bench/gpu_study.sh install .whl/part1    carry [.whl/part1]   timeout_s 240
#   bash bench/gpu_study.sh install .whl/part2    carry [.whl/part2]   timeout_s 240   (checks every import)
#   bash bench/gpu_study.sh study 560             carry [.gpu/data]    timeout_s 600
#
# `study` starts Ray on this one node (all its GPUs and CPUs, MPS on when it answers), runs the study as a user
# would, against a SQLite MLflow store, and copies the store, the plots and the summary to $OUT. STUDY_ARGS
# replaces the study's flags (the local check runs STUDY_ARGS=--smoke on a CPU).
set -u
MODE=${1:?install DIR | study SECONDS}
START=$SECONDS
SITE=$PWD/.study/site  # one folder per wheel part: pip --target replaces a bin/ it finds, so parts never share one
PY=${PY:-$(command -v python3 || command -v python)}
DEST=${OUT:-$PWD/.study/out}
mkdir -p "$SITE" "$DEST"
PARTS=$(ls -d "$SITE"/*/ 2>/dev/null | tr '\n' ':')
export PYTHONPATH=$PARTS$PWD PYTHONUNBUFFERED=1 PATH=$(ls -d "$SITE"/*/bin 2>/dev/null | tr '\n' ':')$PATH

imports() {  # everything the study's driver and its Ray workers import
  $PY -c "import ray, ray.tune, ray.train.torch, ray.dashboard, mlflow, optuna, sqlalchemy, alembic
from ray.tune.search.optuna import OptunaSearch
import mbib.study.search, mbib.train.loop
print('imports ok: ray', ray.__version__, 'mlflow', mlflow.__version__, 'optuna', optuna.__version__, 'from', ray.__file__)"
}

if [ "$MODE" = install ]; then
  DIR=${2:?the folder of wheels to install}
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE/$(basename "$DIR")" "$DIR"/*.whl || exit 1
  du -sh "$SITE"/* && echo "installed $DIR in $(( SECONDS - START )) s"
  PYTHONPATH=$(ls -d "$SITE"/*/ | tr '\n' ':')$PWD imports || echo "(not every import yet: install the other parts)"
  exit 0
fi

BUDGET=${2:-560}  # seconds this call may take in all
LOG=$DEST/study.log
exec > >(tee "$LOG") 2>&1
imports || exit 1
. bench/gpu_env.sh
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c ^GPU)
RAY_TMP=/tmp/rs$$  # Ray's own folder: its processes, and only they, carry this path (how they are stopped)
RAY_PORT=${RAY_PORT:-6379} DASH_PORT=${DASH_PORT:-8265}
stop_ray() {  # this Ray's processes only, each by its id
  for sig in TERM KILL; do
    for pid in $(pgrep -f -- "$RAY_TMP"); do kill -"$sig" "$pid" 2>/dev/null; done; sleep 3
  done
}
trap stop_ray EXIT  # also when the call's limit or an error ends the script early
for attempt in 1 2 3; do  # `ray start` gives its raylet 30 s: a busy machine can need another go
  ray start --head --port="$RAY_PORT" --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" \
    --num-cpus="$(nproc)" --num-gpus="$GPUS" --temp-dir="$RAY_TMP" --disable-usage-stats && break
  stop_ray
  [ "$attempt" = 3 ] && exit 1
done
export RAY_ADDRESS=127.0.0.1:$RAY_PORT RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASH_PORT
export MBIB_DATA_ROOT=${MBIB_DATA_ROOT:-$PWD/.gpu/data}
STORE=$PWD/.study/store
mkdir -p "$STORE"
# IF 100 alone, 16 trials of 40 epochs, 8 at a time on an eighth of the GPU each: what fits one call until
# the fast path lands (then: all three imbalance factors, 24 trials, 200 epochs)
ARGS=${STUDY_ARGS:---only cifar100-lt-if100 --num-samples 16 --epochs 40 --max-concurrent 8 --gpus-per-trial 0.125}
LEFT=$(( BUDGET - (SECONDS - START) - 45 ))  # 45 s to stop Ray and copy the results
echo "study: $LEFT s: python studies/cifar_grid.py $ARGS"
# shellcheck disable=SC2086
timeout -k 10 "$LEFT" $PY studies/cifar_grid.py $ARGS --storage-path "$STORE/runs" \
  --tracking-uri "sqlite:///$STORE/mlflow.db" --resume
echo "study exit code $? after $(( SECONDS - START )) s"
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv 2>/dev/null
stop_ray
echo quit | timeout 10 "${MPS:-false}" 2>/dev/null
grep -A8 -E "^[a-z0-9+-]+-if[0-9]+: [0-9]+ trials" "$LOG" > "$DEST/summary.txt"
(cd "$STORE" && tar czf "$DEST/mlflow-store.tar.gz" mlflow.db mlartifacts)  # `mlflow ui` on it shows the study
(cd "$STORE" && find mlartifacts -path '*/plots/*.png' -o -name study.json | tar czf "$DEST/plots.tar.gz" -T -)
ls -la "$DEST"
echo "done after $(( SECONDS - START )) s"
