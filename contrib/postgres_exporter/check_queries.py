#!/usr/bin/env python3
"""Checks contrib/postgres_exporter/queries.yaml against a live database, as a monitoring role.

Every query must run with only the README's "Monitoring" grants, return exactly the columns its
metrics list, with numbers in the GAUGE and COUNTER columns; and when the real exporter
(prometheus-postgres-exporter, Debian) is installed, its /metrics page must show the metrics.

    check_queries.py QUERIES_YAML CONNINFO_OF_THE_MONITORING_ROLE [EXPORTER_BINARY]
"""
import os
import subprocess
import sys
import time
import urllib.request

import psycopg
import yaml

USAGES = {"LABEL", "GAUGE", "COUNTER"}


def check_queries(queries, conninfo):
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for name, spec in queries.items():
            metrics = [(k, v["usage"]) for m in spec["metrics"] for k, v in m.items()]
            for col, usage in metrics:
                assert usage in USAGES, f"{name}.{col}: unknown usage {usage}"
            cur = conn.execute(spec["query"])
            cols = [d.name for d in cur.description]
            assert cols == [c for c, _ in metrics], f"{name}: columns {cols} but metrics {metrics}"
            rows = cur.fetchall()
            for row in rows:
                for (col, usage), value in zip(metrics, row):
                    if usage != "LABEL":
                        assert isinstance(value, (int, float)) or value.__class__.__name__ == "Decimal", \
                            f"{name}.{col} = {value!r} is not a number"
            print(f"check-exporter: {name}: {len(rows)} rows, columns as listed")


def check_exporter(binary, path, conninfo):
    port = 9188
    env = dict(os.environ, DATA_SOURCE_NAME=conninfo)
    proc = subprocess.Popen(
        [binary, f"--extend.query-path={path}", f"--web.listen-address=127.0.0.1:{port}",
         "--disable-default-metrics", "--disable-settings-metrics"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        page = ""
        for _ in range(50):
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                if "ep_projection_lag_events" in page:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        for metric in ["ep_projection_lag_events", "ep_projection_failed", "ep_projection_rebuild_progress_pct",
                       "ep_log_high_water", "ep_log_oldest_in_flight_age_seconds",
                       "ep_subscription_lag_events", "ep_workers_workers"]:
            assert metric in page, f"the exporter's page lacks {metric}:\n{page[-3000:]}"
        errors = [line for line in page.splitlines() if line.startswith("pg_exporter_user_queries_load_error")
                  and not line.endswith(" 0")]
        assert not errors, f"the exporter could not load the queries: {errors}"
        print("check-exporter: postgres_exporter serves every metric")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main():
    path, conninfo = sys.argv[1], sys.argv[2]
    with open(path) as f:
        queries = yaml.safe_load(f)
    check_queries(queries, conninfo)
    if len(sys.argv) > 3 and os.path.exists(sys.argv[3]):
        check_exporter(sys.argv[3], path, conninfo)
    else:
        print("check-exporter: postgres_exporter not installed; queries checked directly only")


if __name__ == "__main__":
    main()
