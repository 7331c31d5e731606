#!/usr/bin/env python3
"""Writes the seed corpus, fuzz/corpus/<target>/, from the wire captures in
fuzz/corpus/captured/ (pgbench and psql against PostgreSQL 15 with SCRAM, recorded by
captured/record.py as [direction 0=client 1=server][u16 length][bytes] records) and from
the hand-written samples below. Run it again after changing either; the fuzzer's own
finds are not kept here."""

import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
ROOT = os.path.dirname(HERE)


def msg(tag, body):
    return tag + struct.pack(">I", len(body) + 4) + body


def records(path):
    data = open(path, "rb").read()
    at = 0
    while at + 3 <= len(data):
        direction, n = data[at], struct.unpack(">H", data[at + 1:at + 3])[0]
        yield direction, data[at + 3:at + 3 + n]
        at += 3 + n


def messages(stream):
    at = 0
    while at + 5 <= len(stream):
        n = struct.unpack(">I", stream[at + 1:at + 5])[0]
        yield stream[at:at + 1], stream[at + 5:at + 1 + n]
        at += 1 + n


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def from_captures():
    for f in sorted(os.listdir(os.path.join(CORPUS, "captured"))):
        if not f.endswith(".rec"):
            continue
        name = f[:-4]
        recs = list(records(os.path.join(CORPUS, "captured", f)))
        client = b"".join(d for r, d in recs if r == 0)
        server = b"".join(d for r, d in recs if r == 1)
        # An SSLRequest refused with 'N' comes first when the client tried TLS.
        if client[:8] == struct.pack(">II", 8, 80877103):
            client, server = client[8:], server[1:]
        # The startup packet: length word first, no type byte.
        n = struct.unpack(">I", client[:4])[0]
        write("startup", name, client[:n])
        password_msgs = [b for t, b in messages(client[n:]) if t == b"p"]
        auth = [b for t, b in messages(server) if t == b"R"]
        sasl = [b[4:] for b in auth if b[:4] == struct.pack(">I", 10)]
        cont = [b[4:] for b in auth if b[:4] == struct.pack(">I", 11)]
        final = [b[4:] for b in auth if b[:4] == struct.pack(">I", 12)]
        if len(password_msgs) >= 2:
            write("scram_server", name, b"\x00" + password_msgs[0] + b"\x00" + password_msgs[1])
        if sasl and cont and final:
            write("scram_client", name, b"\x00" + sasl[0] + cont[0] + b"\x00" + final[0])
        # The session after login: from the first ReadyForQuery on, chunk by chunk.
        seen_ready = False
        session = bytearray([1])
        for r, d in recs:
            if not seen_ready:
                if r == 1 and b"Z\x00\x00\x00\x05" in d:
                    seen_ready = True
                continue
            session += bytes([r]) + struct.pack(">H", len(d)) + d
        write("byte_streams", name, bytes(session))
        write("framing", name + "_client", client[n:])
        write("framing", name + "_server", server)
        for i, (t, b) in enumerate(messages(client[n:])):
            if t == b"Q":
                write("sql_rewrite", f"{name}_{i}", b"\x00" + b.rstrip(b"\x00"))


