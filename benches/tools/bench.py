#!/usr/bin/env python3
"""Helpers for benches/run.sh (standard library only).

  bench.py latency PREFIX [--from T0 --to T1] [--keep]
      Reads pgbench's per-transaction logs PREFIX.* (-l --log-prefix=PREFIX) and prints
      "count failed avg_ms p50_ms p99_ms max_ms" over the transactions that ended between
      T0 and T1 (epoch microseconds; default: all), latencies in ms, p99 nearest-rank.
      Removes the logs unless --keep.

  bench.py snap POSTMASTER_PID POOLER_PID|- PGBENCH_PID|-
      Prints "machine_total machine_busy pooler_ticks postgres_ticks kernel_ticks
      pgbench_ticks epoch_us" (clock ticks; -1 for a process that is gone; then when the
      snapshot was taken): the machine's CPU time from /proc/stat (busy =
      user+nice+system), the pooler's and pgbench's utime+stime, PostgreSQL's (the postmaster's own and reaped children's time
      plus every live child's, so backends that come and go during a run are counted), and
      kernel threads' (ksoftirqd, kworkers: much of it is the benchmark's own TCP traffic).

  bench.py verifier PASSWORD ITERATIONS
      Prints a SCRAM-SHA-256 verifier in pg_authid's format (random salt).

  bench.py report OUTDIR
      Builds OUTDIR/report.md from OUTDIR/results.csv, OUTDIR/memory.csv and
      OUTDIR/meta.txt, and prints it.
"""

import csv
import glob
import math
import os
import statistics
import sys

TARGETS = ["postgres", "pgbouncer", "pgsilo"]
LABEL = {
    "postgres": "PostgreSQL",
    "pgbouncer": "PgBouncer",
    "pgsilo": "pgsilo",
    "pgbouncer-tls": "PgBouncer TLS",
    "pgsilo-tls": "pgsilo TLS",
    "pgbouncer-unix": "PgBouncer unix",
    "pgsilo-unix": "pgsilo unix",
}


def latency(prefix, keep, t_from=None, t_to=None):
    lat = []
    failed = 0
    files = sorted(glob.glob(glob.escape(prefix) + ".*"))
    for path in files:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) < 6:
                    continue
                # client_id transaction_no time script_no time_epoch time_us [...]
                # time: the latency in microseconds, or "failed"/"skipped"; time_epoch and
                # time_us: when the transaction ended.
                if t_from is not None:
                    try:
                        end = int(parts[4]) * 1000000 + int(parts[5])
                    except ValueError:
                        continue
                    if end < t_from or end > t_to:
                        continue
                try:
                    lat.append(int(parts[2]))
                except ValueError:
                    failed += 1
        if not keep:
            os.remove(path)
    if not lat:
        print(f"0 {failed} nan nan nan nan nan")
        return
    lat.sort()
    n = len(lat)

    def pct(p):
        return lat[max(0, math.ceil(p / 100.0 * n) - 1)] / 1000.0

    avg = sum(lat) / n / 1000.0
    print(f"{n} {failed} {avg:.3f} {pct(50):.3f} {pct(99):.3f} {pct(99.9):.3f} {lat[-1] / 1000.0:.3f}")


