//! auth_query: users the auth_file does not list log in with the secret PostgreSQL holds
//! for them, looked up as auth_user. Roles are created after pgsilo started, so nothing
//! but the lookup can know them. Refusals look like any wrong password (28P01, one
//! message for all), and servers of such users' pools log in as them.
//!
//! auth_user is `pgsilo_auth`, an unprivileged role that may only call a SECURITY DEFINER
//! function reading pg_authid, as PgBouncer's documentation recommends; one database
//! instead uses the superuser with the default auth_query on pg_authid itself.

mod support;

use std::time::Duration;

use support::{db_error, must_fail, runtime, Db, PgCluster, Pgsilo, PgsiloBuilder};

const AUTH_USER: &str = "pgsilo_auth";
const AUTH_PW: &str = "auth pass";
const LOOKUP: &str = "SELECT uname, phash FROM pgsilo.user_lookup($1)";

/// The auth role and its lookup function (in app_db, where the lookups run).
const SETUP_SQL: &str = r#"
CREATE ROLE pgsilo_auth LOGIN PASSWORD 'auth pass';
CREATE SCHEMA pgsilo;
CREATE FUNCTION pgsilo.user_lookup(i_username text, OUT uname text, OUT phash text)
RETURNS record AS $$
BEGIN
    SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END
    FROM pg_catalog.pg_authid
    WHERE rolname = i_username AND rolcanlogin
    INTO uname, phash;
    RETURN;
END;
$$ LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog;
REVOKE ALL ON FUNCTION pgsilo.user_lookup(text) FROM PUBLIC;
GRANT USAGE ON SCHEMA pgsilo TO pgsilo_auth;
GRANT EXECUTE ON FUNCTION pgsilo.user_lookup(text) TO pgsilo_auth;
"#;

/// A cluster where the md5 roles of these tests log in with md5 (the harness's catch-all
/// line asks SCRAM, which an md5-stored password cannot answer).
fn cluster() -> PgCluster {
    let cluster = PgCluster::builder()
        .hba_prepend("host all aq_md5 127.0.0.1/32 md5")
        .hba_prepend("host all aq_md5_b 127.0.0.1/32 md5")
        .start();
    cluster.psql("app_db", SETUP_SQL);
    cluster
}

/// pgsilo with auth_user set for every database, its secret in the auth_file, and one
/// user (trust_user, trusted by PostgreSQL) listed in the auth_file with a password
/// PostgreSQL has never heard of.
fn builder(cluster: &PgCluster, auth_type: &str) -> PgsiloBuilder {
    Pgsilo::builder()
        .auth_type(auth_type)
        .set_str("auth_user", AUTH_USER)
        .set_str("auth_query", LOOKUP)
        .user(AUTH_USER, AUTH_PW)
        .user("trust_user", "listed pw")
        .db(Db::on(cluster, "app_db"))
}

fn create_role(cluster: &PgCluster, encryption: &str, role: &str, password: &str, extra: &str) {
    cluster.psql(
        "app_db",
        &format!("SET password_encryption = '{encryption}';\nCREATE ROLE {role} LOGIN PASSWORD '{password}' {extra};"),
    );
}

/// Logs in through pgsilo and proves the server session is the user's own.
async fn login_ok(p: &Pgsilo, user: &str, password: &str, db: &str) {
    let client = p
        .connect(user, password, db)
        .await
        .unwrap_or_else(|e| panic!("{user} on {db}: {e:?}\n{}", p.log()));
    let row = client
        .query_one("SELECT current_user::text, session_user::text", &[])
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1)),
        (user.to_string(), user.to_string())
    );
}

/// The login fails as a wrong password does; returns the message with the user name
/// masked, to compare refusals with each other.
async fn login_refused(p: &Pgsilo, user: &str, password: &str, db: &str) -> String {
    let err = must_fail(
        p.connect(user, password, db).await,
        &format!("{user} with {password:?} must be refused"),
    );
    let (code, message) = db_error(&err);
    assert_eq!(code, "28P01", "{user}: {message}");
    assert_eq!(message, format!("password authentication failed for user \"{user}\""));
    message.replace(user, "USER")
}

