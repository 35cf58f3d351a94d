#!/usr/bin/env bash
# model/regen-trails.sh: regenerate the counterexample trails kept in model/ (after a change to the
# model: a trail replays only against the model it was found in; check.sh verifies that they do)
# and print each one condensed by trail.py, for the matching .txt files.
# Shortest trails (pan -i). Generated files other than the .trail files stay in a temporary dir.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/ep-trails.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

# kept trail | model | spin -D flags   (the same list is in check.sh)
trails=(
  "seeds-counterexample.trail|ep_seeds.pml|"
  "finding-reader-bluegreen.trail|ep.pml|-DSCEN_BG -DREADER -DNAPP=1"
  "finding-reader-inplace.trail|ep.pml|-DSCEN_INPLACE -DREADER -DNAPP=1"
  "no-lock-timeout-deadlock.trail|ep.pml|-DSCEN_INPLACE -DMIXED_LOCK_ORDER -DNO_LOCK_TIMEOUT -DNAPP=2"
  "view-rollback-counterexample.trail|ep.pml|-DSCEN_VIEW -DBUG_VIEW_SURVIVES_ROLLBACK -DVNOTHER=0"
)

for t in "${trails[@]}"; do
  IFS='|' read -r file model flags <<<"$t"
  dir="$tmp/$file"; mkdir -p "$dir"; cd "$dir"
  # shellcheck disable=SC2086
  spin $flags -a "$here/$model" >/dev/null
  gcc -w -O2 -DSAFETY -DNOCLAIM -DREACH -o pan pan.c
  ./pan -m20000 -w24 -i >pan.out 2>&1 || true
  if [ ! -f "$model.trail" ]; then
    echo "regen-trails: $file: no error found" >&2; cat pan.out >&2; exit 1
  fi
  cp "$model.trail" "$here/$file"
  echo "=== $file  (spin $flags -t -p -k model/$file model/$model)"
  # shellcheck disable=SC2086
  spin $flags -t -p -l -g -k "$here/$file" "$here/$model" 2>&1 | python3 "$here/trail.py" "$here/$model" "$here/ep.pml"
  echo
done
