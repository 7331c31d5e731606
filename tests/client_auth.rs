//! Client authentication: every auth_type with every auth_file secret form (plain, md5,
//! SCRAM) where the pair makes sense; wrong passwords and unknown users fail alike.
//!
//! The server side is kept out of the picture: every pool logs in to PostgreSQL as the
//! forced user trust_user (pg_hba trust), whoever the client is. The md5 and SCRAM
//! secrets are made by PostgreSQL itself, not by pgsilo's code.

mod support;

use support::wire::{self, Raw};
use support::{db_error, must_fail, runtime, Db, PgCluster, Pgsilo};

const PLAIN_USER: &str = "plain_u";
const PLAIN_PW: &str = "plain secret";
const MD5_USER: &str = "md5_u";
const MD5_PW: &str = "md5-secret";
/// scram_u's secret is scram_user's verifier from pg_authid: the password is scram_pass.
const SCRAM_USER: &str = "scram_u";
const SCRAM_PW: &str = "scram_pass";

#[derive(Debug, PartialEq)]
enum Asked {
    Nothing,
    Cleartext,
    Md5,
    Scram,
}

/// What pgsilo asks a client for first, read off the wire.
fn first_request(port: u16, user: &str) -> Asked {
    let mut raw = Raw::connect(port);
    assert!(raw.send(&wire::startup_message(&[("user", user), ("database", "app_db")])));
    let (tag, body) = raw.read_message().expect("an answer to the startup");
    match (tag, u32::from_be_bytes(body[..4].try_into().unwrap())) {
        (b'R', 0) => Asked::Nothing,
        (b'R', 3) => Asked::Cleartext,
        (b'R', 5) => Asked::Md5,
        (b'R', 10) => {
            assert!(body[4..].split(|&b| b == 0).any(|m| m == b"SCRAM-SHA-256"), "{body:?}");
            Asked::Scram
        }
        (tag, code) => panic!(
            "unexpected first answer {:?} {code}: {:?}",
            tag as char,
            wire::error_fields(&body)
        ),
    }
}

/// One pgsilo with the three users, each with its own secret form.
fn start(cluster: &PgCluster, auth_type: &str) -> Pgsilo {
    let md5_secret = cluster.psql("postgres", &format!("SELECT 'md5' || md5('{MD5_PW}' || '{MD5_USER}')"));
    assert!(md5_secret.starts_with("md5") && md5_secret.len() == 35);
    let scram_secret = cluster.psql(
        "postgres",
        "SELECT rolpassword FROM pg_authid WHERE rolname = 'scram_user'",
    );
    assert!(scram_secret.starts_with("SCRAM-SHA-256$"), "{scram_secret}");
    Pgsilo::builder()
        .auth_type(auth_type)
        .user(PLAIN_USER, PLAIN_PW)
        .user(MD5_USER, &md5_secret)
        .user(SCRAM_USER, &scram_secret)
        .db(Db::on(cluster, "app_db").user("trust_user"))
        .start()
}

/// Logs in with tokio-postgres and proves the session works.
async fn login_ok(p: &Pgsilo, user: &str, password: Option<&str>) {
    let client = support::connect_with(&p.pg_config(user, password, "app_db"))
        .await
        .unwrap_or_else(|e| panic!("{user} with {password:?}: {e:?}"));
    let row = client.query_one("SELECT current_user::text", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "trust_user", "the forced server user");
}

/// The login fails with 28P01 and PostgreSQL's wording, naming `user`.
async fn login_refused(p: &Pgsilo, user: &str, password: Option<&str>) -> String {
    let err = must_fail(
        support::connect_with(&p.pg_config(user, password, "app_db")).await,
        &format!("{user} with {password:?} must be refused"),
    );
    let (code, message) = db_error(&err);
    assert_eq!(code, "28P01", "{user}: {message}");
    assert_eq!(message, format!("password authentication failed for user \"{user}\""));
    // Same shape for everyone: only the user name differs.
    message.replace(user, "USER")
}

/// psql (libpq) with PGPASSWORD.
fn psql_ok(p: &Pgsilo, user: &str, password: &str) {
    let out = p
        .psql(user, password, "app_db", "SELECT current_user")
        .unwrap_or_else(|e| panic!("psql as {user}: {e}"));
    assert_eq!(out, "trust_user");
}

fn psql_refused(p: &Pgsilo, user: &str, password: &str) {
    let err = p
        .psql(user, password, "app_db", "SELECT 1")
        .expect_err("psql login must fail");
    assert!(
        err.contains(&format!("password authentication failed for user \"{user}\"")),
        "{err}"
    );
}

#[test]
fn trust_admits_listed_users_without_a_password_and_refuses_unknown_ones() {
    let cluster = PgCluster::start();
    let p = start(&cluster, "trust");
    for user in [PLAIN_USER, MD5_USER, SCRAM_USER] {
        assert_eq!(first_request(p.port(), user), Asked::Nothing, "{user}");
    }
    runtime().block_on(async {
        for user in [PLAIN_USER, MD5_USER, SCRAM_USER] {
            login_ok(&p, user, None).await;
            login_ok(&p, user, Some("whatever")).await;
        }
        login_refused(&p, "ghost", None).await;
        login_refused(&p, "ghost", Some("whatever")).await;
    });
    psql_ok(&p, PLAIN_USER, "");
    psql_refused(&p, "ghost", "");
}

