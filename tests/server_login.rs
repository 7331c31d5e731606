//! pgsilo logging in to PostgreSQL: every method pg_hba asks for (trust, md5, SCRAM,
//! cleartext) with the auth_file secret forms that can answer it, forced server users,
//! and PostgreSQL's own refusal passed through to the client.

mod support;

use support::{db_error, must_fail, runtime, Db, PgCluster, Pgsilo};

/// Logs in through pgsilo and returns the server-side (current_user, current_database).
async fn whoami(p: &Pgsilo, user: &str, password: &str, db: &str) -> (String, String) {
    let client = p
        .connect(user, password, db)
        .await
        .unwrap_or_else(|e| panic!("{user} -> {db}: {e:?}"));
    let row = client
        .query_one("SELECT current_user::text, current_database()::text", &[])
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

fn stored_secret(cluster: &PgCluster, role: &str) -> String {
    cluster.psql(
        "postgres",
        &format!("SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'"),
    )
}

#[test]
fn plain_secrets_answer_trust_md5_scram_and_cleartext() {
    let cluster = PgCluster::start();
    let p = Pgsilo::builder()
        .auth_type("md5")
        .user("trust_user", "anything")
        .user("md5_user", "md5_pass")
        .user("scram_user", "scram_pass")
        .user("pwd_user", "pwd_pass")
        .database("app_db", &cluster)
        .start();
    runtime().block_on(async {
        for (user, password) in [
            ("trust_user", "anything"),
            ("md5_user", "md5_pass"),
            ("scram_user", "scram_pass"),
            ("pwd_user", "pwd_pass"),
        ] {
            assert_eq!(
                whoami(&p, user, password, "app_db").await,
                (user.to_string(), "app_db".to_string())
            );
            // A second client reuses or opens servers the same way.
            whoami(&p, user, password, "app_db").await;
        }
    });
}

#[test]
fn hashed_secrets_md5_and_scram_passthrough() {
    let cluster = PgCluster::start();
    let md5_secret = stored_secret(&cluster, "md5_user");
    assert!(md5_secret.starts_with("md5"), "{md5_secret}");
    let scram_secret = stored_secret(&cluster, "scram_user");
    assert!(scram_secret.starts_with("SCRAM-SHA-256$"), "{scram_secret}");
    // md5 for clients with an md5 secret; SCRAM for clients with a SCRAM secret.
    let p = Pgsilo::builder()
        .auth_type("md5")
        .pool_size(3)
        .user("md5_user", &md5_secret)
        .user("scram_user", &scram_secret)
        .database("app_db", &cluster)
        .start();
    runtime().block_on(async {
        assert_eq!(
            whoami(&p, "md5_user", "md5_pass", "app_db").await,
            ("md5_user".into(), "app_db".into())
        );
        // The client proved its SCRAM key to pgsilo, which uses it to log in to
        // PostgreSQL without knowing the password.
        assert_eq!(
            whoami(&p, "scram_user", "scram_pass", "app_db").await,
            ("scram_user".into(), "app_db".into())
        );
        // More servers for the same pool, opened with the same key, all in use at once.
        let mut clients = Vec::new();
        for _ in 0..3 {
            let c = p.connect("scram_user", "scram_pass", "app_db").await.unwrap();
            c.batch_execute("BEGIN; SELECT 1").await.unwrap();
            clients.push(c);
        }
        for c in &clients {
            c.batch_execute("COMMIT").await.unwrap();
        }
    });
    let backends = cluster.psql(
        "postgres",
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'scram_user'",
    );
    assert_eq!(backends, "3", "three server connections as scram_user");
}

#[test]
fn scram_passthrough_needs_a_scram_client_login() {
    let cluster = PgCluster::start();
    let scram_secret = stored_secret(&cluster, "scram_user");
    // Clients log in with cleartext: pgsilo never learns a SCRAM key.
    let p = Pgsilo::builder()
        .auth_type("plain")
        .user("scram_user", &scram_secret)
        .database("app_db", &cluster)
        .start();
    runtime().block_on(async {
        let err = must_fail(
            p.connect("scram_user", "scram_pass", "app_db").await,
            "no SCRAM key to log in to the server with",
        );
        let (code, message) = db_error(&err);
        assert_eq!(code, "08006", "{message}");
        assert!(message.contains("SCRAM"), "{message}");
    });
}

#[test]
fn forced_user_and_password_in_databases() {
    let cluster = PgCluster::start();
    let p = Pgsilo::builder()
        .auth_type("scram-sha-256")
        .user("app_client", "client_pw")
        // The forced user's secret when [databases] gives no password.
        .user("md5_user", "md5_pass")
        .db(Db::on(&cluster, "forced")
            .dbname("app_db")
            .user("scram_user")
            .password("scram_pass"))
        .db(Db::on(&cluster, "forced_from_file").dbname("app_db").user("md5_user"))
        .db(Db::on(&cluster, "forced_trust").dbname("tenant_a_db").user("postgres"))
        .start();
    runtime().block_on(async {
        assert_eq!(
            whoami(&p, "app_client", "client_pw", "forced").await,
            ("scram_user".into(), "app_db".into())
        );
        assert_eq!(
            whoami(&p, "app_client", "client_pw", "forced_from_file").await,
            ("md5_user".into(), "app_db".into())
        );
        assert_eq!(
            whoami(&p, "app_client", "client_pw", "forced_trust").await,
            ("postgres".into(), "tenant_a_db".into())
        );
    });
}

#[test]
fn postgres_refusing_the_login_reaches_the_client_as_is() {
    let cluster = PgCluster::start();
    // pgsilo accepts these passwords; PostgreSQL does not.
    let p = Pgsilo::builder()
        .auth_type("plain")
        .user("scram_user", "not_scram_pass")
        .user("md5_user", "not_md5_pass")
        .user("pwd_user", "not_pwd_pass")
        .user("user_b", "pass_b")
        .database("app_db", &cluster)
        .database("tenant_a_db", &cluster)
        .start();
    runtime().block_on(async {
        for (user, password) in [
            ("scram_user", "not_scram_pass"),
            ("md5_user", "not_md5_pass"),
            ("pwd_user", "not_pwd_pass"),
        ] {
            let err = must_fail(
                p.connect(user, password, "app_db").await,
                "PostgreSQL refuses the password",
            );
            assert_eq!(
                db_error(&err),
                (
                    "28P01".into(),
                    format!("password authentication failed for user \"{user}\"")
                ),
                "{user}"
            );
        }
        // A refusal other than a password: PostgreSQL's code and text, too.
        let err = must_fail(
            p.connect("user_b", "pass_b", "tenant_a_db").await,
            "user_b may not connect to tenant_a_db",
        );
        let (code, message) = db_error(&err);
        assert_eq!(code, "42501", "{message}");
        assert!(message.contains("tenant_a_db"), "{message}");
    });
    // pgsilo's own log says why.
    let log = p.log();
    assert!(log.contains("password authentication failed"), "{log}");
}
