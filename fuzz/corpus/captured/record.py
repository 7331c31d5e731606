# Records one TCP connection's bytes per direction (pgbench -> PostgreSQL), in order.
import socket, threading, sys, select
lport, rport, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", lport)); ls.listen(16)
n = 0
def serve(c, i):
    s = socket.create_connection(("127.0.0.1", rport))
    log = open(f"{out}.{i}", "wb")
    socks = {c: (s, 0), s: (c, 1)}
    while True:
        r, _, _ = select.select([c, s], [], [])
        for x in r:
            d = x.recv(65536)
            if not d:
                log.close(); return
            peer, direction = socks[x]
            peer.sendall(d)
            log.write(bytes([direction]) + len(d).to_bytes(2, "big") + d)
while True:
    c, _ = ls.accept(); n += 1
    threading.Thread(target=serve, args=(c, n), daemon=True).start()