def proc_stat(pid):
    """(ppid, utime+stime, cutime+cstime) of a process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    rest = s[s.rindex(")") + 2:].split()
    # rest[0] is field 3 (state): ppid is field 4, utime..cstime fields 14..17.
    return int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[13]) + int(rest[14])


def snap(postmaster, pooler, pgbench):
    import time

    at = time.time_ns() // 1000
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    total = sum(cpu[:8])
    busy = cpu[0] + cpu[1] + cpu[2]
    def own(pid):
        if not pid or pid == "-":
            return 0
        st = proc_stat(pid)
        return st[1] if st else -1

    pool = own(pooler)
    bench = own(pgbench)
    pg = 0
    kernel = 0
    st = proc_stat(postmaster)
    if st:
        pg = st[1] + st[2]
    for d in os.listdir("/proc"):
        if d.isdigit():
            c = proc_stat(d)
            if c and st and c[0] == int(postmaster):
                pg += c[1]
            elif c and (c[0] == 2 or d == "2"):
                kernel += c[1]
    print(f"{total} {busy} {pool} {pg} {kernel} {bench} {at}")


def verifier(password, iterations):
    import base64
    import hashlib
    import hmac

    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    b64 = lambda b: base64.b64encode(b).decode()
    print(f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}")


def num(v):
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=0, unit=""):
    if v is None:
        return "–"
    if digits == 0:
        return f"{v:,.0f}{unit}"
    return f"{v:,.{digits}f}{unit}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}×"


def workload_label(w, mode):
    return {
        "select": f"-S -M {mode}",
        "select-connect": f"-S -C -M {mode}",
        "tpcb": f"TPC-B -M {mode}",
        "cold-start": f"cold start: -S -M {mode}, a fresh pooler's first seconds",
    }.get(w, f"{w} {mode}")


def report(outdir):
    meta = {}
    meta_path = os.path.join(outdir, "meta.txt")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            for line in f:
                if "=" in line:
                    k, v = line.rstrip("\n").split("=", 1)
                    meta[k] = v
    rows = []
    res_path = os.path.join(outdir, "results.csv")
    if os.path.exists(res_path):
        with open(res_path) as f:
            rows = list(csv.DictReader(f))
    mem = []
    mem_path = os.path.join(outdir, "memory.csv")
    if os.path.exists(mem_path):
        with open(mem_path) as f:
            mem = list(csv.DictReader(f))

    out = []
    w = out.append
    w("# pgsilo benchmark report")
    w("")
    w(f"- date: {meta.get('date_start', '?')} → {meta.get('date_end', '?')} "
      f"({meta.get('elapsed', '?')} s); pgsilo commit {meta.get('commit', '?')}")
    w(f"- machine: {meta.get('nproc', '?')} cores ({meta.get('cpu_model', '?')}), "
      f"{meta.get('mem', '?')}, kernel {meta.get('kernel', '?')}")
    w(f"- load average at start: {meta.get('load_start', '?')}; at end: {meta.get('load_end', '?')}")
    w(f"- {meta.get('pg_version', '?')}; {meta.get('pgbouncer_version', 'PgBouncer not installed')}; "
      f"{meta.get('pgbench_version', '?')}")
    w(f"- settings: {meta.get('settings', '?')}")
    w(f"- cores (thread name→allowed cores): pgsilo {meta.get('pgsilo_cores', '?')}; "
      f"PgBouncer {meta.get('pgbouncer_cores', '–')}; "
      + ("pgbench and PostgreSQL pinned (the pinned profile)" if meta.get("profile") == "pinned"
         else "pgbench and PostgreSQL unpinned"))
    w("")

    if rows:
        # Group by configuration; the median over rounds per target.
        configs = []
        by = {}
        for r in rows:
            key = (r["workload"], r["mode"], int(r["clients"]))
            if key not in by:
                by[key] = {}
                configs.append(key)
            by[key].setdefault(r["target"], []).append(r)

        def stat(rs, field):
            return med([num(r.get(field)) for r in rs if r["status"] == "ok"])

        def spread(rs, field):
            vals = [num(r.get(field)) for r in rs if r["status"] == "ok" and num(r.get(field)) is not None]
            if not vals:
                return None, None, None
            return statistics.median(vals), min(vals), max(vals)

        def noisy(rs):
            """A cell out of the verdict: another process took over 5% of the machine in
            one of its runs, or its TPS spread (max-min over median) is above 15%."""
            ok = [r for r in rs if r["status"] == "ok"]
            if any((num(r.get("other_pct")) or 0) > 5 for r in ok):
                return True
            m, lo, hi = spread(ok, "tps")
            return bool(m) and len(ok) > 1 and (hi - lo) / m > 0.15

        def cell(rs, field, digits=0):
            m, lo, hi = spread(rs or [], field)
            if m is None:
                return (rs[0]["status"] if rs else "–")
            if lo == hi:
                return fmt(m, digits)
            return f"{fmt(m, digits)} ({fmt(lo, digits)}–{fmt(hi, digits)})"

        w("## Throughput and pooler cost (pgbench)")
        w("")
        w("Median over rounds, min–max in brackets. *vs*: pgsilo's median divided by the "
          "other's. CPU: the pooler process's own user+sys time per transaction; syscalls and "
          "context switches per transaction: `perf stat` on the pooler over the same window. "
          "*noisy*: another process used over 5% of the machine in a run, or the TPS spread "
          "is over 15% of the median; such cells stay out of the verdict.")
        w("")
        w("| workload | clients | target | TPS | vs PgBouncer | CPU µs/tx | syscalls/tx | ctx sw/tx "
          "| p99 ms | p99.9 ms | max ms | noisy |")
        w("|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|---|")
        for key in configs:
            t = by[key]
            for name in ("postgres", "pgbouncer", "pgsilo"):
                rs = t.get(name)
                if not rs:
                    continue
                mx = [num(r["max_ms"]) for r in rs if r["status"] == "ok" and num(r["max_ms"]) is not None]
                w(f"| {workload_label(key[0], key[1])} | {key[2]} | {LABEL.get(name, name)} | {cell(rs, 'tps')} "
                  f"| {ratio(stat(rs, 'tps'), stat(t.get('pgbouncer', []), 'tps')) if name == 'pgsilo' else ''} "
                  f"| {cell(rs, 'cpu_us_per_tx', 1) if name != 'postgres' else ''} "
                  f"| {fmt(stat(rs, 'syscalls_per_tx'), 2) if name != 'postgres' else ''} "
                  f"| {fmt(stat(rs, 'cs_per_tx'), 2) if name != 'postgres' else ''} "
                  f"| {fmt(stat(rs, 'p99_ms'), 2)} | {fmt(stat(rs, 'p999_ms'), 2)} | {fmt(max(mx) if mx else None, 0)} "
                  f"| {'noisy' if noisy(rs) else ''} |")
        w("")

        # The verdict against issue 16's targets, from the cells that are not noisy.
        verdict = []
        for key in configs:
            t = by[key]
            pb, ps = t.get("pgbouncer", []), t.get("pgsilo", [])
            if not pb or not ps:
                continue
            label = f"{workload_label(key[0], key[1])}, {key[2]} clients"
            out_of = noisy(pb) or noisy(ps)
            if key[0] == "cold-start":
                # Connecting is part of the cell: its TPS varies by design; only other
                # processes' CPU puts it out of the verdict.
                out_of = any((num(r.get("other_pct")) or 0) > 5 for r in pb + ps if r["status"] == "ok")

            def judge(what, value, target, ok):
                if value is None:
                    verdict.append((label, what, "–", target, "no data"))
                else:
                    verdict.append((label, what, value, target, "noisy" if out_of else ("met" if ok else "missed")))

            if key[0] == "select":
                r = None
                if stat(pb, "tps") and stat(ps, "tps") is not None:
                    r = stat(ps, "tps") / stat(pb, "tps")
                judge("TPS vs PgBouncer", r and f"{r:.2f}×", "≥ 1.10×", r is not None and r >= 1.10)
                c = None
                if stat(pb, "cpu_us_per_tx") and stat(ps, "cpu_us_per_tx") is not None:
                    c = stat(ps, "cpu_us_per_tx") / stat(pb, "cpu_us_per_tx")
                judge("CPU/tx vs PgBouncer", c and f"{c:.2f}×", "≤ 0.85×", c is not None and c <= 0.85)
                a, b = stat(ps, "p999_ms"), stat(pb, "p999_ms")
                judge("p99.9", a is not None and b is not None and f"{a:.2f} vs {b:.2f} ms" or None,
                      "≤ PgBouncer's", a is not None and b is not None and a <= b)
                am = max([num(r["max_ms"]) or 0 for r in ps if r["status"] == "ok"] or [0])
                bm = max([num(r["max_ms"]) or 0 for r in pb if r["status"] == "ok"] or [0])
                judge("max", bm and f"{am:.0f} vs {bm:.0f} ms", "≤ 2× PgBouncer's", bm > 0 and am <= 2 * bm)
            elif key[0] == "cold-start":
                am = max([num(r["max_ms"]) or 0 for r in ps if r["status"] == "ok"] or [0])
                bm = max([num(r["max_ms"]) or 0 for r in pb if r["status"] == "ok"] or [0])
                judge("max (cold start)", bm and f"{am:.0f} vs {bm:.0f} ms", "≤ 2× PgBouncer's", bm > 0 and am <= 2 * bm)
                a, b = stat(ps, "p99_ms"), stat(pb, "p99_ms")
                judge("p99 (cold start)", a is not None and b is not None and f"{a:.2f} vs {b:.2f} ms" or None,
                      "≤ PgBouncer's", a is not None and b is not None and a <= b)
            elif key[0] == "select-connect":
                a, b = stat(ps, "cpu_us_per_tx"), stat(pb, "cpu_us_per_tx")
                judge("CPU per login", a is not None and b is not None and f"{a:.0f} vs {b:.0f} µs" or None,
                      "≤ PgBouncer's", a is not None and b is not None and a <= b)
        if mem:
            per = {}
            for m in mem:
                before, after, ok = num(m["rss_before_kib"]), num(m["rss_after_kib"]), num(m["ok"])
                if before is not None and after is not None and ok:
                    per[m["target"]] = (after - before) / ok
            if "pgsilo" in per:
                verdict.append(("idle clients", "RSS per idle client", f"{per['pgsilo']:.2f} KiB",
                                "≤ 1 KiB", "met" if per["pgsilo"] <= 1.0 else "missed"))
        if verdict:
            w("## Verdict (issue 16's targets)")
            w("")
            w("| cell | measure | pgsilo (vs PgBouncer) | target | verdict |")
            w("|---|---|---|---|---|")
            for v in verdict:
                w(f"| {v[0]} | {v[1]} | {v[2]} | {v[3]} | {v[4]} |")
            w("")
        front = [k for k in configs if any(t.endswith(("-tls", "-unix")) for t in by[k])]
        if front:
            w("## The front door: TLS and Unix sockets")
            w("")
            w("*plain*: clients and server over loopback TCP without TLS (the rows above). "
              "*TLS*: clients with sslmode=require and the pooler to PostgreSQL with "
              "server_tls_sslmode=require (rustls in pgsilo, OpenSSL in PgBouncer). *unix*: "
              "clients on the pooler's Unix socket, the server over TCP. With -C every "
              "transaction is a new login (TLS handshake and SCRAM), so CPU per transaction "
              "there is CPU per handshake and login. Medians over rounds.")
            w("")
            w("| workload | clients | path | PgBouncer TPS | pgsilo TPS | pgsilo vs PgBouncer "
              "| PgBouncer CPU µs/tx | pgsilo CPU µs/tx | PgBouncer p99 ms | pgsilo p99 ms |")
            w("|---|--:|---|--:|--:|--:|--:|--:|--:|--:|")
            for key in front:
                t = by[key]
                for path, suffix in (("plain", ""), ("TLS", "-tls"), ("unix", "-unix")):
                    pb_rows, ps_rows = t.get("pgbouncer" + suffix, []), t.get("pgsilo" + suffix, [])
                    if not pb_rows and not ps_rows:
                        continue
                    pb, ps = stat(pb_rows, "tps"), stat(ps_rows, "tps")
                    w(f"| {workload_label(key[0], key[1])} | {key[2]} | {path} | {fmt(pb)} | {fmt(ps)} "
                      f"| {ratio(ps, pb)} | {fmt(stat(pb_rows, 'cpu_us_per_tx'), 1)} "
                      f"| {fmt(stat(ps_rows, 'cpu_us_per_tx'), 1)} | {fmt(stat(pb_rows, 'p99_ms'), 2)} "
                      f"| {fmt(stat(ps_rows, 'p99_ms'), 2)} |")
            w("")
        w("## Every run")
        w("")
        w("In the order run (the order of targets rotates per configuration). Each run is "
          "measured over a window that starts once every client is connected (*connect s* "
          "after pgbench started; with -C the window is the whole run): TPS, latencies (from "
          "pgbench's per-transaction log, -l) and CPU per transaction count the transactions "
          "that ended in the window. CPU per transaction: the pooler process, all of "
          "PostgreSQL (postmaster and backends), pgbench. Peak RSS: the pooler's VmHWM during "
          "the run. *other %*: the machine's CPU used by processes outside the benchmark "
          "(noise: compare runs with little of it).")
        w("")
        w("| # | workload | clients | target | status | connect s | window s | TPS | avg ms | p99 ms | max ms | pooler CPU µs/tx "
          "| PostgreSQL CPU µs/tx | pgbench CPU µs/tx | pooler peak RSS MiB | machine busy % | other % |")
        w("|--:|---|--:|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
        for r in rows:
            rss = num(r["peak_rss_kib"])
            w(f"| {r['seq']} | {workload_label(r['workload'], r['mode'])} | {r['clients']} | {LABEL.get(r['target'], r['target'])} "
              f"| {r['status']} | {fmt(num(r['conn_ms']) / 1000 if num(r['conn_ms']) is not None else None, 1)} "
              f"| {fmt(num(r['window_s']), 1)} | {fmt(num(r['tps']))} | {fmt(num(r['avg_ms']), 2)} | {fmt(num(r['p99_ms']), 2)} "
              f"| {fmt(num(r['max_ms']), 0)} | {fmt(num(r['cpu_us_per_tx']), 1)} | {fmt(num(r['pg_cpu_us_per_tx']), 1)} "
              f"| {fmt(num(r['pgbench_cpu_us_per_tx']), 1)} | {fmt(rss / 1024 if rss else None, 1)} "
              f"| {fmt(num(r['busy_pct']))} | {fmt(num(r['other_pct']))} |")
        notes = [r for r in rows if r.get("note")]
        if notes:
            w("")
            w("Failures and notes:")
            w("")
            for r in notes:
                w(f"- run {r['seq']} ({LABEL.get(r['target'], r['target'])}, "
                  f"{workload_label(r['workload'], r['mode'])}, {r['clients']} clients): {r['note']}")
        w("")

    if mem:
        w("## Memory per idle client")
        w("")
        w("Clients log in (trust authentication, transaction pooling) and then sit idle; "
          "RSS is VmRSS of the pooler process.")
        w("")
        w("| pooler | clients logged in | failed | login time s | RSS before MiB | RSS after MiB "
          "| KiB per client | pooler fds after |")
        w("|---|--:|--:|--:|--:|--:|--:|--:|")
        for m in mem:
            before, after, ok = num(m["rss_before_kib"]), num(m["rss_after_kib"]), num(m["ok"])
            per = (after - before) / ok if before is not None and after is not None and ok else None
            w(f"| {LABEL.get(m['target'], m['target'])} | {m['ok']} | {m['failed']} | {m['secs']} "
              f"| {fmt(before / 1024 if before is not None else None, 1)} | {fmt(after / 1024 if after is not None else None, 1)} "
              f"| {fmt(per, 2)} | {m['fds_after']} |")
        w("")

    text = "\n".join(out) + "\n"
    with open(os.path.join(outdir, "report.md"), "w") as f:
        f.write(text)
    sys.stdout.write(text)


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "latency":
        rest = sys.argv[3:]
        window = [None, None]
        for i, flag in enumerate(("--from", "--to")):
            if flag in rest:
                window[i] = int(rest[rest.index(flag) + 1])
        latency(sys.argv[2], "--keep" in rest, *window)
    elif len(sys.argv) == 5 and sys.argv[1] == "snap":
        snap(sys.argv[2], sys.argv[3], sys.argv[4])
    elif len(sys.argv) == 4 and sys.argv[1] == "verifier":
        verifier(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) == 3 and sys.argv[1] == "report":
        report(sys.argv[2])
    else:
        sys.stderr.write(__doc__)
        sys.exit(2)


if __name__ == "__main__":
    main()
