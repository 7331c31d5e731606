#!/usr/bin/env bash
# A login during a flood of unauthenticated sockets, pgsilo and PgBouncer side by side
# (issue 12). Each pooler in a session of its own (setsid), in front of one throwaway
# PostgreSQL 15, md5 for clients, max_client_conn 100, client_login_timeout 60 (both
# defaults). For each pooler in turn: FLOOD sockets (default 10000) connect from
# 127.0.0.1, send two bytes and wait; then ATTEMPTS (default 20) timed logins + `select 1`:
#   psql -h 127.0.0.2   libpq cannot bind its source: the kernel connects it FROM 127.0.0.1,
#                       the flood's own address (the local route's src for 127/8)
#   raw 127.0.0.2       a small md5 client bound to source 127.0.0.2: another address
#   psql unix           over the Unix socket
# Prints ok/refused counts and median/max seconds per kind, how many flood sockets the
# pooler still held, and the load average before and after. No timing is asserted.
# pgsilo runs with startup_packet_timeout = 0, so only its budget (not that timeout)
# keeps the flood from mattering; PgBouncer has neither.
#
#   benches/login_flood.sh [PGSILO_BINARY]      (default target/release/pgsilo)
#   FLOOD=10000 ATTEMPTS=20 benches/login_flood.sh
# Run as root (the cluster and PgBouncer run as postgres).
set -euo pipefail
SILO=$(realpath "${1:-${CARGO_TARGET_DIR:-target}/release/pgsilo}")
PGBOUNCER=${PGBOUNCER:-/usr/sbin/pgbouncer}
FLOOD=${FLOOD:-10000} ATTEMPTS=${ATTEMPTS:-20}
# shellcheck source=tools/throwaway_pg.sh
. "$(dirname "$0")/tools/throwaway_pg.sh"
# The flood, the poolers and this script's sockets: as many descriptors as allowed.
ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -gt $((FLOOD + 200)) ] || {
  echo "ulimit -n is $(ulimit -n): too low for FLOOD=$FLOOD" >&2
  exit 1
}
W=$(mktemp -d /tmp/pgsilo-login-flood.XXXX)
PGP=$((20000 + RANDOM % 5000)) SILO_PORT=$((PGP + 1)) PGB_PORT=$((PGP + 2))
throwaway_pg "$W" $PGP
echo '"postgres" "secret"' >"$W/users.txt"
mkdir "$W/silo" "$W/pgb" && chown postgres "$W/pgb"
cat >"$W/silo.toml" <<T
[pgsilo]
listen_addr = ["127.0.0.1", "127.0.0.2"]
listen_port = $SILO_PORT
listen_backlog = 4096
unix_socket_dir = "$W/silo"
auth_type = "md5"
auth_file = "$W/users.txt"
pool_mode = "transaction"
max_client_conn = 100
startup_packet_timeout = 0
takeover_socket = ""
log_connections = false
log_disconnections = false
[databases.postgres]
host = "127.0.0.1"
port = $PGP
T
cat >"$W/pgb.ini" <<I
[databases]
postgres = host=127.0.0.1 port=$PGP dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1,127.0.0.2
listen_port = $PGB_PORT
listen_backlog = 4096
unix_socket_dir = $W/pgb
auth_type = md5
auth_file = $W/users.txt
pool_mode = transaction
max_client_conn = 100
logfile = $W/pgb/pgbouncer.log
log_connections = 0
log_disconnections = 0
I
AS_PG=(setpriv --reuid=postgres --regid="$(id -g postgres)" --clear-groups --)
setsid "$SILO" "$W/silo.toml" >"$W/silo.log" 2>&1 </dev/null &
echo $! >"$W/silo.pid"
setsid "${AS_PG[@]}" "$PGBOUNCER" "$W/pgb.ini" >"$W/pgb.out" 2>&1 </dev/null &
echo $! >"$W/pgb.pid"
for port in $SILO_PORT $PGB_PORT; do
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
  done
done
echo "pgsilo: $("$SILO" --version 2>/dev/null || echo "$SILO"); $("$PGBOUNCER" --version | head -n1); fd limit $(ulimit -n)"
echo "load before: $(cat /proc/loadavg)"
python3 - "$W" "$FLOOD" "$ATTEMPTS" "$BIN/psql" "pgsilo:$SILO_PORT:$W/silo" "pgbouncer:$PGB_PORT:$W/pgb" <<'PY'
import hashlib, os, socket, statistics, struct, subprocess, sys, time

