//! Messages far larger than pgsilo's buffers stream through intact, in both directions,
//! without pgsilo ever holding one whole: its peak RSS stays well below their size.

mod support;

use md5::{Digest, Md5};
use support::{runtime, PgCluster, Pgsilo};
use tokio_postgres::SimpleQueryMessage;

const USER: &str = "md5_user";
const PASSWORD: &str = "md5_pass";
const MB: usize = 1024 * 1024;

fn hex_md5(data: &[u8]) -> String {
    Md5::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// Peak resident set size of a process, in bytes (VmHWM).
fn peak_rss(pid: i32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .map(|v| v.trim().parse().unwrap())
        .expect("VmHWM in /proc/PID/status");
    kb * 1024
}

/// Printable, not compressible-looking, reproducible text.
fn payload(len: usize) -> String {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'!' + (x % 94) as u8)
        })
        .collect()
}

#[test]
fn huge_rows_and_parameters_stream_through_in_bounded_memory() {
    let cluster = PgCluster::start();
    cluster.psql(
        "app_db",
        "CREATE TABLE big (id int, v text); GRANT ALL ON big TO PUBLIC;",
    );
    let p = Pgsilo::builder()
        .auth_type("md5")
        .pool_mode("transaction")
        .user(USER, PASSWORD)
        .database("app_db", &cluster)
        .start();
    runtime().block_on(async {
        let c = p.connect(USER, PASSWORD, "app_db").await.unwrap();
        c.simple_query("SELECT 1").await.unwrap();
        let baseline = peak_rss(p.pid());

        // A ~64 MB result row (extended protocol), with varied content.
        let row_sql = "SELECT string_agg(md5(i::text), '' ORDER BY i) \
                       FROM generate_series(1, 2097152) i";
        let expected: String = c
            .query_one(&format!("SELECT md5(({row_sql}))"), &[])
            .await
            .unwrap()
            .get(0);
        let row = c.query_one(row_sql, &[]).await.unwrap();
        let big: &str = row.get(0);
        assert_eq!(big.len(), 64 * MB);
        assert_eq!(hex_md5(big.as_bytes()), expected, "the 64 MB row arrived intact");
        drop(row);

        // The same through the simple protocol.
        let messages = c.simple_query("SELECT repeat('x', 64 * 1024 * 1024)").await.unwrap();
        let text = messages
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .expect("a row");
        assert_eq!(text.len(), 64 * MB);
        assert!(text.bytes().all(|b| b == b'x'));
        drop((messages, text));

        // A ~32 MB parameter (Bind), and a ~32 MB query text (Query), up to the server.
        let value = payload(32 * MB);
        c.execute("INSERT INTO big VALUES (1, $1)", &[&value]).await.unwrap();
        let literal = payload(32 * MB - 1000).replace('\'', "''");
        c.simple_query(&format!("INSERT INTO big VALUES (2, '{literal}')"))
            .await
            .unwrap();
        let rows = c
            .query("SELECT id, length(v)::int8, md5(v) FROM big ORDER BY id", &[])
            .await
            .unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].get::<_, i64>(1), value.len() as i64);
        assert_eq!(rows[0].get::<_, String>(2), hex_md5(value.as_bytes()));
        let unescaped = literal.replace("''", "'");
        assert_eq!(rows[1].get::<_, i64>(1), unescaped.len() as i64);
        assert_eq!(rows[1].get::<_, String>(2), hex_md5(unescaped.as_bytes()));

        // And the session is still in step afterwards.
        let n: i32 = c.query_one("SELECT 7", &[]).await.unwrap().get(0);
        assert_eq!(n, 7);

        let peak = peak_rss(p.pid());
        eprintln!(
            "pgsilo peak RSS: {:.1} MB before the large messages, {:.1} MB after",
            baseline as f64 / MB as f64,
            peak as f64 / MB as f64
        );
        // Measured: about 7 MB, unchanged by the large messages (debug build).
        assert!(
            peak < 32 * MB,
            "pgsilo's peak RSS reached {:.1} MB passing 64 MB rows: they were buffered whole",
            peak as f64 / MB as f64
        );
        assert!(
            peak - baseline < 16 * MB,
            "pgsilo grew by {:.1} MB passing the large messages",
            (peak - baseline) as f64 / MB as f64
        );
    });
}
