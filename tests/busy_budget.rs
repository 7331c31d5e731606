//! max_busy_cores: a pool's servers get at most that much time attached to clients per
//! second; its clients wait (in order, none refused) while the last second is over it,
//! and another pool of the same instance is unaffected.
//!
//! Counts are bounded generously (the machine is small and shared): the point is the
//! order of magnitude, ~2-4 transactions a second under the budget against ~20 without.

mod support;

use std::time::{Duration, Instant};

use support::{runtime, simple_rows, Db, PgCluster, Pgsilo};
use tokio_postgres::NoTls;

const RUN: Duration = Duration::from_secs(3);
const CLIENTS: usize = 4;

/// Runs `SELECT pg_sleep(0.2)` on `CLIENTS` connections to `db` until `RUN` has passed;
/// the transactions each completed.
async fn sleepers(silo: &Pgsilo, db: &str) -> Vec<usize> {
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let client = silo.connect("user_a", "pass_a", db).await.expect("connect");
        tasks.push(tokio::spawn(async move {
            let end = Instant::now() + RUN;
            let mut done = 0;
            while Instant::now() < end {
                client
                    .batch_execute("SELECT pg_sleep(0.2)")
                    .await
                    .expect("nobody is refused");
                done += 1;
            }
            done
        }));
    }
    let mut counts = Vec::new();
    for t in tasks {
        counts.push(t.await.expect("client task"));
    }
    counts
}

#[test]
fn max_busy_cores_bounds_a_pools_transactions_and_spares_other_pools() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::builder()
        .user("user_a", "pass_a")
        .user("admin", "admin_pass")
        .set("admin_users", "[\"admin\"]")
        .db(Db::on(&cluster, "tenant_a_db")
            .pool_size(CLIENTS)
            .set("max_busy_cores", "0.5"))
        .db(Db::on(&cluster, "app_db").pool_size(CLIENTS))
        .start();

    runtime().block_on(async {
        let (pg, connection) = tokio_postgres::connect(&cluster.superuser_conn_string("postgres"), NoTls)
            .await
            .expect("superuser connection");
        tokio::spawn(connection);
        // The budgeted pool's servers, as PostgreSQL counts them, sampled throughout.
        let watch = tokio::spawn(async move {
            let end = Instant::now() + RUN + Duration::from_secs(1);
            let mut most = 0i64;
            while Instant::now() < end {
                let n: i64 = pg
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = 'tenant_a_db' \
                         AND backend_type = 'client backend'",
                        &[],
                    )
                    .await
                    .expect("pg_stat_activity")
                    .get(0);
                most = most.max(n);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            most
        });

        let (budgeted, free) = tokio::join!(sleepers(&silo, "tenant_a_db"), sleepers(&silo, "app_db"));
        let (budgeted_total, free_total): (usize, usize) = (budgeted.iter().sum(), free.iter().sum());
        eprintln!("3 s of 0.2 s transactions: budgeted {budgeted:?}, unbudgeted {free:?}");

        // 0.5 s of busy time a second is 2.5 such transactions a second: ~8 in 3 s, plus
        // what a window with room admits at once. Without the budget: ~60.
        assert!(
            (3..=25).contains(&budgeted_total),
            "max_busy_cores = 0.5 allows ~2-4 transactions a second; completed {budgeted_total} in {RUN:?}"
        );
        assert!(
            budgeted.iter().all(|&n| n >= 1),
            "every waiting client gets its turn: {budgeted:?}"
        );
        // The other pool runs at its pool size's pace.
        assert!(
            free_total >= 30,
            "the pool without a budget is held back: {free_total} in {RUN:?}"
        );
        assert!(free_total >= 2 * budgeted_total, "{free_total} vs {budgeted_total}");
        let most = watch.await.expect("watcher");
        assert!(most <= CLIENTS as i64, "{most} servers for a pool of {CLIENTS}");

        let admin = silo
            .connect("admin", "admin_pass", "pgsilo")
            .await
            .expect("admin console");
        let (cols, rows) = simple_rows(&admin, "SHOW POOLS").await.expect("SHOW POOLS");
        assert_eq!(cols[12], "pool_mode", "PgBouncer's columns come first");
        assert_eq!(&cols[13..], ["max_busy_cores", "busy_cores"]);
        let budget = |db: &str| {
            rows.iter()
                .find(|r| r["database"].as_deref() == Some(db))
                .and_then(|r| r["max_busy_cores"].clone())
        };
        assert_eq!(budget("tenant_a_db").as_deref(), Some("0.5"));
        assert_eq!(budget("app_db").as_deref(), Some("0"));
    });
}
