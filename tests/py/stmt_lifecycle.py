#!/usr/bin/env python3
"""Prepared statements over their whole life, with psycopg 3 on the system's libpq
(tests/txpool_statements.rs).

Usage: stmt_lifecycle.py SCENARIO PGSILO_CONNINFO DIRECT_CONNINFO POOL_MODE

psycopg runs on the system's libpq (PSYCOPG_IMPL=python). Before libpq 17, psycopg
evicts its least recently used prepared statements with SQL `DEALLOCATE _pg3_N`, which
is what these scenarios need to exercise; the script refuses to run on a newer libpq.

Scenarios:
  many   1,000 distinct statements with prepared_max = 2, autocommit and in
         transactions: every eviction is a DEALLOCATE of a protocol-level statement.
  pipeline
         the same in pipeline mode, where psycopg sends DEALLOCATE with the extended
         protocol (Parse, Bind, Execute).
  alter, type, own, own_block
         statements shared between clients across schema changes made on a direct
         connection (ALTER TABLE ADD COLUMN, DROP/CREATE TYPE), and a client's own
         statement from before a migration; with a pool smaller than the clients.
         (A type replaced inside a savepoint that rolls back is tested with a raw
         protocol client: psycopg sends DEALLOCATE ALL after DROP and ROLLBACK itself.)

Prints every check; exits non-zero on the first failure.
"""

import os
import sys

os.environ["PSYCOPG_IMPL"] = "python"

import psycopg  # noqa: E402
from psycopg import errors  # noqa: E402

scenario, conninfo, direct, pool_mode = sys.argv[1:5]
checks = 0


def check(cond, what):
    global checks
    if not cond:
        print(f"FAILED: {what}", flush=True)
        sys.exit(1)
    checks += 1


def connect(**kw):
    return psycopg.connect(conninfo, **kw)


def admin(sql):
    """A schema change made outside pgsilo, as a migration would be."""
    with psycopg.connect(direct, autocommit=True) as c:
        c.execute(sql)


check(psycopg.pq.__impl__ == "python", f"psycopg implementation {psycopg.pq.__impl__}")
check(psycopg.pq.version() < 170000, f"libpq {psycopg.pq.version()} evicts with Close, not DEALLOCATE")


def many():
    for autocommit in (True, False):
        with connect(autocommit=autocommit, prepare_threshold=0) as conn:
            conn.prepared_max = 2
            for i in range(1000):
                r = conn.execute(f"SELECT {i} + %s::int", (1,)).fetchone()
                check(r == (i + 1,), f"statement {i} (autocommit={autocommit}): {r}")
                if not autocommit and i % 50 == 49:
                    conn.commit()
            conn.commit()
            # The three most recent ones, prepared again by psycopg's own bookkeeping.
            for i in (997, 998, 999):
                r = conn.execute(f"SELECT {i} + %s::int", (2,)).fetchone()
                check(r == (i + 2,), f"statement {i} again: {r}")
        print(f"1000 distinct statements, prepared_max=2, autocommit={autocommit}: ok", flush=True)


def pipeline():
    # In pipeline mode psycopg sends its DEALLOCATEs with the extended protocol.
    with connect(autocommit=True, prepare_threshold=0) as conn:
        conn.prepared_max = 2
        for rnd in range(3):
            with conn.pipeline():
                curs = [conn.execute(f"SELECT {i} * {rnd + 1} + %s::int", (1,)) for i in range(300)]
            for i, cur in enumerate(curs):
                r = cur.fetchone()
                check(r == (i * (rnd + 1) + 1,), f"pipelined statement {i}, round {rnd}: {r}")
    print("300 distinct statements in a pipeline, prepared_max=2: ok", flush=True)


def setup():
    admin("DROP TABLE IF EXISTS st_items; DROP TYPE IF EXISTS st_mood; DROP TYPE IF EXISTS st_mood2")
    admin("CREATE TABLE st_items (a int); INSERT INTO st_items VALUES (1)")
    admin("CREATE TYPE st_mood AS ENUM ('ok', 'sad')")
    admin("GRANT ALL ON st_items TO PUBLIC; GRANT CREATE ON SCHEMA public TO PUBLIC")


def alter():
    """ALTER TABLE: a client that prepares SELECT * after the migration sees the new
    column, although the server holds the same text prepared before it."""
    with connect(autocommit=True, prepare_threshold=0) as a:
        r = a.execute("SELECT * FROM st_items").fetchone()
        check(r == (1,), f"before the migration: {r}")
        admin("ALTER TABLE st_items ADD COLUMN b int DEFAULT 2")
        with connect(autocommit=True, prepare_threshold=0) as b:
            r = b.execute("SELECT * FROM st_items").fetchone()
            check(r == (1, 2), f"new client after ALTER TABLE: {r}")
            r = b.execute("SELECT * FROM st_items").fetchone()
            check(r == (1, 2), f"new client after ALTER TABLE, again: {r}")
    print("ALTER TABLE between clients: ok", flush=True)


def retype():
    """DROP TYPE / CREATE TYPE: the old statement refers to a type that is gone."""
    with connect(autocommit=True, prepare_threshold=0) as a:
        r = a.execute("SELECT 'ok'::st_mood::text, %s::int", (1,)).fetchone()
        check(r == ("ok", 1), f"type before: {r}")
        admin("DROP TYPE st_mood; CREATE TYPE st_mood AS ENUM ('ok', 'fine')")
        with connect(autocommit=True, prepare_threshold=0) as b:
            r = b.execute("SELECT 'ok'::st_mood::text, %s::int", (1,)).fetchone()
            check(r == ("ok", 1), f"new client after DROP/CREATE TYPE: {r}")
    print("DROP TYPE / CREATE TYPE between clients: ok", flush=True)


def own(in_block=False):
    """A client whose own statement predates a migration. Directly (and in session mode,
    where the statement is the client's own on its own server) PostgreSQL rejects it
    every time, until psycopg deallocates it after a ROLLBACK. Under transaction pooling the server's copy is pgsilo's: outside a
    transaction block the request is sent again on a fresh copy and the client sees no
    error; inside one the client gets the error once (its transaction has failed), and
    never again for that text."""
    with connect(autocommit=not in_block, prepare_threshold=0) as a:
        r = a.execute("SELECT * FROM st_items").fetchone()
        check(r == (1,), f"before the migration: {r}")
        if in_block:
            a.commit()
        admin("ALTER TABLE st_items ADD COLUMN c int DEFAULT 3")
        failures = 0
        for i in range(4):
            try:
                r = a.execute("SELECT * FROM st_items").fetchone()
                check(r == (1, 3), f"after the migration, round {i}: {r}")
                if in_block:
                    a.commit()
            except errors.FeatureNotSupported as e:
                failures += 1
                if in_block:
                    a.rollback()
                check(i == 0 or (pool_mode == "session" and not in_block), f"stale statement failed in round {i}: {e}")
        # psycopg deallocates everything after a ROLLBACK: directly, a block fails once.
        want = 1 if in_block else (4 if pool_mode == "session" else 0)
        check(failures == want, f"{failures} errors, want {want}")
        with connect(autocommit=True, prepare_threshold=0) as b:
            r = b.execute("SELECT * FROM st_items").fetchone()
            check(r == (1, 3), f"another client after the migration: {r}")
        print(f"stale statement of a client (in a block: {in_block}): {failures} error(s)", flush=True)


if scenario not in ("many", "pipeline"):
    setup()
{"many": many, "pipeline": pipeline, "alter": alter, "type": retype, "own": own, "own_block": lambda: own(True)}[scenario]()
print(f"{scenario}: all {checks} checks passed", flush=True)
