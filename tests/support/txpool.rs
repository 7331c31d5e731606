//! Helpers of the transaction-pooling client matrix (`tests/txpool_*.rs`): a pgsilo
//! process in front of a [`PgCluster`], a minimal raw protocol client for what drivers
//! cannot send (duplicate Parse names, several Syncs in one write), and the Python
//! interpreter of `target/venv` for the psycopg scripts in `tests/py/`.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, PgCluster};

/// Users pgsilo knows (plain secrets in its auth_file), all valid on every test cluster.
pub const USERS: &[(&str, &str)] = &[
    ("scram_user", "scram_pass"),
    ("md5_user", "md5_pass"),
    ("user_a", "pass_a"),
];

/// Databases pgsilo offers, each mapped to the cluster's database of the same name.
pub const DATABASES: &[&str] = &["app_db", "tenant_a_db", "postgres"];

/// A pgsilo process in front of a cluster, logging to a file; killed on drop.
pub struct Pgsilo {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    log: PathBuf,
}

impl Pgsilo {
    /// pgsilo in transaction mode, SCRAM for clients, with `settings` (`key`, TOML value)
    /// added to (or overriding) the `[pgsilo]` defaults used here.
    pub fn start(cluster: &PgCluster, settings: &[(&str, &str)]) -> Pgsilo {
        let defaults: &[(&str, &str)] = &[
            ("auth_type", "\"scram-sha-256\""),
            ("pool_mode", "\"transaction\""),
            ("default_pool_size", "1"),
            ("max_client_conn", "200"),
            ("query_wait_timeout", "60"),
            ("server_connect_timeout", "5"),
            ("server_login_retry", "1"),
            ("server_check_delay", "0"),
            ("shutdown_timeout", "1"),
        ];
        let dir = tempfile::Builder::new()
            .prefix("pgsilo-txpool-")
            .tempdir()
            .expect("tempdir");
        let mut userlist = String::new();
        for (user, pass) in USERS {
            userlist.push_str(&format!("\"{user}\" \"{pass}\"\n"));
        }
        fs::write(dir.path().join("userlist.txt"), userlist).unwrap();
        let log = dir.path().join("pgsilo.log");
        let mut last_log = String::new();
        for _attempt in 0..10 {
            let port = free_port();
            let mut toml = String::from("[pgsilo]\nname = \"txpool\"\n");
            toml.push_str("listen_addr = \"127.0.0.1\"\n");
            toml.push_str(&format!("listen_port = {port}\n"));
            toml.push_str("auth_file = \"userlist.txt\"\n");
            for (k, v) in defaults {
                if !settings.iter().any(|(sk, _)| sk == k) {
                    toml.push_str(&format!("{k} = {v}\n"));
                }
            }
            for (k, v) in settings {
                toml.push_str(&format!("{k} = {v}\n"));
            }
            for db in DATABASES {
                toml.push_str(&format!(
                    "\n[databases.{db}]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"{db}\"\n",
                    cluster.port()
                ));
            }
            let config = dir.path().join("pgsilo.toml");
            fs::write(&config, &toml).unwrap();
            let log_file = fs::File::create(&log).unwrap();
            let mut child = Command::new(env!("CARGO_BIN_EXE_pgsilo"))
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().unwrap())
                .stderr(log_file)
                .spawn()
                .expect("spawn pgsilo");
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last_log = fs::read_to_string(&log).unwrap_or_default();
                    if last_log.contains("in use") {
                        break; // someone took the port: try another
                    }
                    panic!("pgsilo exited at start ({status}):\n{last_log}\nconfig:\n{toml}");
                }
                if TcpStream::connect_timeout(
                    &(std::net::Ipv4Addr::LOCALHOST, port).into(),
                    Duration::from_millis(200),
                )
                .is_ok()
                {
                    return Pgsilo { child, port, dir, log };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!(
                        "pgsilo did not listen on {port} within 60 s:\n{}",
                        fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("pgsilo could not bind a port:\n{last_log}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// libpq key=value connection string through pgsilo.
    pub fn conninfo(&self, user: &str, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} password={} dbname={db} connect_timeout=30",
            self.port,
            password(user)
        )
    }

    /// A tokio-postgres config through pgsilo.
    pub fn pg_config(&self, user: &str, db: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(self.port)
            .user(user)
            .password(password(user))
            .dbname(db)
            .connect_timeout(Duration::from_secs(30));
        c
    }

    /// Connects with tokio-postgres (the connection task is spawned on the current runtime).
    pub async fn connect(&self, user: &str, db: &str) -> tokio_postgres::Client {
        connect_with(self.pg_config(user, db)).await
    }

    /// pgsilo's output so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Peak resident memory (VmHWM) of the process, in bytes.
    pub fn peak_rss(&self) -> u64 {
        status_kb(self.pid(), "VmHWM:") * 1024
    }

    /// Current resident memory (VmRSS), in bytes.
    pub fn rss(&self) -> u64 {
        status_kb(self.pid(), "VmRSS:") * 1024
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Panics with the log if the process died.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("pgsilo died ({status}):\n{}", self.log());
        }
    }
}

