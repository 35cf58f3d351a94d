"""The wake-up lag of ep_poll (issue 12): how long after an append commits a consumer blocked in
ep_poll(..., wait => '1 second') has the event. Run by bench/run.sh (phase `poll`) while pgbench
appends at a fixed rate; needs track_commit_timestamp = on.

    poll_lag.py CONNINFO SUBSCRIPTION SECONDS OUT.TSV

The lag of an event: clock_timestamp() when the poll that returned it had returned, minus the
commit timestamp of the append (both server clocks). Writes one lag (ms) per line to OUT.TSV.
"""
import sys
import time

import psycopg

conninfo, subscription, seconds, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
POLL = """
SELECT p.global_position,
       extract(epoch FROM pg_catalog.clock_timestamp() - pg_catalog.pg_xact_commit_timestamp(e.xmin)) * 1000
  FROM ep_poll(%s, 0, max_count => 1000, wait => '1 second') p
  JOIN ep.events e USING (global_position)
"""
with psycopg.connect(conninfo, autocommit=True) as conn, open(out, "w") as f:
    f.write("poll\n")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        rows = conn.execute(POLL, (subscription,)).fetchall()
        if rows:
            conn.execute("SELECT ep_ack(%s, 0, %s)", (subscription, rows[-1][0]))
            f.writelines(f"{float(lag):.3f}\n" for _, lag in rows)
