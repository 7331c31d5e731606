//! The seed scenario: two tenants, each with its own pgsilo process, port, users and
//! limits, in front of one PostgreSQL. Neither can reach the other's database, and one
//! tenant hitting its client limit does not affect the other.

mod support;

use std::time::{Duration, Instant};

use support::{db_error, must_fail, runtime, PgCluster, Pgsilo};

fn tenant(name: &str, user: &str, password: &str, db: &str, cluster: &PgCluster) -> Pgsilo {
    Pgsilo::builder()
        .name(name)
        .auth_type("scram-sha-256")
        .pool_mode("transaction")
        .pool_size(2)
        .max_client_conn(3)
        .user(user, password)
        .database(db, cluster)
        .start()
}

/// Connects, retrying while the refusal is `max_client_conn`: a client that was just
/// refused or closed is counted until its task on the pgsilo side has ended.
async fn connect_when_admitted(p: &Pgsilo, user: &str, password: &str, db: &str) -> tokio_postgres::Client {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match p.connect(user, password, db).await {
            Ok(c) => return c,
            Err(e) if e.as_db_error().is_some_and(|d| d.code().code() == "53300") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{user} -> {db} on port {}: {e:?}", p.port()),
        }
    }
}

#[test]
fn tenants_are_isolated_and_limited_separately() {
    let cluster = PgCluster::start();
    let a = tenant("tenant_a", "user_a", "pass_a", "tenant_a_db", &cluster);
    let b = tenant("tenant_b", "user_b", "pass_b", "tenant_b_db", &cluster);
    assert_ne!(a.port(), b.port());

    runtime().block_on(async {
        // A's user reaches A's database on A's port.
        let client = a.connect("user_a", "pass_a", "tenant_a_db").await.unwrap();
        let row = client
            .query_one("SELECT current_user::text, current_database()::text", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "user_a");
        assert_eq!(row.get::<_, String>(1), "tenant_a_db");
        drop(client);

        // A's port does not know B's database.
        let err = must_fail(
            a.connect("user_a", "pass_a", "tenant_b_db").await,
            "A's port must refuse tenant_b_db",
        );
        assert_eq!(db_error(&err), ("3D000".into(), "no such database: tenant_b_db".into()));

        // B's port does not know A's user, even with A's correct password; nor A's
        // database.
        let err = must_fail(
            b.connect("user_a", "pass_a", "tenant_b_db").await,
            "B's port must refuse user_a",
        );
        assert_eq!(
            db_error(&err),
            (
                "28P01".into(),
                "password authentication failed for user \"user_a\"".into()
            )
        );
        let err = must_fail(
            b.connect("user_a", "pass_a", "tenant_a_db").await,
            "B's port must refuse tenant_a_db",
        );
        assert_eq!(db_error(&err), ("3D000".into(), "no such database: tenant_a_db".into()));

        // A at max_client_conn (3 held connections) refuses the next client...
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(connect_when_admitted(&a, "user_a", "pass_a", "tenant_a_db").await);
        }
        for c in &held {
            c.simple_query("SELECT 1").await.unwrap();
        }
        let err = must_fail(
            a.connect("user_a", "pass_a", "tenant_a_db").await,
            "a 4th client must be refused at max_client_conn = 3",
        );
        assert_eq!(
            db_error(&err),
            ("53300".into(), "no more connections allowed (max_client_conn)".into())
        );

        // ...while B keeps serving its own clients, up to its own limit.
        let mut b_clients = Vec::new();
        for _ in 0..3 {
            b_clients.push(connect_when_admitted(&b, "user_b", "pass_b", "tenant_b_db").await);
        }
        for c in &b_clients {
            let row = c
                .query_one("SELECT current_user::text, current_database()::text", &[])
                .await
                .unwrap();
            assert_eq!(row.get::<_, String>(0), "user_b");
            assert_eq!(row.get::<_, String>(1), "tenant_b_db");
        }

        // A's held clients still work, and a freed place is given to the next client.
        for c in &held {
            c.simple_query("SELECT 1").await.unwrap();
        }
        drop(held.pop());
        let c = connect_when_admitted(&a, "user_a", "pass_a", "tenant_a_db").await;
        c.simple_query("SELECT 1").await.unwrap();
    });
    // Each tenant logs under its own name.
    assert!(a.log().contains(" tenant_a LOG "), "{}", a.log());
    assert!(b.log().contains(" tenant_b LOG "), "{}", b.log());
}
