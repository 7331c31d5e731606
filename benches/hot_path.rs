//! Micro benchmarks of pgsilo's per-message and per-transaction user-space work:
//!
//! - `framing`: finding message boundaries (`framing::scan`) in a buffer of mixed messages;
//! - `tx_tracker`: the transaction tracker fed one pgbench -S transaction;
//! - `upstream` / `downstream` / `roundtrip`: `proxy::upstream::process` and
//!   `proxy::downstream::process` on the exact bytes libpq sends and PostgreSQL answers for
//!   one `pgbench -S` transaction, in `-M simple`, `-M extended` and `-M prepared` (Bind of
//!   a named statement, which pgsilo renames), with statement tracking on, as it is under
//!   transaction pooling with the default `max_prepared_statements`;
//! - `scram`: a client login's SCRAM-SHA-256 verification (server side), the pooler's own
//!   SCRAM passthrough login to PostgreSQL (client side), and for scale what the client
//!   (libpq, pgbench -C) pays to derive its keys from a password (4096 PBKDF2 rounds).
//!
//! `cargo bench --bench hot_path [-- FILTER]`. See benches/README.md.

use std::hint::black_box;
use std::rc::Rc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use pgsilo::auth::{scram_secret_from_password, ScramClient, ScramClientKeys, ScramSecret, ScramServer};
use pgsilo::pool::{ServerMeta, Settings};
use pgsilo::protocol::framing::{scan, Scan};
use pgsilo::proxy::downstream::{self, DownState, Hold, Resetting};
use pgsilo::proxy::expect::{Expect, ExpectQueue, Kind};
use pgsilo::proxy::prepared::{ClientStatements, StmtDef, UnnamedStmt};
use pgsilo::proxy::retry::StaleRetry;
use pgsilo::proxy::tx_tracker::TxTracker;
use pgsilo::proxy::upstream::{self, UpCursor, UpState};

// ---------------------------------------------------------------------------------------
// Wire bytes of one pgbench -S transaction.

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

/// pgbench's built-in select-only script, with `:aid` as pgbench substitutes it.
const SIMPLE_SQL: &[u8] = b"SELECT abalance FROM pgbench_accounts WHERE aid = 718263;\0";
const PARAM_SQL: &[u8] = b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;\0";
/// The name pgbench 15 gives the -S script's statement (as seen on the wire).
const STMT_NAME: &[u8] = b"P_0";

/// Parse body after the statement name: query text, then 0 parameter types (libpq sends
/// none when PQexecParams gets no types).
fn parse_def() -> Vec<u8> {
    let mut b = PARAM_SQL.to_vec();
    b.extend_from_slice(&0u16.to_be_bytes());
    b
}

/// Bind as libpq's PQsendQueryGuts writes it: portal "", statement, 0 parameter formats,
/// 1 text parameter, 1 result format (text).
fn bind(stmt: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8];
    b.extend_from_slice(stmt);
    b.push(0);
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&1u16.to_be_bytes());
    b.extend_from_slice(&6i32.to_be_bytes());
    b.extend_from_slice(b"718263");
    b.extend_from_slice(&1u16.to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    msg(b'B', &b)
}

fn describe_portal() -> Vec<u8> {
    msg(b'D', b"P\0")
}

fn execute() -> Vec<u8> {
    msg(b'E', b"\0\0\0\0\0")
}

fn sync() -> Vec<u8> {
    msg(b'S', b"")
}