#[test]
fn roles_created_after_start_log_in_with_their_scram_or_md5_password() {
    let cluster = cluster();
    let p = builder(&cluster, "md5").start();
    create_role(&cluster, "scram-sha-256", "aq_scram", "scram pw", "");
    create_role(&cluster, "md5", "aq_md5", "md5 pw", "");
    runtime().block_on(async {
        // SCRAM verifier: the client gets SCRAM, and the pool's servers log in by
        // passthrough of its ClientKey. md5 hash: md5 both ways.
        login_ok(&p, "aq_scram", "scram pw", "app_db").await;
        login_ok(&p, "aq_md5", "md5 pw", "app_db").await;
        // Again, from the answers remembered, and in sessions that run real queries.
        let client = p.connect("aq_md5", "md5 pw", "app_db").await.unwrap();
        client
            .batch_execute("CREATE TEMP TABLE t (x int); INSERT INTO t VALUES (1), (2)")
            .await
            .unwrap();
        let sum: i64 = client.query_one("SELECT sum(x) FROM t", &[]).await.unwrap().get(0);
        assert_eq!(sum, 3);
    });
    // libpq too.
    let out = p.psql("aq_scram", "scram pw", "app_db", "SELECT current_user").unwrap();
    assert_eq!(out, "aq_scram");
}

#[test]
fn scram_sha_256_clients_are_checked_against_the_verifier_postgresql_holds() {
    let cluster = cluster();
    let p = builder(&cluster, "scram-sha-256").start();
    create_role(&cluster, "scram-sha-256", "aq_scram", "scram pw", "");
    create_role(&cluster, "md5", "aq_md5", "md5 pw", "");
    runtime().block_on(async {
        login_ok(&p, "aq_scram", "scram pw", "app_db").await;
        let wrong = [
            login_refused(&p, "aq_scram", "nope", "app_db").await,
            // An md5 hash cannot answer SCRAM, as with an md5 auth_file secret.
            login_refused(&p, "aq_md5", "md5 pw", "app_db").await,
            login_refused(&p, "ghost", "scram pw", "app_db").await,
        ];
        assert!(wrong.iter().all(|m| *m == wrong[0]), "{wrong:?}");
        // A failed attempt spoils nothing for the right password.
        login_ok(&p, "aq_scram", "scram pw", "app_db").await;
    });
}

#[test]
fn wrong_passwords_expired_roles_and_unknown_users_are_refused_alike() {
    let cluster = cluster();
    let p = builder(&cluster, "md5").start();
    create_role(&cluster, "scram-sha-256", "aq_scram", "scram pw", "");
    create_role(&cluster, "md5", "aq_md5", "md5 pw", "");
    create_role(
        &cluster,
        "scram-sha-256",
        "aq_expired",
        "old pw",
        "VALID UNTIL '2000-01-01'",
    );
    create_role(&cluster, "scram-sha-256", "aq_nologin", "no pw", "");
    cluster.psql("app_db", "ALTER ROLE aq_nologin NOLOGIN");
    runtime().block_on(async {
        let refusals = [
            login_refused(&p, "aq_scram", "wrong", "app_db").await,
            login_refused(&p, "aq_md5", "wrong", "app_db").await,
            login_refused(&p, "aq_expired", "old pw", "app_db").await,
            login_refused(&p, "aq_nologin", "no pw", "app_db").await,
            login_refused(&p, "ghost", "anything", "app_db").await,
            // A name that would break a query built by quoting.
            login_refused(&p, "x' OR 'a'='a", "anything", "app_db").await,
        ];
        assert!(refusals.iter().all(|m| *m == refusals[0]), "{refusals:?}");
        // The right passwords still work after the refusals.
        login_ok(&p, "aq_scram", "scram pw", "app_db").await;
        login_ok(&p, "aq_md5", "md5 pw", "app_db").await;
    });
}

#[test]
fn users_in_the_auth_file_are_not_looked_up() {
    let cluster = cluster();
    let p = builder(&cluster, "md5").start();
    runtime().block_on(async {
        // PostgreSQL has no password for trust_user: the lookup would refuse it. The
        // auth_file's password is what admits it.
        login_ok(&p, "trust_user", "listed pw", "app_db").await;
        login_refused(&p, "trust_user", "other pw", "app_db").await;
    });
}

