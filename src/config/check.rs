//! `pgsilo --check`: the config file and its auth_file, judged together.

use std::path::Path;

use crate::auth::Secret;

use super::general::AuthType;
use super::load::{Config, Loaded};
use super::userlist::Userlist;

/// A config that can be served, and what its author should still hear about it.
#[derive(Debug)]
pub struct Checked {
    pub config: Config,
    pub userlist: Userlist,
    /// Things that work but are probably unintended, and PgBouncer settings pgsilo does
    /// not implement (each with what it does instead).
    pub warnings: Vec<String>,
    /// How a PgBouncer ini reads where pgsilo's TOML would differ, and PgBouncer
    /// settings that change nothing here.
    pub notes: Vec<String>,
}

/// `check_with`, not strict, logging the notes and warnings (as a reload does).
pub fn check(path: &Path) -> Result<(Config, Userlist), Vec<String>> {
    let checked = check_with(path, false)?;
    for note in &checked.notes {
        log::info!("{note}");
    }
    for warning in &checked.warnings {
        log::warn!("{warning}");
    }
    Ok((checked.config, checked.userlist))
}

/// Everything `pgsilo --check CONFIG` reports: the config problems and the auth_file
/// problems together, one message each. With `strict`, PgBouncer settings pgsilo does
/// not implement are problems too, instead of warnings.
pub fn check_with(path: &Path, strict: bool) -> Result<Checked, Vec<String>> {
    let loaded = Loaded::read(path).map_err(|e| e.messages())?;
    let mut messages: Vec<String> = loaded.problems.iter().map(ToString::to_string).collect();
    let mut warnings = Vec::new();
    let mut notes = Vec::new();
    for notice in &loaded.notices {
        match (notice.unsupported, strict) {
            (true, true) => messages.push(format!("{notice} (refused with --strict)")),
            (true, false) => warnings.push(notice.to_string()),
            (false, _) => notes.push(notice.to_string()),
        }
    }
    // An unreadable auth_file is already reported against the config's auth_file line.
    let userlist = if loaded.auth_file_readable {
        match Userlist::load(&loaded.config.general.auth_file) {
            Ok(list) => Some(list),
            Err(e) => {
                messages.extend(e.messages());
                None
            }
        }
    } else {
        None
    };
    match userlist {
        Some(userlist) if messages.is_empty() => {
            warnings.extend(user_warnings(&loaded.config, &userlist));
            Ok(Checked {
                config: loaded.config,
                userlist,
                warnings,
                notes,
            })
        }
        _ => Err(messages),
    }
}

fn user_warnings(config: &Config, list: &Userlist) -> Vec<String> {
    let mut warnings = Vec::new();
    let g = &config.general;
    let file = list.path.display();
    if list.is_empty() {
        warnings.push(format!("auth_file {file} lists no users; nobody can log in"));
    }
    if g.auth_type == AuthType::ScramSha256 {
        for (user, secret) in list.users() {
            if matches!(secret, Secret::Md5(_)) {
                warnings.push(format!(
                    "auth_file {file}: user \"{user}\" has an md5 secret, which cannot answer SCRAM-SHA-256 (auth_type); that user cannot log in"
                ));
            }
        }
    }
    // The lookup connections log in with auth_user's auth_file secret.
    let mut auth_users: Vec<&String> = g
        .auth_user
        .iter()
        .chain(config.databases.values().filter_map(|d| d.auth_user.as_ref()))
        .collect();
    auth_users.sort();
    auth_users.dedup();
    for user in auth_users {
        if list.get(user).is_none() {
            warnings.push(format!(
                "auth_user \"{user}\" is not in auth_file {file}; auth_query logs in to PostgreSQL as it without a password"
            ));
        }
    }
    // Even with trust, PgBouncer only admits users named in the auth_file.
    for user in g.admin_users.iter().chain(&g.stats_users) {
        if list.get(user).is_none() {
            warnings.push(format!(
                "admin or stats user \"{user}\" is not in auth_file {file}; it cannot log in"
            ));
        }
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD_CONFIG: &str =
        "[pgsilo]\nauth_file = \"users.txt\"\nadmin_users = \"admin\"\n\n[databases.app]\nhost = \"db\"\n";

    #[test]
    fn accepts_a_good_pair() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("tenant.toml");
        std::fs::write(&config, GOOD_CONFIG).unwrap();
        std::fs::write(dir.path().join("users.txt"), "\"admin\" \"pw\"\n").unwrap();
        let (config, users) = check(&config).unwrap();
        assert_eq!(config.general.name, "tenant");
        assert_eq!(users.len(), 1);
        assert_eq!(users.path, config.general.auth_file);
    }

    #[test]
    fn reports_config_and_auth_file_problems_together() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("tenant.toml");
        std::fs::write(&config, GOOD_CONFIG.replace("host = \"db\"", "host = \"db\"\nport = 0")).unwrap();
        let users = dir.path().join("users.txt");
        std::fs::write(&users, "\"admin\" \"pw\"\nadmin pw\n").unwrap();
        let messages = check(&config).unwrap_err();
        assert_eq!(messages.len(), 2, "{messages:#?}");
        assert!(messages[0].contains("line 7: port in [databases.app]: must be at least 1, found 0"));
        assert_eq!(
            messages[1],
            format!(
                "auth_file {} line 2: expected two quoted fields: \"user\" \"secret\"",
                users.display()
            )
        );
    }

    #[test]
    fn a_missing_auth_file_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("tenant.toml");
        std::fs::write(&config, GOOD_CONFIG).unwrap();
        let messages = check(&config).unwrap_err();
        assert_eq!(messages.len(), 1, "{messages:#?}");
        assert!(messages[0].contains("line 2: auth_file in [pgsilo]: cannot read"));

        let missing = dir.path().join("nope.toml");
        let messages = check(&missing).unwrap_err();
        assert_eq!(messages.len(), 1);
        assert!(messages[0].starts_with("cannot read config file"));
    }
}
