#!/usr/bin/env bash
# Notify throughput of this checkout against an older commit, in interleaved rounds (new old new old ...),
# each run beside the peer in the same run (bench/notify.py). Prints one line per run; compare medians.
#
#   bench/compare_revisions.sh REV [sqlite|postgresql] [ROUNDS] [SECONDS]
#
# The older commit runs from a temporary git worktree with this checkout's .venv (same libraries).
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:?usage: bench/compare_revisions.sh REV [db] [rounds] [seconds]}
db=${2:-sqlite}; rounds=${3:-3}; seconds=${4:-10}
old=$(mktemp -d)
trap 'git worktree remove --force "$old" >/dev/null 2>&1 || rm -rf "$old"' EXIT
git worktree add --detach --force "$old" "$rev" >/dev/null 2>&1
for round in $(seq "$rounds"); do
  for side in new old; do
    if [ "$side" = old ]; then src="$old/src"; else src="$PWD/src"; fi
    out=$(PYTHONPATH="$src" .venv/bin/python bench/notify.py --db "$db" --rounds 1 --seconds "$seconds" 2>/dev/null)
    echo "round $round $side | $(grep '\] mallgate notify' <<<"$out") | $(grep 'mallgate/peer' <<<"$out")"
  done
done
