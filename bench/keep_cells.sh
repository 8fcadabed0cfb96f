#!/usr/bin/env bash
# Copy the investigation's progress from the worktree that trains it into this checkout, then rewrite the report,
# so a commit keeps every run's state and each unfinished cell's latest checkpoint (the next session continues it).
#
#     MBIB_DATA_ROOT=DIR bash bench/keep_cells.sh /path/to/training/worktree && git add bench/results && git commit
set -euo pipefail
src="${1:?give the worktree that trains the cells, e.g. ../cell}"
cd "$(dirname "$0")/.."
[ -d "$src/bench/results/investigation" ] || { echo "no bench/results/investigation under $src: give the training worktree" >&2; exit 2; }
[ "$(cd "$src" && pwd)" != "$(pwd)" ] || { echo "$src is this checkout: give the worktree that trains the cells" >&2; exit 2; }
trained_there() {  # a file the worktree changed since its commit: what it trained, not a stale copy of another cell
  ! git -C "$src" ls-files --error-unmatch "bench/results/$1" >/dev/null 2>&1 || ! git -C "$src" diff --quiet HEAD -- "bench/results/$1"
}
(cd "$src/bench/results" && find investigation -type f \( -name '*.md' -o -name '*.state.json' -o -name '*.pt' \)) |
  while read -r f; do
    trained_there "$f" || continue
    mkdir -p "bench/results/$(dirname "$f")"; cp -p "$src/bench/results/$f" "bench/results/$f"
  done
PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" python bench/investigation.py --report-only | tail -1  # this checkout's mbib
sed -n '/^## Still to run/,/^## Verdicts/p' bench/results/investigation-cifar100-lt-200ep.md | sed '$d'
