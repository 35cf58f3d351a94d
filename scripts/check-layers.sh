#!/usr/bin/env bash
# `make lint`: the subsystems of src/ depend on each other one way only, in the order of the
# module map in src/lib.rs: a module may use the ones after it in LAYERS, never one before it.
set -euo pipefail
cd "$(dirname "$0")/../src"
LAYERS=(api monitor worker retention rebuild log registry subscription sandbox seal handoff pg)
fail=0
for i in "${!LAYERS[@]}"; do
  layer=${LAYERS[$i]}
  files=$( [ -d "$layer" ] && find "$layer" -name '*.rs' || echo "$layer.rs" )
  for j in $(seq 0 $((i - 1))); do
    above=${LAYERS[$j]}
    if hits=$(grep -nE "crate::$above(::|\b)" $files); then
      echo "check-layers: $layer uses $above, which is above it:"; echo "$hits"; fail=1
    fi
  done
done
[ "$fail" = 0 ] && echo "check-layers: ok (${LAYERS[*]})"
exit $fail