def samples():
    startup = struct.pack(">I", 196608) + b"user\0alice\0database\0app\0options\0-c search_path=x --work_mem=8MB -ca\\ b=c\0_pq_.x\0y\0\0"
    write("startup", "options", struct.pack(">I", len(startup) + 4) + startup)
    write("startup", "ssl_request", struct.pack(">II", 8, 80877103))
    write("startup", "gssenc_request", struct.pack(">II", 8, 80877104))
    write("startup", "cancel", struct.pack(">III", 16, 80877102, 1234) + b"\x01\x02\x03\x04")

    write("scram_server", "plus", b"\x03SCRAM-SHA-256-PLUS\0\0\0\0\x30p=tls-server-end-point,,n=,r=abc\0"
          b"c=cD10bHMtc2VydmVyLWVuZC1wb2ludCwsBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=,r=abcSERVERNONCE,p=AAAA")
    write("scram_server", "plain", b"\x01SCRAM-SHA-256\0\0\0\0\x0fn,,n=,r=abcdef\0c=biws,r=abcdefSERVERNONCE,p=dGVzdA==")
    write("scram_client", "plain", b"\x00SCRAM-SHA-256\0\0r=CLIENTNONCEsrv,s=c2FsdC1vZi1zaXh0ZWVuIQ==,i=4096\0v=AAAA")
    write("scram_client", "error", b"\x01SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0r=CLIENTNONCEx,s=c2FsdA==,i=1\0e=invalid-proof")

    write("password", "md5", b"md5" + b"0123456789abcdef0123456789abcdef" + b"\0md5fedcba9876543210fedcba9876543210")
    write("password", "plain", b"secret\0secret")
    write("password", "scram", b"SCRAM-SHA-256$4096:c2FsdA==$dGVzdHRlc3R0ZXN0dGVzdHRlc3R0ZXN0dGVzdHRlc3Q=:"
          b"dGVzdHRlc3R0ZXN0dGVzdHRlc3R0ZXN0dGVzdHRlc3Q=\0secret")

    for f in ("userlist_tenant_a.txt", "userlist_tenant_b.txt", "userlist_shared.txt"):
        write("userlist", f, open(os.path.join(ROOT, "config", f), "rb").read())
    write("userlist", "quoting", b'; comment\n"al""ice" "md50123456789abcdef0123456789abcdef"\n"bob" ""\n')

    for f in ("tenant_a.toml", "tenant_b.toml", "shared.toml"):
        write("config_toml", f, open(os.path.join(ROOT, "config", f), "rb").read())

    write("config_ini", "pgbouncer", b"""[databases]
app = host=127.0.0.1 port=5432 dbname=app pool_size=10 pool_mode=transaction
* = host=localhost auth_user=pgsilo

[users]
alice = pool_mode=session max_user_connections=5

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = 6432
auth_type = scram-sha-256
auth_file = userlist.txt
pool_mode = transaction
max_client_conn = 100
default_pool_size = 20
server_reset_query = DISCARD ALL
ignore_startup_parameters = extra_float_digits, options
max_prepared_statements = 100
%include extra.ini
\0[pgbouncer]
stats_period = 30
""")

    for name, text in {
        "show": b"SHOW POOLS;SHOW STATS; show clients",
        "pause": b'PAUSE "my""db"; RESUME',
        "kill": b"KILL app;RELOAD;SHUTDOWN",
        "set": b"SET default_pool_size = 5",
    }.items():
        write("admin_command", name, text + b"\0")

    for name, sql in {
        "prepare": b"PREPARE p1(int) AS SELECT $1; EXECUTE p1(1); EXPLAIN EXECUTE p1(2); DEALLOCATE p1",
        "deallocate": b"deallocate prepare \"s1\"; DEALLOCATE ALL; DISCARD ALL",
        "listen": b"LISTEN ch; UNLISTEN *; NOTIFY ch, 'x'; listen \"Ch 2\"",
        "quoting": b"SELECT 'a;b', E'\\';', $tag$ ; $tag$, \"x;\" /* ; /* nested */ */ -- ;\n; CREATE RULE r AS ON INSERT TO t DO (a; b)",
        "atomic": b"CREATE FUNCTION f() RETURNS int BEGIN ATOMIC SELECT 1; END",
    }.items():
        write("sql_rewrite", name, b"\x00" + sql)
        write("sql_rewrite", name + "_parse", b"\x02" + sql)

    # A session: named Parse/Bind/Execute, then the server's answers, with statement
    # tracking and a small max_prepared_statements.
    up = (msg(b"P", b"s1\0select $1\0\0\x01\0\0\0\x17") + msg(b"B", b"\0s1\0\0\0\0\x01\0\0\0\x011\0\0")
          + msg(b"D", b"P\0") + msg(b"E", b"\0\0\0\0\0") + msg(b"S", b""))
    down = (msg(b"1", b"") + msg(b"2", b"") + msg(b"T", b"\0\x01a\0\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0")
            + msg(b"D", b"\0\x01\0\0\0\x011") + msg(b"C", b"SELECT 1\0") + msg(b"Z", b"I"))
    err = msg(b"E", b"SERROR\0C0A000\0Mcached plan must not change result type\0\0") + msg(b"Z", b"I")
    write("byte_streams", "extended_named",
          b"\x03" + b"\x00" + struct.pack(">H", len(up)) + up + b"\x01" + struct.pack(">H", len(down)) + down
          + b"\x00" + struct.pack(">H", len(up)) + up + b"\x01" + struct.pack(">H", len(err)) + err)
    # A client name longer than pgsilo's, and an error pointing into the rewritten text.
    name = b"a_statement_name_longer_than_the_one_pgsilo_gives_it"
    q = msg(b"Q", b"PREPARE " + name + b" AS SELECT 1; EXECUTE " + name + b"; SELECT x\0")
    a = (msg(b"C", b"PREPARE\0") + msg(b"C", b"SELECT 1\0")
         + msg(b"E", b"SERROR\0C42703\0Mcolumn \"x\" does not exist\0P18446744073709551615\0\0") + msg(b"Z", b"I"))
    write("byte_streams", "error_position",
          b"\x01" + b"\x00" + struct.pack(">H", len(q)) + q + b"\x01" + struct.pack(">H", len(a)) + a)
    q = msg(b"Q", b"PREPARE p AS SELECT 1; EXECUTE p; DEALLOCATE p; LISTEN x\0")
    a = (msg(b"C", b"PREPARE\0") + msg(b"C", b"SELECT 1\0") + msg(b"C", b"DEALLOCATE\0")
         + msg(b"C", b"LISTEN\0") + msg(b"Z", b"I"))
    write("byte_streams", "sql_prepare",
          b"\x05" + b"\x00" + struct.pack(">H", len(q)) + q + b"\x01" + struct.pack(">H", len(a)) + a)


if __name__ == "__main__":
    from_captures()
    samples()
    sys.exit(0)
