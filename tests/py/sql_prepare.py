#!/usr/bin/env python3
"""One psycopg 3 client sending SQL-level PREPARE, EXECUTE and DEALLOCATE through
cursor.execute() (tests/txpool_sql_prepare.rs).

Usage: sql_prepare.py CONNINFO CLIENT_ID ROUNDS

Several of these run at once against a pgsilo pool smaller than the number of clients,
each under the same statement names with definitions of its own. psycopg runs a query
without parameters as a simple query, and prepares one it has run prepare_threshold
(5) times with the protocol: an `EXECUTE p(1)` run often becomes a protocol-level
statement whose text names the client's SQL-level one. ClientCursor merges parameters
into the text, so its EXECUTE with parameters is a simple query too. Each check is
printed on failure; the script exits non-zero on the first one.
"""

import sys

import psycopg
from psycopg import errors

conninfo, cid, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
checks = 0


def check(cond, what):
    global checks
    if not cond:
        print(f"client {cid}: FAILED: {what}", flush=True)
        sys.exit(1)
    checks += 1


def fails_with(conn, sql, error, what):
    try:
        conn.execute(sql)
    except error:
        check(True, what)
        return
    except Exception as e:  # noqa: BLE001
        check(False, f"{what}: {type(e).__name__}: {e}")
    check(False, f"{what}: no error")


# --- autocommit: every statement a transaction of its own -------------------------------
with psycopg.connect(conninfo, autocommit=True) as conn:
    # A PREPARE whose transaction rolls back stays, as prepared statements do. (Before
    # psycopg has prepared anything itself: then it sends DEALLOCATE ALL after a rollback.)
    try:
        with conn.transaction():
            conn.execute(f"PREPARE kept AS SELECT {cid}")
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    check(conn.execute("EXECUTE kept").fetchone() == (cid,), "PREPARE of a rolled-back transaction")

    conn.execute(f"PREPARE p(int, text) AS SELECT $1 + {cid * 1000}, $2 || '-{cid}'")
    conn.execute("PREPARE same AS SELECT 'same for all'::text")
    for i in range(rounds):
        # The same text every round: psycopg prepares it after five runs.
        r = conn.execute("EXECUTE p(1, 'a')").fetchone()
        check(r == (1 + cid * 1000, f"a-{cid}"), f"EXECUTE p(1, 'a'), round {i}: {r}")
        # A text of this round only: always a simple query.
        r = conn.execute(f"EXECUTE p({i}, 'r{i}')").fetchone()
        check(r == (i + cid * 1000, f"r{i}-{cid}"), f"EXECUTE p({i}), round {i}: {r}")
        r = conn.execute("EXECUTE same").fetchone()
        check(r == ("same for all",), f"EXECUTE same, round {i}: {r}")
        with conn.cursor() as cur:
            cc = psycopg.ClientCursor(conn)
            cc.execute("EXECUTE p(%s, %s)", (i * 2, f"it's {i}"))
            r = cc.fetchone()
            check(r == (i * 2 + cid * 1000, f"it's {i}-{cid}"), f"ClientCursor EXECUTE, round {i}: {r}")
            cur.execute(f"EXPLAIN (COSTS OFF) EXECUTE p({i}, 'e')")
            check(cur.fetchall() == [("Result",)], f"EXPLAIN EXECUTE, round {i}")

    # Errors, as PostgreSQL reports them.
    fails_with(conn, "PREPARE p AS SELECT 2", errors.DuplicatePreparedStatement, "duplicate PREPARE")
    fails_with(conn, "EXECUTE nope", errors.InvalidSqlStatementName, "EXECUTE of an unknown name")
    fails_with(conn, "DEALLOCATE nope", errors.InvalidSqlStatementName, "DEALLOCATE of an unknown name")
    fails_with(conn, "EXECUTE p(1)", errors.SyntaxError, "wrong number of parameters")
    fails_with(conn, "PREPARE bad AS SELEC 1", errors.SyntaxError, "syntax error in the body")
    try:
        conn.execute("EXECUTE p(1, 2, 3)")
    except errors.SyntaxError as e:
        check(
            e.diag.message_primary == 'wrong number of parameters for prepared statement "p"',
            f"the client's name in the message: {e.diag.message_primary}",
        )

    # Redefined: the often-run `EXECUTE p(1, 'a')` (prepared by psycopg by now) runs the
    # new definition, as it does directly.
    conn.execute("DEALLOCATE p")
    fails_with(conn, "EXECUTE p(1, 'a')", errors.InvalidSqlStatementName, "EXECUTE after DEALLOCATE")
    conn.execute(f"PREPARE p(int, text) AS SELECT $1 * 10 + {cid}, $2")
    for i in range(3):
        r = conn.execute("EXECUTE p(1, 'a')").fetchone()
        check(r == (10 + cid, "a"), f"redefined p, run {i}: {r}")

    # The same PREPARE, EXECUTE and DEALLOCATE run round after round: psycopg prepares
    # all three with the protocol after five rounds.
    for i in range(rounds):
        conn.execute(f"PREPARE loop AS SELECT 'loop {cid}'")
        r = conn.execute("EXECUTE loop").fetchone()
        check(r == (f"loop {cid}",), f"EXECUTE loop, round {i}: {r}")
        conn.execute("DEALLOCATE loop")
        fails_with(conn, "EXECUTE loop", errors.InvalidSqlStatementName, f"loop deallocated, round {i}")
    fails_with(conn, "DEALLOCATE loop", errors.InvalidSqlStatementName, "DEALLOCATE loop once more")

    # Pipeline mode: every query goes through the extended protocol, all at once.
    with conn.pipeline():
        conn.execute(f"PREPARE pipe(int) AS SELECT $1 * {cid + 1}")
        cur = conn.execute("EXECUTE pipe(3)")
        conn.execute("DEALLOCATE pipe")
        conn.execute(f"PREPARE pipe(int) AS SELECT $1 - {cid}")
        cur2 = conn.execute("EXECUTE pipe(3)")
    check(cur.fetchone() == (3 * (cid + 1),), "EXECUTE in a pipeline")
    check(cur2.fetchone() == (3 - cid,), "EXECUTE of the redefinition in the pipeline")
    check(conn.execute("EXECUTE pipe(4)").fetchone() == (4 - cid,), "EXECUTE after the pipeline")

    # DEALLOCATE ALL and DISCARD ALL forget them all.
    conn.execute("DEALLOCATE ALL")
    fails_with(conn, "EXECUTE same", errors.InvalidSqlStatementName, "EXECUTE after DEALLOCATE ALL")
    conn.execute("PREPARE same AS SELECT 'back'::text")
    check(conn.execute("EXECUTE same").fetchone() == ("back",), "PREPARE after DEALLOCATE ALL")
    conn.execute("DISCARD ALL")
    fails_with(conn, "EXECUTE same", errors.InvalidSqlStatementName, "EXECUTE after DISCARD ALL")

