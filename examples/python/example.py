#!/usr/bin/env python3
"""event_projections from Python (psycopg2): an inline projection kept in step with the log.

    EP_PORT=55432 python3 examples/python/example.py [database]

Without a database it works in a scratch database that it creates and drops. It checks what it
prints, and exits non-zero if anything is not as expected.
"""
import os
import sys
import uuid
from decimal import Decimal

import psycopg2
import psycopg2.errors
from psycopg2.extras import Json

# The read model and its handler. The handler runs inside every append's transaction: if it fails,
# the append fails and the event is not stored.
SETUP = """
CREATE EXTENSION IF NOT EXISTS event_projections;
DROP SCHEMA IF EXISTS shop CASCADE;
CREATE SCHEMA shop;
CREATE TABLE shop.order_totals (order_id text PRIMARY KEY, items int NOT NULL, total numeric NOT NULL);
CREATE FUNCTION shop.apply(e ep.events) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO order_totals VALUES (e.stream_id, 1, (e.data->>'price')::numeric)
    ON CONFLICT (order_id) DO UPDATE
        SET items = order_totals.items + 1, total = order_totals.total + excluded.total;
END $$;
SELECT ep_unregister_projection(name) FROM ep.projections WHERE name = 'order_totals';
SELECT ep_register_projection('order_totals', 'shop.apply(ep.events)', 'inline', ARRAY['ItemAdded'], 'shop');
"""


def connect(dbname):
    conn = psycopg2.connect(host=os.environ.get("EP_HOST", "127.0.0.1"), port=os.environ.get("EP_PORT", "55432"),
                            user=os.environ.get("EP_USER", "postgres"), dbname=dbname)
    conn.autocommit = True  # every statement commits on its own
    return conn


def run(conn):
    cur = conn.cursor()
    cur.execute(SETUP)
    order = f"order-{uuid.uuid4().hex[:8]}"
    # expected_version 0: the stream must not exist yet. Then two events at once, at version 1.
    cur.execute("SELECT ep_append(%s, 'OrderPlaced', %s, NULL, 0)", (order, Json({"customer": "ada"})))
    cur.execute("SELECT ep_append_events(%s, %s, 1)", (order, Json([
        {"type": "ItemAdded", "data": {"sku": "pen", "price": 2.50}},
        {"type": "ItemAdded", "data": {"sku": "ink", "price": 7.25}, "metadata": {"via": "web"}}])))

    # A writer that decided on version 1 is too late now: SQLSTATE 40001, nothing written.
    cap = Json({"sku": "cap", "price": 1})
    try:
        cur.execute("SELECT ep_append(%s, 'ItemAdded', %s, NULL, 1)", (order, cap))
        sys.exit("a stale expected version was accepted")
    except psycopg2.errors.SerializationFailure as e:
        print("conflict:", e.diag.message_primary)
        assert e.diag.message_primary.startswith("wrong expected version"), e.diag.message_primary
    # Read the version again and retry at it.
    cur.execute("SELECT ep_stream_version(%s)", (order,))
    cur.execute("SELECT ep_append(%s, 'ItemAdded', %s, NULL, %s)", (order, cap, cur.fetchone()[0]))

    cur.execute("SELECT stream_position, event_type FROM ep_read_stream(%s)", (order,))
    events = cur.fetchall()
    cur.execute("SELECT items, total FROM shop.order_totals WHERE order_id = %s", (order,))
    totals = cur.fetchone()
    print("events:", events)
    print("read model:", totals)
    assert events == [(1, "OrderPlaced"), (2, "ItemAdded"), (3, "ItemAdded"), (4, "ItemAdded")], events
    assert totals == (3, Decimal("10.75")), totals


def main():
    if len(sys.argv) > 1:
        run(connect(sys.argv[1]))
    else:
        scratch = f"ep_example_{os.getpid()}"
        admin = connect("postgres")
        admin.cursor().execute(f"CREATE DATABASE {scratch}")
        try:
            conn = connect(scratch)
            run(conn)
            conn.close()
        finally:
            admin.cursor().execute(f"DROP DATABASE {scratch} WITH (FORCE)")
    print("ok")


if __name__ == "__main__":
    main()
