#!/usr/bin/env python3
"""The table of figures of one run of bench/run.sh: reads OUTDIR/results.tsv (and meta.json),
writes OUTDIR/summary.md and OUTDIR/summary.json, prints the Markdown.

results.tsv columns: figure, variant, round, metric, value. Runs of one round were interleaved, so
the "paired" ratio (median over rounds of the ratio within a round) cancels slow drifts of the
machine's load; the headline ratio is the ratio of the medians."""
import json
import os
import statistics
import sys


def load(outdir):
    groups = {}
    with open(os.path.join(outdir, "results.tsv")) as f:
        for line in f:
            p = line.rstrip("\n").split("\t")
            if len(p) != 5 or p[0] == "figure":
                continue
            try:
                v = float(p[4])
            except ValueError:
                continue
            groups.setdefault((p[0], p[1], p[3]), []).append((int(p[2]), v))
    return groups


def med(groups, fig, var, metric):
    v = [x[1] for x in groups.get((fig, var, metric), [])]
    return statistics.median(v) if v else None


def vals(groups, fig, var, metric):
    return [x[1] for x in sorted(groups.get((fig, var, metric), []))]


def paired(groups, fig, a, b, metric, invert=False):
    da = dict(groups.get((fig, a, metric), []))
    db = dict(groups.get((fig, b, metric), []))
    rs = []
    for r in da:
        if r in db and da[r] and db[r]:
            rs.append(db[r] / da[r] if invert else da[r] / db[r])
    return (statistics.median(rs), min(rs), max(rs)) if rs else None


def fmt(x, d=3):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        if abs(x) >= 100:
            return f"{x:.0f}"
        return f"{x:.{d}g}"
    return str(x)


