#!/usr/bin/env python3
"""Helpers of bench/run.sh: CPU accounting of the cluster, process memory, pgbench logs, and the
final table. Standard library only.

  lib.py cpu DATADIR                    CPU seconds used so far by the cluster (see cluster_cpu)
  lib.py mem PID...                     one line per pid: pid VmRSS VmHWM RssAnon RssShmem (kB)
  lib.py sample OUT INTERVAL PID...     appends `time pid VmRSS VmHWM RssAnon RssShmem` lines to OUT
                                        every INTERVAL seconds until killed (SIGTERM)
  lib.py memsum OUTJSON SAMPLES PID     peaks of one process's samples
  lib.py summarize OUTDIR               the table of figures (summarize.py)
  lib.py stall OUTJSON WINDOWS LOG...   max latency inside / outside the hand-off windows
  lib.py lag OUTJSON TSV                percentiles of the async lag samples
"""
import glob
import json
import os
import statistics
import sys

HZ = os.sysconf("SC_CLK_TCK")


def _stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    # comm may contain spaces: fields after the closing parenthesis
    rest = s[s.rindex(")") + 2:].split()
    # rest[0] is field 3 (state); utime is field 14, stime 15, cutime 16, cstime 17, ppid 4
    return {
        "ppid": int(rest[1]),
        "utime": int(rest[11]),
        "stime": int(rest[12]),
        "cutime": int(rest[13]),
        "cstime": int(rest[14]),
    }


def cluster_cpu(datadir):
    """CPU seconds consumed by the postmaster and all its children since it started: live children
    count their own time, exited ones (backends of finished connections) are in the postmaster's
    cutime/cstime. The difference of two readings is what the cluster used in between, whatever
    else runs on the machine."""
    with open(os.path.join(datadir, "postmaster.pid")) as f:
        pm = int(f.readline())
    st = _stat(pm)
    ticks = st["utime"] + st["stime"] + st["cutime"] + st["cstime"]
    for d in glob.glob("/proc/[0-9]*"):
        pid = int(d[6:])
        if pid == pm:
            continue
        try:
            s = _stat(pid)
        except (OSError, ValueError):
            continue
        if s["ppid"] == pm:
            ticks += s["utime"] + s["stime"]
    return ticks / HZ


def mem(pids):
    out = []
    for pid in pids:
        vals = {"VmRSS": 0, "VmHWM": 0, "RssAnon": 0, "RssShmem": 0}
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    if k in vals:
                        vals[k] = int(v.split()[0])
        except OSError:
            continue
        out.append(f"{pid} {vals['VmRSS']} {vals['VmHWM']} {vals['RssAnon']} {vals['RssShmem']}")
    return out


def read_pgbench_logs(paths):
    """pgbench -l lines: client tx latency_us script epoch_s epoch_us [lag_us]. Returns
    (start_s, end_s, exec_latency_s, total_latency_s) per transaction. With --rate the logged
    latency counts from the scheduled start; the execution latency subtracts the schedule lag."""
    txs = []
    for p in paths:
        with open(p) as f:
            for line in f:
                parts = line.split()
                if len(parts) < 6 or parts[2] == "skipped" or parts[2] == "failed":
                    continue
                lat = int(parts[2]) / 1e6
                end = int(parts[4]) + int(parts[5]) / 1e6
                lag = int(parts[6]) / 1e6 if len(parts) > 6 else 0.0
                ex = lat - lag
                txs.append((end - ex, end, ex, lat))
    return txs


