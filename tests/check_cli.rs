//! The command line: `--check` validates a config and its auth_file, printing every
//! problem with its file and line; `--version` and `--help`.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::{pgsilo_bin, Db, Pgsilo, PgsiloBuilder};

fn run(args: &[&str]) -> Output {
    Command::new(pgsilo_bin())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run pgsilo {args:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn valid() -> PgsiloBuilder {
    Pgsilo::builder()
        .auth_type("md5")
        .user("alice", "secret")
        .user("bob", "md5a4b6fa5c1fdcbd8f1db7ab6ff4e6c2a2")
        .db(Db::at("127.0.0.1", 5432, "app_db").pool_size(5))
}

/// 1-based line of the first line of `text` that starts with `prefix`.
fn line_of(text: &str, prefix: &str) -> usize {
    text.lines()
        .position(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{text}"))
        + 1
}

#[test]
fn check_accepts_a_valid_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = valid().write_files(dir.path(), 6432);
    let out = run(&["--check", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("configuration ok"), "{stdout}");
    assert!(stdout.contains("2 user(s)"), "{stdout}");
}

#[test]
fn check_reports_every_problem_with_its_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let builder = valid()
        .extra("max_client_con = 5")
        .set("pool_mode", "\"sometimes\"")
        .userlist_line("carol secret-without-quotes");
    let config = builder.write_files(dir.path(), 6432);
    let config_text = builder.config_text(6432);
    let out = run(&["--check", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);

    let config_path = config.display().to_string();
    let unknown_line = line_of(&config_text, "max_client_con =");
    assert!(
        stderr.contains(&format!(
            "{config_path} line {unknown_line}: unknown key \"max_client_con\" in [pgsilo]"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("did you mean \"max_client_conn\""), "{stderr}");
    let mode_line = line_of(&config_text, "pool_mode =");
    assert!(
        stderr.contains(&format!("{config_path} line {mode_line}: pool_mode")) && stderr.contains("sometimes"),
        "{stderr}"
    );
    let userlist = Path::new(&config).with_file_name("userlist.txt");
    assert!(
        stderr.contains(&format!("auth_file {} line 3:", userlist.display())),
        "{stderr}"
    );
    assert!(stderr.contains("3 problem(s)"), "{stderr}");
}

#[test]
fn a_bad_config_refuses_to_start_with_the_same_report() {
    let failed = valid()
        .extra("listen_prot = 1")
        .userlist_line("\"dave\"")
        .expect_failure();
    assert_eq!(failed.status.and_then(|s| s.code()), Some(1), "{}", failed.stderr);
    assert!(
        failed.stderr.contains("unknown key \"listen_prot\""),
        "{}",
        failed.stderr
    );
    assert!(failed.stderr.contains("userlist.txt line 3"), "{}", failed.stderr);
}

#[test]
fn check_of_a_missing_file_fails() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let out = run(&["--check", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("nope.toml"), "{stderr}");
}

#[test]
fn version_and_help() {
    let out = run(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).trim(),
        format!("pgsilo {}", env!("CARGO_PKG_VERSION"))
    );

    let out = run(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    assert!(help.contains("--check"), "{help}");
    assert!(help.contains("CONFIG"), "{help}");
    assert!(help.contains("--version"), "{help}");

    // No config: a usage error, not a crash.
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("CONFIG"), "{}", text(&out.stderr));
}