impl Drop for Pgsilo {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: signalling our own child, which has not been reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!(
                "pgsilo (port {}) log, last lines:\n{}",
                self.port,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

fn status_kb(pid: u32, key: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{key} not in /proc/{pid}/status"))
}

pub fn password(user: &str) -> &'static str {
    USERS
        .iter()
        .find(|(u, _)| *u == user)
        .map(|(_, p)| *p)
        .unwrap_or_else(|| panic!("no password for {user}"))
}

pub async fn connect_with(config: tokio_postgres::Config) -> tokio_postgres::Client {
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect: {e:?}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A current-thread tokio runtime.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `fut` with a time limit: a hang fails the test instead of stalling the suite.
pub async fn within<T>(secs: u64, what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within {secs} s"),
    }
}

/// The SQLSTATE of a tokio-postgres error, or "none".
pub fn code(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("none ({e:?})"))
}

// ---------------------------------------------------------------------------------------
// Python
// ---------------------------------------------------------------------------------------

/// The interpreter with psycopg 3: `$PGSILO_PYTHON`, else `<workspace>/target/venv/bin/python`.
/// Panics (the test fails, it is not skipped) with the command that creates the venv.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("PGSILO_PYTHON").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/venv/bin/python");
    let ok = venv.exists()
        && Command::new(&venv)
            .args(["-c", "import psycopg"])
            .output()
            .is_ok_and(|o| o.status.success());
    if !ok {
        panic!(
            "psycopg 3 is needed for this test and {} has none. Create the venv with \
             `make target/venv/.ok` (that is: python3 -m venv target/venv && \
             target/venv/bin/pip install 'psycopg[binary]>=3.1'), or point PGSILO_PYTHON \
             at an interpreter that has psycopg 3.",
            venv.display()
        );
    }
    venv
}

/// Runs `tests/py/<script>` with `args`; returns its stdout, panicking with both outputs
/// unless it exits 0 within `timeout_secs`.
pub fn run_py(script: &str, args: &[&str], timeout_secs: u64) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py").join(script);
    let mut child = Command::new(python())
        .arg(&path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(timeout_secs);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = out_t.join().unwrap();
    let err = err_t.join().unwrap();
    match status {
        Some(s) if s.success() => {
            print!("{out}");
            out
        }
        Some(s) => panic!("{script} failed ({s}):\n--- stdout\n{out}\n--- stderr\n{err}"),
        None => panic!("{script} hung (killed after {timeout_secs} s):\n--- stdout\n{out}\n--- stderr\n{err}"),
    }
}

// ---------------------------------------------------------------------------------------
// A raw protocol client
// ---------------------------------------------------------------------------------------

/// One backend message: type byte and body.
#[derive(Clone, Debug)]
pub struct Msg {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl Msg {
    /// An ErrorResponse/NoticeResponse field (e.g. b'C' for the SQLSTATE).
    pub fn field(&self, code: u8) -> Option<String> {
        let mut at = 0;
        while at < self.body.len() && self.body[at] != 0 {
            let c = self.body[at];
            let end = at + 1 + self.body[at + 1..].iter().position(|&b| b == 0)?;
            if c == code {
                return Some(String::from_utf8_lossy(&self.body[at + 1..end]).into_owned());
            }
            at = end + 1;
        }
        None
    }

    /// Every column of a DataRow, as text ("NULL" for null).
    pub fn values(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.tag != b'D' || self.body.len() < 2 {
            return out;
        }
        let n = u16::from_be_bytes([self.body[0], self.body[1]]);
        let mut at = 2;
        for _ in 0..n {
            let len = i32::from_be_bytes(self.body[at..at + 4].try_into().unwrap());
            at += 4;
            if len < 0 {
                out.push("NULL".into());
            } else {
                out.push(String::from_utf8_lossy(&self.body[at..at + len as usize]).into_owned());
                at += len as usize;
            }
        }
        out
    }

    /// The first column of a DataRow, as text.
    pub fn first_value(&self) -> Option<String> {
        if self.tag != b'D' {
            return None;
        }
        let len = i32::from_be_bytes(self.body[2..6].try_into().ok()?);
        if len < 0 {
            return None;
        }
        Some(String::from_utf8_lossy(&self.body[6..6 + len as usize]).into_owned())
    }