def main(outdir):
    g = load(outdir)
    meta = {}
    mp = os.path.join(outdir, "meta.json")
    if os.path.exists(mp):
        with open(mp) as f:
            meta = json.load(f)
    rows = []   # (figure, ep, baseline, ratio, target, met, note)
    js = {"meta": meta, "figures": []}

    def add(name, ep, bl, ratio, target, met, note="", key=None):
        rows.append((name, ep, bl, ratio, target, met, note))
        js["figures"].append({"figure": name, "key": key, "ep": ep, "baseline": bl, "ratio": ratio,
                              "target": target, "met": met, "note": note})

    # Appends: throughput (tps) is the figure; server CPU per append explains it.
    for sync in ("sync_off", "sync_on"):
        fig = f"append/{sync}"
        for ep, bl, label, aim in (("ep_append", "bl_append", "ep_append, no projection", "≥ 1.0x (aim 1.3x)"),
                                   ("ep_append_proj", "bl_append_proj", "ep_append, 1 inline projection", "≥ 1.0x"),
                                   ("ep_append_ev", "bl_append_ev", "ep_append with expected version", "(info)")):
            e, b = med(g, fig, ep, "tps"), med(g, fig, bl, "tps")
            if e is None or b is None:
                continue
            r = e / b
            pr = paired(g, fig, ep, bl, "tps")
            ce, cb = med(g, fig, ep, "cpu_us"), med(g, fig, bl, "cpu_us")
            le, lb = med(g, fig, ep, "lat_ms"), med(g, fig, bl, "lat_ms")
            n = len(vals(g, fig, ep, "tps"))
            note = (f"{n} interleaved runs; paired ratio {pr[0]:.2f} [{pr[1]:.2f}..{pr[2]:.2f}]; "
                    f"server CPU/append {ce:.0f} vs {cb:.0f} µs; mean latency {le:.2f} vs {lb:.2f} ms")
            met = "(info)" if aim == "(info)" else ("yes" if r >= 1.0 else "no")
            add(f"{label}, 8 clients, synchronous_commit={'off' if sync == 'sync_off' else 'on'}",
                f"{e:.0f} tps", f"{b:.0f} tps", f"{r:.2f}x", aim, met, note, key=f"{fig}/{ep}")

    # Event ids: appends into a current database against the same library's appends into a 0.2.0
    # database (no event_id column), same run, interleaved.
    b = med(g, "ids", "v020", "tps")
    for var, label in (("gen", "ep_append, generated event id (UUID v7)"),
                       ("id", "ep_append, caller's event id (random UUID v4)"),
                       ("id7", "ep_append, caller's event id (time-ordered, as UUID v7)"),
                       ("corr", "ep_append, correlation_id in metadata (partial index)"),
                       ("subj", "ep_append with a subject (data sealed, AES-256-GCM)")):
        e = med(g, "ids", var, "tps")
        if e is None or b is None:
            continue
        pr = paired(g, "ids", var, "v020", "tps")
        ce, cb = med(g, "ids", var, "cpu_us"), med(g, "ids", "v020", "cpu_us")
        n = len(vals(g, "ids", var, "tps"))
        note = (f"{n} interleaved runs; paired ratio {pr[0]:.2f} [{pr[1]:.2f}..{pr[2]:.2f}]; "
                f"server CPU/append {ce:.0f} vs {cb:.0f} µs")
        add(f"{label} vs the same append without ids (0.2.0 schema), 8 clients, synchronous_commit=off",
            f"{e:.0f} tps", f"{b:.0f} tps", f"{e / b:.2f}x", "(info)", "(info)", note, key=f"ids/{var}")

    # Erasure: a sealed append against the same append without a subject, same database.
    e, b2 = med(g, "ids", "subj", "tps"), med(g, "ids", "gen", "tps")
    if e is not None and b2 is not None:
        pr = paired(g, "ids", "subj", "gen", "tps")
        ce, cb = med(g, "ids", "subj", "cpu_us"), med(g, "ids", "gen", "cpu_us")
        add("ep_append with a subject vs without, 8 clients, synchronous_commit=off",
            f"{e:.0f} tps", f"{b2:.0f} tps", f"{e / b2:.2f}x", "(info)", "(info)",
            f"paired ratio {pr[0]:.2f} [{pr[1]:.2f}..{pr[2]:.2f}]; server CPU/append {ce:.0f} vs {cb:.0f} µs",
            key="ids/subj_vs_gen")

    # Rebuilds
    n_events = meta.get("hist_events")
    for ep, bl, label, target, kind in (
            ("ep_event", "bl_loop", "rebuild, per-event handler, vs baseline 3 (FOR loop, one transaction)", "≥ 1.5x faster", "speedup"),
            ("ep_event", "bl_loop_commit", "rebuild, per-event handler, vs the same loop committing every 1000 events (reference)", "(info)", "speedup"),
            ("ep_batch", "bl_set", "rebuild, batch handler, vs baseline 4 (INSERT ... SELECT ... GROUP BY)", "within 3x", "slowdown"),
            ("ep_replay", "bl_set", "rebuild, replay handler (GROUP BY per range), vs baseline 4 (INSERT ... SELECT ... GROUP BY)", "within 1.5x", "slowdown"),
            ("ep_batch", "bl_batches", "rebuild, batch handler, vs the same handler over 1000-event arrays without the extension (reference)", "(info)", "slowdown"),
            ("ep_batch_big", "bl_set", f"rebuild, batch handler, event_projections.batch_size = {meta.get('big_batch', 100000)}, vs baseline 4", "(info)", "slowdown")):
        e, b = med(g, "rebuild", ep, "wall_s"), med(g, "rebuild", bl, "wall_s")
        if e is None or b is None:
            continue
        ce, cb = med(g, "rebuild", ep, "cpu_s"), med(g, "rebuild", bl, "cpu_s")
        n = len(vals(g, "rebuild", ep, "wall_s"))
        if kind == "speedup":
            r, rc = b / e, cb / ce
            met = "(info)" if target == "(info)" else ("yes" if r >= 1.5 else "no")
            ratio = f"{r:.2f}x faster" if r >= 1 else f"{1 / r:.2f}x slower"
            note = f"CPU: {ce:.1f} vs {cb:.1f} s ({rc:.2f}x)"
        else:
            r, rc = e / b, ce / cb
            met = "(info)" if target == "(info)" else ("yes" if r <= 3.0 else "no")
            ratio = f"{r:.1f}x slower" if r >= 1 else f"{1 / r:.2f}x faster"
            note = f"CPU: {ce:.1f} vs {cb:.2f} s ({rc:.1f}x)"
        note += (f"; {n} interleaved runs; wall: ep {', '.join(fmt(x) for x in vals(g, 'rebuild', ep, 'wall_s'))} s, "
                 f"baseline {', '.join(fmt(x) for x in vals(g, 'rebuild', bl, 'wall_s'))} s")
        add(f"{label}, {fmt(n_events)} events", f"{e:.2f} s", f"{b:.2f} s", ratio, target, met, note, key=f"rebuild/{ep}")

    # Stall at the hand-offs
    ins = vals(g, "stall", "run", "inside_max_ms")
    if ins:
        outs = vals(g, "stall", "run", "outside_max_ms")
        p99 = vals(g, "stall", "run", "outside_p99_ms")
        r0 = vals(g, "stall", "run", "r0_max_ms")
        rf = vals(g, "stall", "run", "rf_max_ms")
        r0w = vals(g, "stall", "run", "r0_window_ms")
        rfw = vals(g, "stall", "run", "rf_window_ms")
        worst = max(ins)
        note = (f"{len(ins)} runs at {meta.get('stall_rate')} appends/s; per run, in windows: "
                f"{', '.join(fmt(x) for x in ins)} ms (R0 {', '.join(fmt(x) for x in r0)}, windows {', '.join(fmt(x) for x in r0w)} ms; "
                f"Rf {', '.join(fmt(x) for x in rf)}, windows {', '.join(fmt(x) for x in rfw)} ms); "
                f"outside: max {', '.join(fmt(x) for x in outs)}, p99 {', '.join(fmt(x) for x in p99)} ms")
        add("longest append stall at a rebuild hand-off, 8 writers", f"{worst:.1f} ms (max of runs)",
            f"{max(outs):.1f} ms (max outside)", f"{worst / max(outs):.1f}x" if max(outs) else "n/a",
            "≤ 50 ms", "yes" if worst <= 50 else "no", note, key="stall")

    # Async lag
    lm = vals(g, "lag", "visible", "median_ms")
    if lm:
        l99 = vals(g, "lag", "visible", "p99_ms")
        lmax = vals(g, "lag", "visible", "max_ms")
        hm = vals(g, "lag", "handler", "median_ms")
        cm = vals(g, "lag", "created", "median_ms")
        c99 = vals(g, "lag", "created", "p99_ms")
        rate = vals(g, "lag", "rate", "appends_per_s")
        met = "yes" if max(lm) < 10 and max(l99) < 100 else "no"
        note = (f"commit of the append to commit of the delivery (track_commit_timestamp); achieved "
                f"{fmt(rate[0] if rate else None)} appends/s; handler start: median {fmt(hm[0] if hm else None)} ms; "
                f"handler clock_timestamp() - created_at: median {fmt(cm[0] if cm else None)}, p99 {fmt(c99[0] if c99 else None)} ms; max {fmt(lmax[0])} ms")
        add("async lag at 1,000 appends/s", f"median {lm[0]:.2f} ms, p99 {l99[0]:.2f} ms", "-", "-",
            "median < 10 ms, p99 < 100 ms", met, note, key="lag")

    # Worker memory
    small = med(g, "memory", "small", "peak_rss_anon_kb")
    big = med(g, "memory", "big", "peak_rss_anon_kb")
    if small and big:
        hs, hb = med(g, "memory", "small", "peak_vmhwm_kb"), med(g, "memory", "big", "peak_vmhwm_kb")
        es, eb = med(g, "memory", "small", "events"), med(g, "memory", "big", "events")
        r = big / small
        gs, gb = med(g, "memory", "small", "replay_growth_kb"), med(g, "memory", "big", "replay_growth_kb")
        qs, qb = med(g, "memory", "small", "q1_rss_anon_kb"), med(g, "memory", "big", "q1_rss_anon_kb")
        note = (f"private memory (RssAnon) peak {small / 1024:.1f} → {big / 1024:.1f} MiB; VmHWM {hs / 1024:.0f} → {hb / 1024:.0f} MiB "
                f"({hb / hs:.2f}x; VmHWM counts the shared buffers the process touched, shared_buffers = {meta.get('shared_buffers')})")
        if gs is not None and gb is not None:
            note += (f"; a quarter into the rebuild {qs / 1024:.1f} / {qb / 1024:.1f} MiB, growth over the remaining three quarters "
                     f"{gs:.0f} / {gb:.0f} kB")
        add(f"worker memory, batch-handler rebuild of {fmt(eb)} vs {fmt(es)} events", f"{big / 1024:.1f} MiB", f"{small / 1024:.1f} MiB",
            f"{r:.2f}x", "flat, ≤ 1.5x", "yes" if r <= 1.5 else "no", note, key="memory")
    small_e = med(g, "memory", "small_event", "peak_rss_anon_kb")
    big_e = med(g, "memory", "big_event", "peak_rss_anon_kb")
    if small_e and big_e:
        r = big_e / small_e
        gs, gb = med(g, "memory", "small_event", "replay_growth_kb"), med(g, "memory", "big_event", "replay_growth_kb")
        note = "private memory (RssAnon) peak"
        if gs is not None and gb is not None:
            note += f"; growth over the last three quarters of the rebuild {gs:.0f} / {gb:.0f} kB"
        add("worker memory, per-event-handler rebuild (big vs small)", f"{big_e / 1024:.1f} MiB", f"{small_e / 1024:.1f} MiB",
            f"{r:.2f}x", "flat, ≤ 1.5x", "yes" if r <= 1.5 else "no", note, key="memory_event")

    md = ["| figure | event_projections | baseline | ratio | target | met | notes |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append("| " + " | ".join(str(x) for x in r) + " |")
    text = "\n".join(md) + "\n"
    with open(os.path.join(outdir, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(outdir, "summary.json"), "w") as f:
        json.dump(js, f, indent=1)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1])
