"""LISTEN through pgsilo under transaction pooling, the psycopg 3 way: conn.notifies()
while another connection notifies inside its transactions. Prints the payloads received,
comma-joined, then the answer of a query run on the listening connection afterwards."""

import sys
import threading

import psycopg

conninfo = sys.argv[1]

with psycopg.connect(conninfo, autocommit=True) as listener:
    listener.execute("LISTEN py_ch")

    def notify():
        with psycopg.connect(conninfo, autocommit=True) as n:
            for i in range(5):
                with n.transaction():
                    n.execute("SELECT pg_notify('py_ch', %s)", (f"p{i}",))
                n.execute("SELECT 1")

    t = threading.Thread(target=notify)
    t.start()
    got = [note.payload for note in listener.notifies(timeout=30, stop_after=5)]
    t.join()
    print(",".join(got))
    print(listener.execute("SELECT 42").fetchone()[0])
