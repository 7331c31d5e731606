#!/usr/bin/env python3
"""What libpq reports (PQparameterStatus, via psycopg's conn.info.parameter_status) and
what SHOW says, after SET / RESET / DISCARD ALL, for a client that connected with its
own settings (tests/session_reset.rs). Prints one line per step; the test compares the
lines of a direct connection with those through pgsilo.

Usage: reported_settings.py CONNINFO
"""

import os
import sys

os.environ["PSYCOPG_IMPL"] = "python"  # the system's libpq, as applications have it

import psycopg  # noqa: E402

OPTIONS = "-c TimeZone=America/Los_Angeles -c DateStyle=Postgres,MDY -c IntervalStyle=postgres_verbose"
NAMES = ("TimeZone", "DateStyle", "IntervalStyle")

STEPS = [
    "SET datestyle TO iso",
    "RESET datestyle",
    "SET timezone TO 'Asia/Tokyo'",
    "RESET timezone",
    "SET intervalstyle TO sql_standard",
    "SET intervalstyle TO DEFAULT",
    "SET timezone TO 'UTC'",
    "RESET ALL",
    "SET datestyle TO sql",
    "DISCARD ALL",
]

with psycopg.connect(sys.argv[1], options=OPTIONS, autocommit=True) as conn:
    for step in ["-- start"] + STEPS:
        if not step.startswith("--"):
            conn.execute(step)
        told = [conn.info.parameter_status(n) for n in NAMES]
        shown = list(conn.execute("SELECT current_setting('TimeZone'), current_setting('DateStyle'), "
                                  "current_setting('IntervalStyle')").fetchone())
        told = [t.decode() if isinstance(t, bytes) else t for t in told]
        print(f"{step}: told {told} show {shown}{'' if told == shown else '  <-- DISAGREE'}", flush=True)
print("done", flush=True)