#[test]
fn a_database_can_override_auth_user_and_auth_query() {
    let cluster = cluster();
    // [pgsilo]'s auth_user does not exist in PostgreSQL; app_db overrides it with
    // pgsilo_auth and its function, su_db with the superuser and the default query.
    let p = Pgsilo::builder()
        .auth_type("md5")
        .set_str("auth_user", "no_such_role")
        .user("no_such_role", "x")
        .user(AUTH_USER, AUTH_PW)
        .user("postgres", "unused")
        .db(Db::on(&cluster, "app_db")
            .set("auth_user", &support::toml_str(AUTH_USER))
            .set("auth_query", &support::toml_str(LOOKUP)))
        .db(Db::on(&cluster, "su_db")
            .dbname("app_db")
            .set("auth_user", &support::toml_str("postgres")))
        .db(Db::on(&cluster, "plain_db").dbname("app_db"))
        .start();
    create_role(&cluster, "md5", "aq_md5", "md5 pw", "");
    create_role(&cluster, "scram-sha-256", "aq_scram", "scram pw", "");
    runtime().block_on(async {
        login_ok(&p, "aq_md5", "md5 pw", "app_db").await;
        login_ok(&p, "aq_scram", "scram pw", "su_db").await;
        login_refused(&p, "aq_scram", "wrong", "su_db").await;
        // plain_db keeps [pgsilo]'s auth_user, which cannot log in: the client is told
        // with 08P01, and the log says why.
        let err = must_fail(p.connect("aq_md5", "md5 pw", "plain_db").await, "no_such_role");
        let (code, message) = db_error(&err);
        assert_eq!(code, "08P01", "{message}");
        assert!(message.contains("auth_query"), "{message}");
    });
    let log = p.wait_for_log("auth_user could not log in", Duration::from_secs(10));
    assert!(log.contains("no_such_role"), "{log}");
}

#[test]
fn a_failing_query_gives_the_servers_sqlstate_and_a_log_line() {
    let cluster = cluster();
    // pgsilo_auth may not read pg_authid itself.
    let p = builder(&cluster, "md5")
        .set_str(
            "auth_query",
            "SELECT rolname, rolpassword FROM pg_authid WHERE rolname = $1",
        )
        .start();
    create_role(&cluster, "md5", "aq_md5", "md5 pw", "");
    runtime().block_on(async {
        let err = must_fail(p.connect("aq_md5", "md5 pw", "app_db").await, "no access to pg_authid");
        let (code, message) = db_error(&err);
        assert_eq!(code, "42501", "{message}");
        assert!(
            !message.contains("pg_authid"),
            "the server's words stay in the log: {message}"
        );
    });
    p.wait_for_log("permission denied for table pg_authid", Duration::from_secs(10));
}

#[test]
fn a_changed_password_is_looked_up_again() {
    let cluster = cluster();
    // One worker: every login meets the same remembered answers.
    let p = builder(&cluster, "md5").cpus(&[0]).start();
    create_role(&cluster, "md5", "aq_md5", "first pw", "");
    create_role(&cluster, "md5", "aq_md5_b", "first pw", "");
    runtime().block_on(async {
        login_ok(&p, "aq_md5", "first pw", "app_db").await;
        login_ok(&p, "aq_md5_b", "first pw", "app_db").await;
        cluster.psql(
            "app_db",
            "SET password_encryption = 'md5';\nALTER ROLE aq_md5 PASSWORD 'second pw';\nALTER ROLE aq_md5_b PASSWORD 'second pw';",
        );
        // The remembered hash is the old one: the first attempt with the new password
        // fails, and makes pgsilo forget it.
        login_refused(&p, "aq_md5", "second pw", "app_db").await;
        login_ok(&p, "aq_md5", "second pw", "app_db").await;
        login_refused(&p, "aq_md5", "first pw", "app_db").await;
        // A reload forgets every answer: the new password works at once.
        p.send_signal(libc::SIGHUP);
        p.wait_for_log("reloaded configuration", Duration::from_secs(10));
        login_ok(&p, "aq_md5_b", "second pw", "app_db").await;
    });
}

#[test]
fn concurrent_logins_share_the_lookup_connection() {
    let cluster = cluster();
    let p = builder(&cluster, "md5").start();
    for i in 0..4 {
        create_role(&cluster, "scram-sha-256", &format!("aq_many_{i}"), "many pw", "");
    }
    let rt = runtime();
    rt.block_on(async {
        let p = &p;
        let logins = (0..24).map(|i| async move {
            let user = format!("aq_many_{}", i % 4);
            login_ok(p, &user, "many pw", "app_db").await;
        });
        futures_util::future::join_all(logins).await;
        login_refused(p, "aq_many_0", "wrong", "app_db").await;
    });
    // One lookup connection per worker at most, apart from the users' pools.
    let lookups = cluster.psql(
        "postgres",
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'pgsilo_auth'",
    );
    let lookups: usize = lookups.parse().unwrap();
    assert!((1..=2).contains(&lookups), "{lookups} lookup connections");
}