fn row_description() -> Vec<u8> {
    let mut b = 1u16.to_be_bytes().to_vec();
    b.extend_from_slice(b"abalance\0");
    b.extend_from_slice(&16398u32.to_be_bytes()); // table oid
    b.extend_from_slice(&3u16.to_be_bytes()); // column number
    b.extend_from_slice(&23u32.to_be_bytes()); // int4
    b.extend_from_slice(&4i16.to_be_bytes());
    b.extend_from_slice(&(-1i32).to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    msg(b'T', &b)
}

fn data_row() -> Vec<u8> {
    let mut b = 1u16.to_be_bytes().to_vec();
    b.extend_from_slice(&4i32.to_be_bytes());
    b.extend_from_slice(b"-512");
    msg(b'D', &b)
}

fn select_result() -> Vec<u8> {
    cat(&[row_description(), data_row(), msg(b'C', b"SELECT 1\0"), msg(b'Z', b"I")])
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Simple,
    Extended,
    Prepared,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Simple, Mode::Extended, Mode::Prepared];

    fn name(self) -> &'static str {
        match self {
            Mode::Simple => "simple",
            Mode::Extended => "extended",
            Mode::Prepared => "prepared",
        }
    }

    /// What the client sends for one transaction.
    fn client_bytes(self) -> Vec<u8> {
        match self {
            Mode::Simple => msg(b'Q', SIMPLE_SQL),
            Mode::Extended => {
                let mut p = vec![0u8];
                p.extend_from_slice(&parse_def());
                cat(&[msg(b'P', &p), bind(b""), describe_portal(), execute(), sync()])
            }
            Mode::Prepared => cat(&[bind(STMT_NAME), describe_portal(), execute(), sync()]),
        }
    }

    /// What PostgreSQL answers.
    fn server_bytes(self) -> Vec<u8> {
        match self {
            Mode::Simple => select_result(),
            Mode::Extended => cat(&[msg(b'1', b""), msg(b'2', b""), select_result()]),
            Mode::Prepared => cat(&[msg(b'2', b""), select_result()]),
        }
    }

    /// The expected-response entries upstream::process pushes for this transaction.
    fn expects(self, queue: &mut ExpectQueue) {
        let kinds: &[Kind] = match self {
            Mode::Simple => &[Kind::Query],
            // The unnamed Parse is pushed as UnnamedParse (below).
            Mode::Extended => &[Kind::Bind, Kind::DescribePortal, Kind::Execute, Kind::Sync],
            Mode::Prepared => &[Kind::Bind, Kind::DescribePortal, Kind::Execute, Kind::Sync],
        };
        if let Mode::Extended = self {
            queue.push(Expect::UnnamedParse { prev: None });
        }
        for &k in kinds {
            queue.push(Expect::Forward(k));
        }
    }
}

// ---------------------------------------------------------------------------------------
// A session's state, as the forwarding loop keeps it.

struct Session {
    cur: UpCursor,
    tracker: TxTracker,
    queue: ExpectQueue,
    stmts: ClientStatements,
    unnamed: UnnamedStmt,
    server: ServerMeta,
    down_skip: usize,
    settings: std::sync::Arc<Settings>,
    initial: Settings,
    synth: Vec<u8>,
    pinned: bool,
    resetting: Resetting,
    hold: Hold,
    retry: StaleRetry,
    settings_changed: bool,
    captured: Vec<(String, String)>,
    up_out: Vec<u8>,
    down_out: Vec<u8>,
}

impl Session {
    /// A client that has already prepared pgbench's statement on this server, as after
    /// its first transaction.
    fn new() -> Session {
        let mut s = Session {
            cur: UpCursor::default(),
            tracker: TxTracker::default(),
            queue: ExpectQueue::default(),
            stmts: ClientStatements::default(),
            unnamed: UnnamedStmt::default(),
            server: ServerMeta::new(pgsilo::net::Endpoint::Tcp("127.0.0.1:5432".parse().unwrap()), 40000),
            down_skip: 0,
            settings: std::sync::Arc::new(Settings::default()),
            initial: Settings::default(),
            synth: Vec::with_capacity(256),
            pinned: false,
            resetting: Resetting::No,
            hold: Hold::No,
            retry: StaleRetry::default(),
            settings_changed: false,
            captured: Vec::new(),
            up_out: Vec::with_capacity(4096),
            down_out: Vec::with_capacity(4096),
        };
        let def = Rc::new(StmtDef::new(&parse_def()));
        s.server.prepared.insert(def.hash, pgsilo::pool::prepared::stamp(), 200);
        s.stmts.insert(STMT_NAME, def);
        s
    }

    fn up(&mut self, data: &[u8]) -> upstream::UpResult {
        self.up_out.clear();
        let mut st = UpState {
            cur: &mut self.cur,
            tracker: &mut self.tracker,
            queue: &mut self.queue,
            statements: Some(&mut self.stmts),
            unnamed: &mut self.unnamed,
            server: &mut self.server,
            max_prepared: 200,
            retry: &mut self.retry,
            listen_here: true,
        };
        upstream::process(data, &mut st, &mut self.up_out).expect("upstream::process")
    }

    fn down(&mut self, data: &[u8]) -> downstream::DownResult {
        self.down_out.clear();
        let mut st = DownState {
            skip: &mut self.down_skip,
            tracker: &mut self.tracker,
            queue: &mut self.queue,
            statements: &mut self.stmts,
            server: &mut self.server,
            client_settings: &mut self.settings,
            initial: &self.initial,
            synth: &mut self.synth,
            pinned: &mut self.pinned,
            resetting: &mut self.resetting,
            settings_changed: &mut self.settings_changed,
            captured: &mut self.captured,
            may_hold: false,
            hold: &mut self.hold,
            retry: &mut self.retry,
        };
        downstream::process(data, &mut st, &mut self.down_out).expect("downstream::process")
    }
}

