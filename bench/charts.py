#!/usr/bin/env python3
"""PNG charts of one run of bench/run.sh, written next to the results document:

    charts.py OUTDIR CHARTDIR

- append.png:  append throughput of the extension against the hand-written PL/pgSQL, per
               configuration, as the median of the paired per-round ratios (with their range);
- rebuild.png: rebuild time by method (median of the rounds, with the range), for the history of
               the rebuild phase and, when the memory phase ran, for its two log sizes;
- lag.png:     the distribution (CDF) of async lag and of the ep_poll wake-up lag.

Reads OUTDIR/results.tsv, OUTDIR/meta.json, OUTDIR/lag.tsv and OUTDIR/poll.tsv (whichever exist);
a chart whose figures are missing is left out. Needs matplotlib (Debian: python3-matplotlib)."""
import json
import os
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from summarize import load, paired, vals  # noqa: E402

APPENDS = [
    ("sync_off", "ep_append", "bl_append", "no projection"),
    ("sync_off", "ep_append_proj", "bl_append_proj", "one inline projection"),
    ("sync_on", "ep_append", "bl_append", "no projection"),
    ("sync_on", "ep_append_proj", "bl_append_proj", "one inline projection"),
]
REBUILDS = [
    ("ep_event", "extension, per-event handler"),
    ("bl_loop", "PL/pgSQL FOR loop"),
    ("bl_loop_commit", "FOR loop, COMMIT per 1000"),
    ("ep_batch", "extension, batch handler"),
    ("bl_batches", "batch body, COMMIT per 1000"),
    ("ep_replay", "extension, replay handler"),
    ("bl_set", "INSERT ... SELECT ... GROUP BY"),
]


def append_chart(g, path):
    rows = []
    for sync, ep, bl, label in APPENDS:
        r = paired(g, f"append/{sync}", ep, bl, "tps")
        if r:
            rows.append((f"{label}\nsynchronous_commit={'off' if sync == 'sync_off' else 'on'}", r))
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs = range(len(rows))
    meds = [r[1][0] for r in rows]
    errs = [[m - r[1][1] for m, r in zip(meds, rows)], [r[1][2] - m for m, r in zip(meds, rows)]]
    bars = ax.bar(xs, meds, yerr=errs, capsize=4, color="#4878a8")
    for b, m in zip(bars, meds):
        ax.text(b.get_x() + b.get_width() / 2, m / 2, f"{m:.2f}x", ha="center", va="center", color="white")
    ax.axhline(1.0, color="grey", lw=1)
    ax.axhline(1.3, color="#c44e52", lw=1, ls="--", label="target 1.3x (synchronous_commit=off)")
    ax.set_xticks(list(xs), [r[0] for r in rows], fontsize=8)
    ax.set_ylabel("ep_append tps / hand-written append tps")
    ax.set_title("Append throughput against hand-written PL/pgSQL (8 clients, median of paired rounds)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def rebuild_chart(g, meta, path):
    rows = [(label, vals(g, "rebuild", var, "wall_s")) for var, label in REBUILDS]
    rows = [(label, v) for label, v in rows if v]
    mem = {k[1]: v for k, v in g.items() if k[0] == "memory" and k[2] == "wall_s"}
    if not rows:
        return False
    panels = 2 if mem else 1
    fig, axes = plt.subplots(1, panels, figsize=(11 if mem else 8, 4.8), squeeze=False)
    ax = axes[0][0]
    meds = [statistics.median(v) for _, v in rows]
    errs = [[m - min(v) for m, (_, v) in zip(meds, rows)], [max(v) - m for m, (_, v) in zip(meds, rows)]]
    colors = ["#4878a8" if label.startswith("extension") else "#9a9a9a" for label, _ in rows]
    bars = ax.barh(range(len(rows)), meds, xerr=errs, capsize=3, color=colors)
    for b, (_, v) in zip(bars, rows):
        ax.text(max(v), b.get_y() + b.get_height() / 2, f"  {statistics.median(v):.2f} s", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (median of rounds)")
    ax.set_title(f"Rebuild of {meta.get('hist_events', '?'):,} events by method" if isinstance(
        meta.get("hist_events"), int) else "Rebuild by method")
    if mem:
        ax2 = axes[0][1]
        sizes = sorted(mem.items(), key=lambda kv: kv[0])
        labels = [k for k, _ in sizes]
        secs = [statistics.median([x[1] for x in v]) for _, v in sizes]
        ax2.bar(range(len(sizes)), secs, color="#4878a8")
        for i, s in enumerate(secs):
            ax2.text(i, s, f"{s:.1f} s", ha="center", va="bottom", fontsize=8)
        ax2.set_xticks(range(len(sizes)), [f"{lab}\n({meta.get('mem_' + lab + '_events', '?')} events)" for lab in labels],
                       fontsize=8)
        ax2.set_ylabel("seconds")
        ax2.set_title("Batch-handler rebuild by log size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def read_column(path, column):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        header = f.readline().split()
        if column not in header:
            return []
        i = header.index(column)
        out = []
        for line in f:
            p = line.split()
            try:
                out.append(float(p[i]))
            except (IndexError, ValueError):
                pass
        return out


def lag_chart(outdir, path):
    series = [
        ("async projection: append commit to model commit", read_column(os.path.join(outdir, "lag.tsv"), "visible")),
        ("ep_poll: append commit to the poll's return", read_column(os.path.join(outdir, "poll.tsv"), "poll")),
    ]
    series = [(label, sorted(v)) for label, v in series if v]
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, v in series:
        n = len(v)
        ax.plot(v, [(i + 1) / n for i in range(n)],
                label=f"{label} (n={n}, median {statistics.median(v):.1f} ms, p99 {v[int(0.99 * (n - 1))]:.1f} ms)")
    ax.set_xscale("log")
    ax.set_xlabel("lag, ms (log scale)")
    ax.set_ylabel("fraction of events")
    ax.set_title("Lag distribution at a fixed append rate")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(outdir, chartdir):
    os.makedirs(chartdir, exist_ok=True)
    g = load(outdir)
    meta_path = os.path.join(outdir, "meta.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    made = []
    if append_chart(g, os.path.join(chartdir, "append.png")):
        made.append("append.png")
    if rebuild_chart(g, meta, os.path.join(chartdir, "rebuild.png")):
        made.append("rebuild.png")
    if lag_chart(outdir, os.path.join(chartdir, "lag.png")):
        made.append("lag.png")
    print(f"charts: {', '.join(made) or 'none'} in {chartdir}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