    /// CommandComplete tag text.
    pub fn tag_text(&self) -> String {
        String::from_utf8_lossy(self.body.strip_suffix(&[0]).unwrap_or(&self.body)).into_owned()
    }
}

/// Frontend message builders (text format everywhere).
pub mod fe {
    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn cstr(b: &mut Vec<u8>, s: &str) {
        b.extend_from_slice(s.as_bytes());
        b.push(0);
    }

    pub fn query(sql: &str) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, sql);
        msg(b'Q', &b)
    }

    pub fn parse(name: &str, sql: &str) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, name);
        cstr(&mut b, sql);
        b.extend_from_slice(&0u16.to_be_bytes());
        msg(b'P', &b)
    }

    /// Bind with text parameters and text results.
    pub fn bind(portal: &str, stmt: &str, params: &[&str]) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, portal);
        cstr(&mut b, stmt);
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&(params.len() as u16).to_be_bytes());
        for p in params {
            b.extend_from_slice(&(p.len() as i32).to_be_bytes());
            b.extend_from_slice(p.as_bytes());
        }
        b.extend_from_slice(&0u16.to_be_bytes());
        msg(b'B', &b)
    }

    pub fn describe_statement(name: &str) -> Vec<u8> {
        let mut b = vec![b'S'];
        cstr(&mut b, name);
        msg(b'D', &b)
    }

    pub fn execute(portal: &str) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, portal);
        b.extend_from_slice(&0i32.to_be_bytes());
        msg(b'E', &b)
    }

    pub fn close_statement(name: &str) -> Vec<u8> {
        let mut b = vec![b'S'];
        cstr(&mut b, name);
        msg(b'C', &b)
    }

    pub fn copy_data(data: &[u8]) -> Vec<u8> {
        msg(b'd', data)
    }

    pub fn copy_done() -> Vec<u8> {
        msg(b'c', &[])
    }

    pub fn sync() -> Vec<u8> {
        msg(b'S', &[])
    }

    pub fn flush() -> Vec<u8> {
        msg(b'H', &[])
    }

    pub fn terminate() -> Vec<u8> {
        msg(b'X', &[])
    }

    /// Bind + Execute of the unnamed portal of `stmt`.
    pub fn bind_exec(stmt: &str, params: &[&str]) -> Vec<u8> {
        let mut v = bind("", stmt, params);
        v.extend(execute(""));
        v
    }
}

/// A blocking protocol-3 client speaking to pgsilo (SCRAM or cleartext or trust).
pub struct Wire {
    s: TcpStream,
    buf: Vec<u8>,
    /// Every ParameterStatus received, latest value per name: what libpq's
    /// PQparameterStatus would answer.
    pub reported: std::collections::BTreeMap<String, String>,
    /// BackendKeyData: (process id, secret key).
    pub key: Option<(u32, u32)>,
}

impl Wire {
    pub fn connect(port: u16, user: &str, db: &str) -> Wire {
        Self::connect_with(port, user, db, &[])
    }