#[test]
fn plain_checks_cleartext_against_every_secret_form() {
    let cluster = PgCluster::start();
    let p = start(&cluster, "plain");
    for user in [PLAIN_USER, MD5_USER, SCRAM_USER, "ghost"] {
        assert_eq!(first_request(p.port(), user), Asked::Cleartext, "{user}");
    }
    runtime().block_on(async {
        login_ok(&p, PLAIN_USER, Some(PLAIN_PW)).await;
        login_ok(&p, MD5_USER, Some(MD5_PW)).await;
        login_ok(&p, SCRAM_USER, Some(SCRAM_PW)).await;
        let wrong = [
            login_refused(&p, PLAIN_USER, Some("nope")).await,
            login_refused(&p, MD5_USER, Some("nope")).await,
            login_refused(&p, SCRAM_USER, Some("nope")).await,
            login_refused(&p, PLAIN_USER, Some("")).await,
            login_refused(&p, "ghost", Some(PLAIN_PW)).await,
        ];
        assert!(wrong.iter().all(|m| *m == wrong[0]), "{wrong:?}");
    });
    psql_ok(&p, MD5_USER, MD5_PW);
    psql_refused(&p, MD5_USER, "nope");
}

#[test]
fn md5_challenges_plain_and_md5_secrets_and_uses_scram_for_scram_secrets() {
    let cluster = PgCluster::start();
    let p = start(&cluster, "md5");
    assert_eq!(first_request(p.port(), PLAIN_USER), Asked::Md5);
    assert_eq!(first_request(p.port(), MD5_USER), Asked::Md5);
    assert_eq!(first_request(p.port(), SCRAM_USER), Asked::Scram);
    // An unknown user is challenged like most users are: nothing tells it apart.
    assert_eq!(first_request(p.port(), "ghost"), Asked::Md5);
    runtime().block_on(async {
        login_ok(&p, PLAIN_USER, Some(PLAIN_PW)).await;
        login_ok(&p, MD5_USER, Some(MD5_PW)).await;
        login_ok(&p, SCRAM_USER, Some(SCRAM_PW)).await;
        let wrong = [
            login_refused(&p, PLAIN_USER, Some("nope")).await,
            login_refused(&p, MD5_USER, Some("nope")).await,
            login_refused(&p, SCRAM_USER, Some("nope")).await,
            login_refused(&p, "ghost", Some(MD5_PW)).await,
        ];
        assert!(wrong.iter().all(|m| *m == wrong[0]), "{wrong:?}");
    });
    psql_ok(&p, MD5_USER, MD5_PW);
    psql_ok(&p, SCRAM_USER, SCRAM_PW);
    psql_refused(&p, PLAIN_USER, "nope");
}

#[test]
fn scram_works_with_plain_and_scram_secrets_and_unknown_users_look_the_same() {
    let cluster = PgCluster::start();
    let p = start(&cluster, "scram-sha-256");
    for user in [PLAIN_USER, MD5_USER, SCRAM_USER, "ghost"] {
        assert_eq!(first_request(p.port(), user), Asked::Scram, "{user}");
    }
    runtime().block_on(async {
        login_ok(&p, PLAIN_USER, Some(PLAIN_PW)).await;
        login_ok(&p, SCRAM_USER, Some(SCRAM_PW)).await;
        let wrong = [
            login_refused(&p, PLAIN_USER, Some("nope")).await,
            login_refused(&p, SCRAM_USER, Some("nope")).await,
            login_refused(&p, "ghost", Some(SCRAM_PW)).await,
            // An md5 secret cannot answer SCRAM: even the right password fails, alike.
            login_refused(&p, MD5_USER, Some(MD5_PW)).await,
        ];
        assert!(wrong.iter().all(|m| *m == wrong[0]), "{wrong:?}");
    });
    psql_ok(&p, PLAIN_USER, PLAIN_PW);
    psql_ok(&p, SCRAM_USER, SCRAM_PW);
    psql_refused(&p, "ghost", SCRAM_PW);
}

/// A client may send its first query in the same write as its startup packet (PostgreSQL
/// accepts that); the query must be answered, not dropped with the login's buffer.
#[test]
fn a_query_sent_with_the_startup_packet_is_answered() {
    let cluster = PgCluster::start();
    let silo = Pgsilo::builder()
        .auth_type("trust")
        .user("trust_user", "")
        .db(Db::on(&cluster, "app_db").user("trust_user"))
        .start();
    let mut raw = Raw::connect(silo.port());
    let mut bytes = wire::startup_message(&[("user", "trust_user"), ("database", "app_db")]);
    bytes.extend_from_slice(&wire::query("SELECT 'pipelined'"));
    assert!(raw.send(&bytes));
    let mut rows = Vec::new();
    let mut ready = 0;
    while ready < 2 {
        let (tag, body) = raw.read_message().expect("the welcome, then the answer");
        match tag {
            b'D' => rows.push(String::from_utf8_lossy(&body[6..]).to_string()),
            b'Z' => ready += 1,
            b'E' => panic!("{:?}", wire::error_fields(&body)),
            _ => {}
        }
    }
    assert_eq!(rows, ["pipelined"]);
}
