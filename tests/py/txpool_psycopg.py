#!/usr/bin/env python3
"""One psycopg 3 client of the transaction-pooling matrix (tests/txpool_clients.rs).

Usage: txpool_psycopg.py CONNINFO CLIENT_ID ROUNDS

Several of these run at once against a pgsilo pool of one or two servers. Each checks
server-side prepared statements (prepare=True, and prepare_threshold=0), pipeline mode
with an error inside it, COPY in both directions, and transactions rolled back on an
exception; it prints every check and exits non-zero on the first failure.

psycopg names its prepared statements _pg3_0, _pg3_1, ... per connection, so the
concurrent clients use the same names for different SQL on the same servers.
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


table = f"py_items_{cid}"

# --- prepared statements, prepare=True -------------------------------------------------
with psycopg.connect(conninfo, autocommit=True) as conn:
    conn.execute(f"DROP TABLE IF EXISTS {table}")
    conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    for i in range(rounds):
        # Same SQL for every client, and SQL of this client only, both prepared.
        r = conn.execute("SELECT %s::int * 2, %s::text", (i, f"c{cid}"), prepare=True).fetchone()
        check(r == (i * 2, f"c{cid}"), f"shared prepared statement, round {i}: {r}")
        r = conn.execute(f"SELECT %s::int + {cid * 1000}", (i,), prepare=True).fetchone()
        check(r == (i + cid * 1000,), f"own prepared statement, round {i}: {r}")
        r = conn.execute(
            f"INSERT INTO {table} (id, v) VALUES (%s, %s) RETURNING id", (i, f"v{i}"), prepare=True
        ).fetchone()
        check(r == (i,), f"prepared insert {i}")
    n = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    check(n == rounds, f"rows after prepared inserts: {n}")
    # The shared counter, incremented in explicit transactions.
    for i in range(rounds // 5):
        with conn.transaction():
            conn.execute("UPDATE py_counter SET n = n + 1", prepare=True)
    print(f"client {cid}: prepare=True ok ({checks} checks)", flush=True)

# --- prepare_threshold=0: everything prepared, in a transaction that is not autocommit ---
with psycopg.connect(conninfo, prepare_threshold=0) as conn:
    for i in range(rounds):
        r = conn.execute("SELECT %s::text || %s::text", (f"t{cid}", str(i))).fetchone()
        check(r == (f"t{cid}{i}",), f"prepare_threshold=0 round {i}: {r}")
        conn.commit()
    # Rolled back on an exception raised by Python.
    try:
        with conn.transaction():
            conn.execute(f"INSERT INTO {table} (id, v) VALUES (100000, 'gone')")
            raise RuntimeError("abort")
    except RuntimeError:
        pass
    n = conn.execute(f"SELECT count(*) FROM {table} WHERE id = 100000").fetchone()[0]
    check(n == 0, "row of the rolled-back transaction")
    conn.commit()
    # Rolled back on a server error.
    try:
        with conn.transaction():
            conn.execute(f"INSERT INTO {table} (id, v) VALUES (100001, 'gone')")
            conn.execute("SELECT 1 / 0")
        check(False, "division by zero did not raise")
    except errors.DivisionByZero:
        pass
    n = conn.execute(f"SELECT count(*) FROM {table} WHERE id = 100001").fetchone()[0]
    check(n == 0, "row of the transaction failed by the server")
    conn.commit()
    # A nested savepoint rolled back while the outer transaction commits.
    with conn.transaction():
        conn.execute(f"INSERT INTO {table} (id, v) VALUES (100002, 'kept')")
        try:
            with conn.transaction():
                conn.execute(f"INSERT INTO {table} (id, v) VALUES (100003, 'gone')")
                conn.execute("SELECT 1 / 0")
        except errors.DivisionByZero:
            pass
    ids = [r[0] for r in conn.execute(f"SELECT id FROM {table} WHERE id >= 100000 ORDER BY id")]
    check(ids == [100002], f"savepoint rollback: {ids}")
    conn.commit()
    print(f"client {cid}: prepare_threshold=0 and rollbacks ok ({checks} checks)", flush=True)

# --- pipeline mode ----------------------------------------------------------------------
with psycopg.connect(conninfo, autocommit=True) as conn:
    base = 200000
    with conn.pipeline() as p:
        curs = [
            conn.execute(
                f"INSERT INTO {table} (id, v) VALUES (%s, %s) RETURNING id * 10", (base + i, "p")
            )
            for i in range(rounds)
        ]
        p.sync()
        got = [c.fetchone()[0] for c in curs]
    check(got == [(base + i) * 10 for i in range(rounds)], "pipelined inserts returned their ids")
    # An error inside the pipeline: what was synced before it stays; what follows it up to
    # the next sync is skipped; after the next sync everything runs again.
    try:
        with conn.pipeline() as p:
            conn.execute(f"INSERT INTO {table} (id, v) VALUES (300000, 'before')")
            p.sync()
            conn.execute(f"INSERT INTO {table} (id, v) VALUES (300001, 'same segment')")
            conn.execute("SELECT 1 / 0")
            conn.execute(f"INSERT INTO {table} (id, v) VALUES (300002, 'skipped')")
            p.sync()
        check(False, "error in pipeline did not raise")
    except errors.DivisionByZero:
        pass
    ids = [r[0] for r in conn.execute(f"SELECT id FROM {table} WHERE id >= 300000 ORDER BY id")]
    check(ids == [300000], f"rows after the failed pipeline: {ids}")
    # The connection is fine, in and out of pipelines, prepared statements included.
    with conn.pipeline():
        curs = [conn.execute("SELECT %s::int", (i,), prepare=True) for i in range(20)]
    check([c.fetchone()[0] for c in curs] == list(range(20)), "pipeline after the error")
    r = conn.execute("SELECT 'still fine'").fetchone()
    check(r == ("still fine",), "query after the pipelines")
    print(f"client {cid}: pipeline ok ({checks} checks)", flush=True)

# --- COPY ---------------------------------------------------------------------------------
with psycopg.connect(conninfo, autocommit=True) as conn:
    with conn.cursor() as cur:
        with cur.copy(f"COPY {table} (id, v) FROM STDIN") as copy:
            for i in range(400000, 400000 + rounds * 20):
                copy.write_row((i, f"copied {i}\ttab"))
        check(cur.rowcount == rounds * 20, f"COPY FROM STDIN rowcount {cur.rowcount}")
        rows = []
        with cur.copy(
            f"COPY (SELECT id, v FROM {table} WHERE id >= 400000 ORDER BY id) TO STDOUT"
        ) as copy:
            copy.set_types(["int4", "text"])
            for row in copy.rows():
                rows.append(row)
        check(len(rows) == rounds * 20, f"COPY TO STDOUT rows {len(rows)}")
        check(rows[0] == (400000, "copied 400000\ttab"), f"first copied row {rows[0]}")
        # Binary COPY out.
        data = b""
        with cur.copy(f"COPY (SELECT id FROM {table}) TO STDOUT (FORMAT binary)") as copy:
            for chunk in copy:
                data += bytes(chunk)
        check(data.startswith(b"PGCOPY\n\xff\r\n\0"), "binary COPY header")
        # A COPY the client aborts with an exception: nothing copied, connection usable.
        try:
            with cur.copy(f"COPY {table} (id, v) FROM STDIN") as copy:
                copy.write_row((500000, "aborted"))
                raise RuntimeError("stop copying")
        except RuntimeError:
            pass
        n = conn.execute(f"SELECT count(*) FROM {table} WHERE id = 500000").fetchone()[0]
        check(n == 0, "row of the aborted COPY")
    print(f"client {cid}: COPY ok ({checks} checks)", flush=True)

with psycopg.connect(conninfo, autocommit=True) as conn:
    conn.execute(f"DROP TABLE {table}")

print(f"client {cid}: all {checks} checks passed", flush=True)