/// Runs one transaction through both directions and checks that pgsilo does what it does
/// in production: the server ends idle (so transaction pooling can release it) and the
/// client gets exactly the server's bytes.
fn check_roundtrip(mode: Mode) {
    let (cb, sb) = (mode.client_bytes(), mode.server_bytes());
    let mut s = Session::new();
    for _ in 0..3 {
        let u = s.up(&cb);
        assert_eq!(u.consumed, cb.len(), "{mode:?}");
        match mode {
            // A named statement's Bind is rewritten (pgsilo's server-side name).
            Mode::Prepared => {
                assert!(!u.zero_copy);
                assert!(s.up_out.windows(7).any(|w| w == b"pgsilo_"));
            }
            _ => assert!(u.zero_copy, "{mode:?} should forward the client's bytes as they are"),
        }
        assert!(!s.tracker.is_idle());
        let d = s.down(&sb);
        assert_eq!(d.consumed, sb.len());
        assert!(d.zero_copy, "{mode:?}: the response should pass untouched");
        assert_eq!((d.ready_for_query, d.xact_ends), (1, 1));
        assert!(s.tracker.is_idle(), "{mode:?}: server not released");
        assert!(s.queue.is_empty(), "{mode:?}: responses still expected");
    }
}

// ---------------------------------------------------------------------------------------

fn framing(c: &mut Criterion) {
    // About one pkt_buf (4 KiB) of mixed traffic, both directions' messages interleaved
    // as in a pipelined stream: client requests, short responses, a few larger rows.
    let mut buf = Vec::new();
    let mut n = 0usize;
    while buf.len() < 4096 {
        for mode in Mode::ALL {
            buf.extend(mode.client_bytes());
            buf.extend(mode.server_bytes());
        }
        buf.extend(msg(b'D', &[7u8; 300]));
        buf.extend(msg(b'N', &[b'x'; 90]));
    }
    let mut at = 0;
    while let Scan::Whole(h) = scan(&buf[at..]) {
        at += h.total();
        n += 1;
    }
    assert_eq!(at, buf.len());

    let mut g = c.benchmark_group("framing");
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.bench_function(format!("scan_mixed_{}B_{}msgs", buf.len(), n), |b| {
        b.iter(|| {
            let data = black_box(&buf[..]);
            let mut at = 0;
            let mut count = 0u32;
            while let Scan::Whole(h) = scan(&data[at..]) {
                at += h.total();
                count += 1;
            }
            black_box((at, count))
        })
    });
    g.finish();
}

fn tx_tracker(c: &mut Criterion) {
    let mut g = c.benchmark_group("tx_tracker");
    g.throughput(Throughput::Elements(1));
    let cases: [(&str, &[u8], &[u8]); 3] = [
        ("simple", b"Q", b"TDCZ"),
        ("extended", b"PBDES", b"12TDCZ"),
        ("prepared", b"BDES", b"2TDCZ"),
    ];
    for (name, client, server) in cases {
        g.bench_function(format!("pgbench_select_{name}"), |b| {
            let mut t = TxTracker::default();
            b.iter(|| {
                for &tag in black_box(client) {
                    t.client_message(tag);
                }
                for &tag in black_box(server) {
                    t.server_message(tag, (tag == b'Z').then_some(b'I'));
                }
                assert!(t.is_idle());
            })
        });
    }
    g.finish();
}

