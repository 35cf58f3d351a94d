#!/usr/bin/env python3
"""Condense `spin -t -p -l -g` output into one line per step: step number, process, the model
label (DESIGN.md step) the statement belongs to, and the statements that touch shared state.

usage: spin [-Dflags] -t -p -l -g -k TRAIL MODEL.pml | python3 trail.py MODEL.pml [ep.pml ...]
The .pml files are read to map line numbers to the nearest preceding label.
"""
import re
import sys

LABEL = re.compile(r"^\s*([A-Z][A-Za-z0-9]*_[A-Za-z0-9_]+|restart|abort|release|finished|caught_up|after_insert):")
SCOPE = re.compile(r"^\s*(proctype|inline)\s+(\w+)")
STEP = re.compile(r"^\s*(\d+):\s+proc\s+(\d+)\s+\((\w+):\d+\)\s+(\S+?):(\d+)\s+\(state\s+\d+\)\s*\[(.*)\]\s*$")
# statements that only move the process's own bookkeeping
NOISE = re.compile(r"^(h_\w+|i|k|m|L|c|seen|gaveup|newcp|pend|snap|s_\w+|hst|hp|hreg|snapl\[k\])(\[[^\]]*\])?\s*=|"
                   r"^\(?\(?(i|k|c|h_p|h_s)\s*[<=!]|^\.\(goto\)$|^goto |^else$|^\(1\)$|^DO$|^IF$|^sub-sequence$|^D_STEP|"
                   r"^\(\(k<=|^\(\(k<\d|^evown\[k\]")
GLOBALS = ("inlist", "apply", "copy", "rr", "snapver", "hw", "seq", "evst", "slot", "status", "status_ver", "p_x", "p_s", "p_xq", "reg_s", "reg_x",
           "reg_xq", "st_lock", "checkpoint", "rb_phase", "cnt", "lastp", "live", "apos", "crashes",
           "stream_ver", "sublast", "ndone", "wdone", "epoch", "regdone",
           "repoch", "kv_ok", "kv_ep", "kv_st", "vst", "txp", "chg", "pos")
# a conditional on constants, as spin prints the expansion of S_OF(0), FRESH(0), ...: folded
CONST_COND = re.compile(r"\( \(\((\d+)==(\d+)\)\) (?:\?|->) \(([^()]*)\) : \(([^()]*)\) \)")


def fold(text):
    while True:
        new = CONST_COND.sub(lambda m: m.group(3) if m.group(1) == m.group(2) else m.group(4), text)
        new = re.sub(r"\(\((\w+)\)\)", r"(\1)", new)
        if new == text:
            return text
        text = new


def labels_of(paths):
    table = {}
    for path in paths:
        name = path.split("/")[-1]
        scope, label = "", ""
        with open(path) as f:
            for n, line in enumerate(f, 1):
                m = SCOPE.match(line)
                if m:
                    scope, label = m.group(2), ""
                m = LABEL.match(line)
                if m:
                    label = m.group(1)
                table[(name, n)] = (scope, label)
    return table


def main():
    table = labels_of(sys.argv[1:])
    groups = []  # (step, proc, pname, where, [stmts])
    tail = []
    final = {}
    for line in sys.stdin:
        m = STEP.match(line)
        if not m:
            v = re.match(r"^\s+(\w+(\[\d+\])?) = (\S+)", line)
            if v:
                final[v.group(1)] = v.group(3)
            elif "violated" in line or "Error" in line:
                tail.append(line.rstrip())
            continue
        step, proc, pname, fname, ln, stmt = m.groups()
        scope, label = table.get((fname.split("/")[-1], int(ln)), ("", ""))
        where = label or scope
        if scope and scope not in (pname,) and label == "":
            where = scope
        elif scope and scope != pname and not label.startswith(("H1", "H2", "H3")):
            where = f"{label} ({scope})" if label else scope
        stmt = stmt.strip()
        key = (step, proc)
        if groups and groups[-1][0] == key:
            if where not in groups[-1][3]:
                groups[-1][3].append(where)
            groups[-1][4].append(stmt)
        else:
            groups.append((key, proc, pname, [where], [stmt]))
    for (step, _), proc, pname, wheres, stmts in groups:
        if pname == ":init:" and not any("assert" in s for s in stmts):
            continue
        if any(w.startswith("Rd_") for w in wheres):
            # the reader: show what its snapshot saw and what it read
            shown = [s for s in stmts if re.match(r"^(s_status|s_ver) = |^c = live|^seen = |^assert", s)]
            print(f"{step:>5}  {pname}[{proc}]  {' / '.join(w for w in wheres if w):<28}  {'; '.join(shown)}")
            continue
        keep = [s for s in stmts if not NOISE.search(s)]
        shared = [s for s in keep if any(re.search(r"\b%s\b" % g, s) for g in GLOBALS) or "assert" in s]
        if not shared:
            continue
        text = "; ".join(dict.fromkeys(shared))
        text = re.sub(r"\(\s*\(\(me==0\)\) \? \(0\) : \(\( \(\(me==1\)\) \? \((\d)\) : \((\d)\) \)\) \)", "S", text)
        if pname in ("session", "backend"):
            text = fold(text)
        print(f"{step:>5}  {pname}[{proc}]  {' / '.join(w for w in wheres if w):<28}  {text}")
    for t in tail:
        print(t)
    if final:
        keys = [k for k in final if re.match(r"(seq|evst|cnt|lastp|sublast|status|status_ver|live|checkpoint|apos|repoch|kv_ok|kv_ep|kv_st)\b", k)]
        print("final state: " + ", ".join(f"{k}={final[k]}" for k in keys))


if __name__ == "__main__":
    main()
