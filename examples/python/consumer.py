"""A durable consumer of an event_projections subscription, with psycopg 3.

    python3 consumer.py CONNINFO SUBSCRIPTION MEMBER OUTFILE UNTIL [DELAY_MS]

Polls its member's share of the log, writes each event to OUTFILE ("position stream
stream_position", one line each, flushed before the next), then acknowledges the batch. It stops
once it has acknowledged everything up to global position UNTIL. DELAY_MS slows each event down
(the tests kill it in the middle of a batch). Killed at any point, a new run continues after the
last acknowledgement: at least once, each stream in order.
"""
import sys
import time

import psycopg


def run(conninfo, subscription, member, outfile, until, delay):
    # Autocommit: each poll and each ack is a transaction of its own, as through a transaction-
    # pooling connection pooler (the subscription's state is in tables, not in the session).
    with psycopg.connect(conninfo, autocommit=True) as conn, open(outfile, "a") as out:
        while True:
            batch = conn.execute(
                "SELECT global_position, stream_id, stream_position"
                "  FROM ep_poll(%s, %s, max_count => 50, wait => '1 second')",
                (subscription, member),
            ).fetchall()
            if not batch:
                (acked,) = conn.execute(
                    "SELECT position FROM ep.subscription_status WHERE subscription = %s AND member = %s",
                    (subscription, member),
                ).fetchone()
                if acked >= until:
                    return
                continue
            for position, stream, stream_position in batch:
                out.write(f"{position} {stream} {stream_position}\n")  # the "processing"
                out.flush()
                time.sleep(delay)
            conn.execute("SELECT ep_ack(%s, %s, %s)", (subscription, member, batch[-1][0]))


if __name__ == "__main__":
    conninfo, subscription, member, outfile, until = sys.argv[1:6]
    delay_ms = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    run(conninfo, subscription, int(member), outfile, int(until), delay_ms / 1000)