fn proxy(c: &mut Criterion) {
    for mode in Mode::ALL {
        check_roundtrip(mode);
    }

    let mut g = c.benchmark_group("upstream");
    g.throughput(Throughput::Elements(1));
    for mode in Mode::ALL {
        let cb = mode.client_bytes();
        g.bench_function(format!("pgbench_select_{}", mode.name()), |b| {
            let mut s = Session::new();
            b.iter(|| {
                let r = s.up(black_box(&cb));
                // What the response would undo; cheap next to process().
                s.queue.clear();
                s.tracker.reset();
                black_box(r)
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("downstream");
    g.throughput(Throughput::Elements(1));
    for mode in Mode::ALL {
        let sb = mode.server_bytes();
        let cb_tags: Vec<u8> = {
            let cb = mode.client_bytes();
            let mut at = 0;
            let mut t = vec![];
            while let Scan::Whole(h) = scan(&cb[at..]) {
                t.push(h.tag);
                at += h.total();
            }
            t
        };
        g.bench_function(format!("pgbench_select_{}", mode.name()), |b| {
            let mut s = Session::new();
            b.iter(|| {
                // The state upstream::process left (a few pushes, cheap next to process()).
                mode.expects(&mut s.queue);
                for &t in &cb_tags {
                    s.tracker.client_message(t);
                }
                let r = s.down(black_box(&sb));
                debug_assert!(s.tracker.is_idle());
                black_box(r)
            })
        });
    }
    g.finish();

    // The whole per-transaction user-space cost: request up, response down.
    let mut g = c.benchmark_group("roundtrip");
    g.throughput(Throughput::Elements(1));
    for mode in Mode::ALL {
        let (cb, sb) = (mode.client_bytes(), mode.server_bytes());
        g.bench_function(format!("pgbench_select_{}", mode.name()), |b| {
            let mut s = Session::new();
            b.iter(|| {
                let u = s.up(black_box(&cb));
                let d = s.down(black_box(&sb));
                black_box((u, d))
            })
        });
    }
    g.finish();
}

fn scram(c: &mut Criterion) {
    const MOCK_KEY: [u8; 32] = [7u8; 32];
    let salt = *b"pgsilo-bench-slt";
    let verifier: ScramSecret = scram_secret_from_password("bench_pass", &salt, 4096);
    let client_nonce = "rOprNGfwEbeRWgbNEkqOdzq8".to_string();
    let server_nonce = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".to_string();

    // One full exchange, recorded: what a client sends and the pooler answers.
    let mut client = ScramClient::with_nonce(ScramClientKeys::Password("bench_pass".into()), client_nonce.clone());
    let client_first = client.client_first();
    let mut server = ScramServer::with_nonce(Some(verifier.clone()), "bench", &MOCK_KEY, server_nonce.clone());
    let server_first = server.handle_client_first(&client_first).unwrap();
    let client_final = client.handle_server_first(&server_first).unwrap();
    let success = server.handle_client_final(&client_final).unwrap();
    client.verify_server_final(&success.server_final).unwrap();
    let client_key = success.client_key;

    let mut g = c.benchmark_group("scram");
    g.throughput(Throughput::Elements(1));
    // A client login to pgsilo: the pooler's whole server side of the exchange.
    g.bench_function("server_verify_client_login", |b| {
        b.iter(|| {
            let mut s = ScramServer::with_nonce(
                Some(black_box(&verifier).clone()),
                "bench",
                &MOCK_KEY,
                server_nonce.clone(),
            );
            let first = s.handle_client_first(black_box(&client_first)).unwrap();
            let ok = s.handle_client_final(black_box(&client_final)).unwrap();
            black_box((first, ok))
        })
    });
    // A wrong proof: the same work up to the (constant-time) proof check; only the
    // ServerSignature is skipped.
    g.bench_function("server_reject_wrong_proof", |b| {
        let mut bad = client_final.clone();
        let n = bad.len();
        bad[n - 3] = if bad[n - 3] == b'A' { b'B' } else { b'A' };
        b.iter(|| {
            let mut s = ScramServer::with_nonce(
                Some(black_box(&verifier).clone()),
                "bench",
                &MOCK_KEY,
                server_nonce.clone(),
            );
            s.handle_client_first(black_box(&client_first)).unwrap();
            black_box(s.handle_client_final(black_box(&bad)).is_err())
        })
    });
    // pgsilo logging in to PostgreSQL with the client's recovered key (passthrough).
    g.bench_function("client_passthrough_server_login", |b| {
        let keys = ScramClientKeys::Passthrough {
            client_key,
            server_key: verifier.server_key,
            salt: verifier.salt.clone(),
            iterations: verifier.iterations,
        };
        b.iter_batched(
            || ScramClient::with_nonce(keys.clone(), client_nonce.clone()),
            |mut cl| {
                let first = cl.client_first();
                let fin = cl.handle_server_first(black_box(&server_first)).unwrap();
                cl.verify_server_final(black_box(&success.server_final)).unwrap();
                black_box((first, fin))
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();

    // For scale: the client's PBKDF2 (libpq does this on every pgbench -C connection).
    let mut g = c.benchmark_group("scram_reference");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(3));
    g.bench_function("client_password_4096_iterations", |b| {
        b.iter(|| {
            let mut cl = ScramClient::with_nonce(ScramClientKeys::Password("bench_pass".into()), client_nonce.clone());
            black_box(cl.handle_server_first(black_box(&server_first)).unwrap())
        })
    });
    g.finish();
}

fn config() -> Criterion {
    // Short by default: the whole suite in about a minute on 2 cores. Criterion's own
    // flags (--measurement-time, --sample-size, --save-baseline) override this.
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = framing, tx_tracker, proxy, scram
}
criterion_main!(benches);
