#!/usr/bin/env bash
# Copy the running study's folder from the worktree that runs it into this checkout, consistently (the SQLite store
# through its backup command, so a write in flight cannot tear it), so a commit keeps what `--resume` continues from.
#
#     bash bench/keep_study.sh ../study && git add bench/results/study-cifar100-lt && git commit
set -euo pipefail
src="${1:?give the worktree that runs the study, e.g. ../study}"
rel=bench/results/study-cifar100-lt
cd "$(dirname "$0")/.."
[ -f "$src/$rel/mlflow.db" ] || { echo "no $rel/mlflow.db under $src: give the worktree that runs the study" >&2; exit 2; }
[ "$(cd "$src" && pwd)" != "$(pwd)" ] || { echo "$src is this checkout: give the worktree that runs the study" >&2; exit 2; }
mkdir -p "$rel"
copy() {  # Tune writes its state files whole (write, then rename); a copy replaces the last one only when complete
  for d in runs mlartifacts; do
    [ -d "$src/$rel/$d" ] || continue
    rm -rf "$rel/$d.part" && cp -a "$src/$rel/$d" "$rel/$d.part" && rm -rf "$rel/$d" && mv "$rel/$d.part" "$rel/$d"
  done
}
complete() {  # every checkpoint a Train run's snapshot names was copied (Train may drop an old one mid-copy)
  python - "$rel/runs" <<'PY'
import json, sys
from pathlib import Path
missing = [f"{s.parent}/{r['checkpoint_dir_name']}" for s in Path(sys.argv[1]).glob("*/train_runs/*/checkpoint_manager_snapshot.json")
           for r in json.loads(s.read_text())["checkpoint_results"] if not (s.parent / r["checkpoint_dir_name"]).is_dir()]
sys.exit(f"copied mid-checkpoint, missing: {missing}" if missing else 0)
PY
}
for try in 1 2 3; do copy; complete && break; [ "$try" = 3 ] && exit 1; sleep 20; done
sqlite3 "$src/$rel/mlflow.db" ".backup '$rel/mlflow.db.part'" && mv "$rel/mlflow.db.part" "$rel/mlflow.db"
echo "kept $(du -sh "$rel" | cut -f1) of the study in $rel"
