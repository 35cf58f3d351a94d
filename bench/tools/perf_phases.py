#!/usr/bin/env python3
"""Attributes `perf script` samples (recorded with --call-graph) to phases, by the first marker
found walking each stack from the leaf to the root. Usage:
  perf script -i perf.data -F comm,tid,ip,sym | python3 perf_phases.py MARKERS_FILE
MARKERS_FILE lines: `label regex` (first match wins, checked in file order per frame walk)."""
import re, sys, collections
markers = []
for line in open(sys.argv[1]):
    line = line.strip()
    if line and not line.startswith('#'):
        label, rx = line.split(None, 1)
        markers.append((label, re.compile(rx)))
counts = collections.Counter()
total = 0
stack = []
def flush():
    global total
    if not stack:
        return
    total += 1
    # stack[0] is the leaf
    found = None
    for label, rx in markers:          # marker priority order
        if any(rx.search(f) for f in stack):
            found = label
            break
    counts[found or 'other'] += 1
for line in sys.stdin:
    if not line.strip():
        flush(); stack = []
        continue
    if line[0] not in ' \t':
        flush(); stack = []
        continue
    parts = line.strip().split(None, 1)
    stack.append(parts[1] if len(parts) > 1 else parts[0])
flush()
for k, v in counts.most_common():
    print(f"{100.0*v/total:6.1f}%  {k}")
print(f"{total} samples")