    pub fn connect_with(port: u16, user: &str, db: &str, params: &[(&str, &str)]) -> Wire {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to pgsilo");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.set_nodelay(true).unwrap();
        let mut w = Wire {
            s,
            buf: Vec::new(),
            reported: Default::default(),
            key: None,
        };
        let mut body = 196_608u32.to_be_bytes().to_vec();
        for (k, v) in [("user", user), ("database", db)].iter().chain(params.iter()) {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut m = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        m.extend(body);
        w.send(&m);
        let pass = password(user);
        let mut scram: Option<postgres_protocol::authentication::sasl::ScramSha256> = None;
        loop {
            let m = w.recv();
            match m.tag {
                b'R' => {
                    let kind = u32::from_be_bytes(m.body[..4].try_into().unwrap());
                    match kind {
                        0 => {}
                        3 => {
                            let mut b = pass.as_bytes().to_vec();
                            b.push(0);
                            w.send(&raw(b'p', &b));
                        }
                        10 => {
                            let sc = postgres_protocol::authentication::sasl::ScramSha256::new(
                                pass.as_bytes(),
                                postgres_protocol::authentication::sasl::ChannelBinding::unsupported(),
                            );
                            let first = sc.message().to_vec();
                            let mut b = b"SCRAM-SHA-256\0".to_vec();
                            b.extend_from_slice(&(first.len() as i32).to_be_bytes());
                            b.extend(first);
                            w.send(&raw(b'p', &b));
                            scram = Some(sc);
                        }
                        11 => {
                            let sc = scram.as_mut().expect("SASL continue before SASL");
                            sc.update(&m.body[4..]).expect("scram update");
                            let msg = sc.message().to_vec();
                            w.send(&raw(b'p', &msg));
                        }
                        12 => {
                            scram
                                .take()
                                .expect("SASL final before SASL")
                                .finish(&m.body[4..])
                                .expect("scram final");
                        }
                        other => panic!("unsupported authentication request {other}"),
                    }
                }
                b'E' => panic!("login refused: {:?}", m.field(b'M')),
                b'Z' => return w,
                _ => {}
            }
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("write to pgsilo");
    }

    /// Sends the concatenation of `parts` in one write.
    pub fn send_all(&mut self, parts: &[Vec<u8>]) {
        let all: Vec<u8> = parts.concat();
        self.send(&all);
    }

    pub fn recv(&mut self) -> Msg {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
                if self.buf.len() > len {
                    let body = self.buf[5..1 + len].to_vec();
                    let tag = self.buf[0];
                    self.buf.drain(..1 + len);
                    if tag == b'K' && body.len() == 8 {
                        let word = |i: usize| u32::from_be_bytes(body[i..i + 4].try_into().unwrap());
                        self.key = Some((word(0), word(4)));
                    }
                    if tag == b'S' {
                        let mut parts = body.split(|&b| b == 0).map(|p| String::from_utf8_lossy(p).into_owned());
                        if let (Some(k), Some(v)) = (parts.next(), parts.next()) {
                            self.reported.insert(k, v);
                        }
                    }
                    return Msg { tag, body };
                }
            }
            let mut chunk = [0u8; 16384];
            let n = self.s.read(&mut chunk).expect("read from pgsilo");
            if n == 0 {
                panic!(
                    "pgsilo closed the connection (buffered: {:?})",
                    String::from_utf8_lossy(&self.buf)
                );
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Messages up to and including the next ReadyForQuery, skipping notices and
    /// parameter statuses.
    pub fn until_ready(&mut self) -> Vec<Msg> {
        let mut v = Vec::new();
        loop {
            let m = self.recv();
            if matches!(m.tag, b'N' | b'S') {
                continue;
            }
            let z = m.tag == b'Z';
            v.push(m);
            if z {
                return v;
            }
        }
    }

    /// A simple query's first value (panics on error).
    pub fn value(&mut self, sql: &str) -> String {
        self.send(&fe::query(sql));
        let msgs = self.until_ready();
        if let Some(e) = msgs.iter().find(|m| m.tag == b'E') {
            panic!("{sql}: {:?}", e.field(b'M'));
        }
        msgs.iter()
            .find_map(|m| m.first_value())
            .unwrap_or_else(|| panic!("{sql}: no row"))
    }

    pub fn close(mut self) {
        let _ = self.s.write_all(&fe::terminate());
    }

    /// Sends a CancelRequest with this connection's BackendKeyData to `port`, as libpq's
    /// PQcancel does: on a connection of its own, which the other side closes.
    pub fn cancel_via(&self, port: u16) {
        let (pid, secret) = self.key.expect("no BackendKeyData");
        let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect for cancel");
        let mut m = 16u32.to_be_bytes().to_vec();
        m.extend_from_slice(&80877102u32.to_be_bytes());
        m.extend_from_slice(&pid.to_be_bytes());
        m.extend_from_slice(&secret.to_be_bytes());
        c.write_all(&m).expect("send CancelRequest");
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
    }
}

fn raw(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// Type bytes of messages, as a string, for asserting message sequences ("12DCZ").
pub fn tags(msgs: &[Msg]) -> String {
    msgs.iter().map(|m| m.tag as char).collect()
}

/// Runs `transcript` (given a port, what a client sees, a line per step) on a direct
/// connection and through pgsilo in `mode` (a pool of one in transaction mode, two in
/// session mode, where each client keeps its server), after `prepare` on the cluster;
/// panics where the two differ.
pub fn compare_with_direct(mode: &str, prepare: fn(&PgCluster), transcript: fn(u16) -> Vec<String>) {
    let cluster = PgCluster::start();
    prepare(&cluster);
    let direct = transcript(cluster.port());
    let pool = if mode == "session" { "2" } else { "1" };
    let mut silo = Pgsilo::start(
        &cluster,
        &[("pool_mode", &format!("\"{mode}\"")), ("default_pool_size", pool)],
    );
    let pooled = transcript(silo.port());
    let mut differ = direct.len() != pooled.len();
    for (d, p) in direct.iter().zip(&pooled) {
        println!("direct: {d}");
        if d != p {
            println!("pgsilo: {p}   <-- differs");
            differ = true;
        }
    }
    assert!(!differ, "{mode} mode: differs from a direct connection:\n{pooled:#?}");
    silo.assert_alive();
}