# --- transactions: psycopg's default, one BEGIN per block -------------------------------
with psycopg.connect(conninfo) as conn:
    with conn.transaction():
        conn.execute(f"PREPARE t(int) AS SELECT $1 - {cid}")
        check(conn.execute("EXECUTE t(10)").fetchone() == (10 - cid,), "EXECUTE in the PREPARE's transaction")
    for i in range(rounds):
        with conn.transaction():
            r = conn.execute(f"EXECUTE t({i})").fetchone()
            check(r == (i - cid,), f"EXECUTE t({i}) in a transaction: {r}")
    try:
        with conn.transaction():
            conn.execute("SELECT 1/0")
    except errors.DivisionByZero:
        pass
    with conn.transaction():
        check(conn.execute("EXECUTE t(1)").fetchone() == (1 - cid,), "EXECUTE after a failed transaction")
    try:
        with conn.transaction():
            conn.execute("SELECT 1/0")
            conn.execute("EXECUTE t(1)")
    except errors.DivisionByZero:
        pass
    duplicate = False
    try:
        with conn.transaction():
            conn.execute("EXECUTE t(1)")
            conn.execute("PREPARE t(int) AS SELECT 1")
    except errors.DuplicatePreparedStatement:
        duplicate = True
    check(duplicate, "duplicate PREPARE in a transaction")
    with conn.transaction():
        check(conn.execute("EXECUTE t(2)").fetchone() == (2 - cid,), "the first t stays")

print(f"client {cid}: all {checks} checks passed", flush=True)