def stall(outjson, windows_file, logs, margin=0.1):
    """Windows file: lines `label start_epoch end_epoch` (a hand-off transaction: from its start to
    its commit). A transaction is inside a window when its execution interval overlaps it; it is
    outside when it overlaps no window widened by `margin` seconds on each side (the transactions
    just around a hand-off are neither)."""
    wins = []
    with open(windows_file) as f:
        for line in f:
            p = line.split()
            if len(p) == 3:
                wins.append((p[0], float(p[1]), float(p[2])))
    txs = read_pgbench_logs(logs)

    def overlaps(t, a, b):
        return t[0] <= b and t[1] >= a

    res = {"transactions": len(txs), "margin_s": margin, "windows": []}
    inside_all = [t for t in txs if any(overlaps(t, a, b) for _, a, b in wins)]
    outside = [t for t in txs if not any(overlaps(t, a - margin, b + margin) for _, a, b in wins)]
    for label, a, b in wins:
        ins = [t for t in txs if overlaps(t, a, b)]
        res["windows"].append({
            "label": label, "start": a, "end": b, "length_ms": round((b - a) * 1000, 2),
            "transactions": len(ins),
            "max_exec_ms": round(max((t[2] for t in ins), default=0) * 1000, 2),
        })
    ex_out = sorted(t[2] for t in outside)
    res["inside_max_exec_ms"] = round(max((t[2] for t in inside_all), default=0) * 1000, 2)
    res["outside_transactions"] = len(outside)
    res["outside_max_exec_ms"] = round(max(ex_out, default=0) * 1000, 2)
    res["outside_p99_exec_ms"] = round(pct(ex_out, 99) * 1000, 2) if ex_out else 0
    res["outside_median_exec_ms"] = round(pct(ex_out, 50) * 1000, 2) if ex_out else 0
    # the largest latencies of the whole run, and whether they fell in a window
    top = sorted(txs, key=lambda t: -t[2])[:10]
    res["top10"] = [{"start": round(t[0], 4), "exec_ms": round(t[2] * 1000, 2),
                     "in_window": any(overlaps(t, a, b) for _, a, b in wins)} for t in top]
    with open(outjson, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "top10"}))


def pct(sorted_vals, p):
    if not sorted_vals:
        return float("nan")
    k = (len(sorted_vals) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def lag(outjson, tsv):
    """TSV columns: one lag figure per column (milliseconds), header line first."""
    with open(tsv) as f:
        header = f.readline().split()
        cols = [[] for _ in header]
        for line in f:
            p = line.split()
            for i, v in enumerate(p):
                if v not in ("", "\\N"):
                    cols[i].append(float(v))
    res = {}
    for name, vals in zip(header, cols):
        vals.sort()
        res[name] = {"n": len(vals), "median": round(pct(vals, 50), 3), "p90": round(pct(vals, 90), 3),
                     "p99": round(pct(vals, 99), 3), "max": round(vals[-1], 3) if vals else None}
    with open(outjson, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res))


def sample(out, interval, pids):
    import signal
    import time
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    with open(out, "a") as f:
        while not stop:
            t = time.time()
            for line in mem(pids):
                f.write(f"{t:.3f} {line}\n")
            f.flush()
            time.sleep(interval)


def memsum(outjson, samples, pid):
    rows = []
    with open(samples) as f:
        for line in f:
            p = line.split()
            if len(p) == 6 and p[1] == str(pid):
                rows.append([float(p[0])] + [int(x) for x in p[2:]])
    res = {"pid": int(pid), "samples": len(rows)}
    if rows:
        res.update({
            "first_rss_anon_kb": rows[0][3],
            "peak_vmrss_kb": max(r[1] for r in rows),
            "peak_vmhwm_kb": max(r[2] for r in rows),
            "peak_rss_anon_kb": max(r[3] for r in rows),
            "peak_rss_shmem_kb": max(r[4] for r in rows),
            "last_rss_anon_kb": rows[-1][3],
            # the private memory a quarter into the rebuild, when R0 (and its count of the log)
            # is over, and its growth over the remaining three quarters: the replay's own
            "q1_rss_anon_kb": rows[len(rows) // 4][3],
            "replay_growth_kb": max(r[3] for r in rows[len(rows) // 4:]) - rows[len(rows) // 4][3],
        })
    with open(outjson, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "cpu":
        print(f"{cluster_cpu(sys.argv[2]):.2f}")
    elif cmd == "mem":
        print("\n".join(mem(sys.argv[2:])))
    elif cmd == "sample":
        sample(sys.argv[2], float(sys.argv[3]), sys.argv[4:])
    elif cmd == "memsum":
        memsum(sys.argv[2], sys.argv[3], sys.argv[4])
    elif cmd == "summarize":
        import summarize
        summarize.main(sys.argv[2])
    elif cmd == "stall":
        stall(sys.argv[2], sys.argv[3], sys.argv[4:])
    elif cmd == "lag":
        lag(sys.argv[2], sys.argv[3])
    else:
        sys.exit(f"unknown command {cmd}")