w, flood_n, attempts, psql = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
targets = [a.split(":") for a in sys.argv[5:]]
USER, PASSWORD = "postgres", "secret"

def flood(port):
    socks = []
    for _ in range(flood_n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        try:
            s.connect(("127.0.0.1", port))
            s.send(b"\0\0")
        except OSError:
            pass
        socks.append(s)
    return socks

def still_open(socks):
    """Sockets the pooler has not closed: what is waiting (an error it sent) is read and
    dropped; nothing more yet is open, EOF or a reset is closed."""
    n = 0
    for s in socks:
        s.setblocking(False)
        try:
            while s.recv(4096):
                pass
        except BlockingIOError:
            n += 1
        except OSError:
            pass
    return n

def raw_login(port, source):
    """md5 login and `select 1` from a bound source address: (got its row, why not)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=70, source_address=(source, 0))
    body = struct.pack("!i", 196608) + b"user\0" + USER.encode() + b"\0database\0postgres\0\0"
    s.sendall(struct.pack("!i", len(body) + 4) + body)
    buf, queried = b"", False
    while True:
        while len(buf) < 5 or len(buf) < 1 + struct.unpack("!i", buf[1:5])[0]:
            chunk = s.recv(65536)
            if not chunk:
                return False, "closed"
            buf += chunk
        n = 1 + struct.unpack("!i", buf[1:5])[0]
        tag, msg, buf = buf[:1], buf[5:n], buf[n:]
        if tag == b"E":
            fields = {f[:1]: f[1:].decode() for f in msg.split(b"\0") if f}
            return False, f"{fields.get(b'S', '')}: {fields.get(b'M', '')}"
        if tag == b"R" and struct.unpack("!i", msg[:4])[0] == 5:
            inner = hashlib.md5((PASSWORD + USER).encode()).hexdigest()
            digest = b"md5" + hashlib.md5(inner.encode() + msg[4:8]).hexdigest().encode() + b"\0"
            s.sendall(b"p" + struct.pack("!i", len(digest) + 4) + digest)
        elif tag == b"Z":
            if queried:
                s.close()
                return True, ""
            q = b"select 1\0"
            s.sendall(b"Q" + struct.pack("!i", len(q) + 4) + q)
            queried = True

def psql_login(host, port):
    env = dict(os.environ, PGPASSWORD=PASSWORD, PGCONNECT_TIMEOUT="70", PGSSLMODE="disable")
    r = subprocess.run([psql, "-X", "-At", "-h", host, "-p", port, "-U", USER, "-d", "postgres", "-c", "select 1"],
                       env=env, capture_output=True, text=True)
    return r.returncode == 0 and r.stdout.strip() == "1", r.stderr.strip()

def measure(port, sockdir):
    kinds = {
        "psql -h 127.0.0.2": lambda: psql_login("127.0.0.2", port),
        "raw 127.0.0.2": lambda: raw_login(int(port), "127.0.0.2"),
        "psql unix": lambda: psql_login(sockdir, port),
    }
    for kind, attempt in kinds.items():
        oks, times, why = 0, [], ""
        for _ in range(attempts):
            t0 = time.monotonic()
            try:
                ok, err = attempt()
            except OSError as e:
                ok, err = False, str(e)
            times.append(time.monotonic() - t0)
            oks += ok
            if not ok:
                why = err.splitlines()[-1] if err else "closed"
        print(f"  {kind:18} ok {oks:2}/{attempts}  median {1000 * statistics.median(times):7.1f} ms"
              f"  max {1000 * max(times):7.1f} ms" + (f"  (failure: {why})" if oks < attempts else ""))

for name, port, sockdir in targets:
    print(f"{name}, no flood:")
    measure(port, sockdir)
    socks = flood(int(port))
    time.sleep(2)  # let the pooler take them all in
    print(f"{name}, {flood_n} flood sockets from 127.0.0.1 ({still_open(socks)} still open after 2 s):")
    measure(port, sockdir)
    print(f"  flood sockets still open at the end: {still_open(socks)}")
    for s in socks:
        s.close()
PY
echo "load after: $(cat /proc/loadavg)"
