//! The auth_file, in PgBouncer's userlist.txt format: one `"user" "secret"` per line.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::auth::Secret;

use super::error::{ConfigError, FileKind, Problem};

/// The users who may log in, with their secrets.
#[derive(Clone, Debug)]
pub struct Userlist {
    /// The file read.
    pub path: PathBuf,
    /// In file order; a user listed twice keeps its first position and its last secret.
    entries: Vec<(String, Secret)>,
    index: HashMap<String, usize>,
}

impl Userlist {
    pub fn load(path: &Path) -> Result<Userlist, ConfigError> {
        let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
            kind: FileKind::AuthFile,
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse_bytes(&bytes, path)
    }

    /// Parses `text` as if read from `path`. Every bad line is reported.
    pub fn parse(text: &str, path: &Path) -> Result<Userlist, ConfigError> {
        Self::parse_bytes(text.as_bytes(), path)
    }

    // Bytes, so that one line of bad UTF-8 is one reported line, not an unreadable file.
    fn parse_bytes(bytes: &[u8], path: &Path) -> Result<Userlist, ConfigError> {
        let mut list = Userlist {
            path: path.to_path_buf(),
            entries: Vec::new(),
            index: HashMap::new(),
        };
        let mut first_line: HashMap<String, usize> = HashMap::new();
        let mut problems = Vec::new();
        for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
            let number = i + 1;
            let parsed = std::str::from_utf8(raw)
                .map_err(|_| "not valid UTF-8".to_string())
                .and_then(parse_line)
                .and_then(|fields| match fields {
                    None => Ok(None),
                    Some(line) => classify(line).map(Some),
                });
            match parsed {
                Ok(None) => {}
                Ok(Some((user, secret))) => {
                    if let Some(first) = first_line.get(&user) {
                        log::warn!(
                            "auth_file {} line {number}: user \"{user}\" is also on line {first}; the later entry wins",
                            path.display()
                        );
                    } else {
                        first_line.insert(user.clone(), number);
                    }
                    list.insert(user, secret);
                }
                Err(message) => problems.push(Problem {
                    kind: FileKind::AuthFile,
                    file: path.to_path_buf(),
                    line: Some(number),
                    message,
                }),
            }
        }
        if problems.is_empty() {
            Ok(list)
        } else {
            Err(ConfigError::Invalid { problems })
        }
    }

    fn insert(&mut self, user: String, secret: Secret) {
        match self.index.get(&user) {
            Some(&i) => self.entries[i].1 = secret,
            None => {
                self.index.insert(user.clone(), self.entries.len());
                self.entries.push((user, secret));
            }
        }
    }

    pub fn get(&self, user: &str) -> Option<&Secret> {
        self.index.get(user).map(|&i| &self.entries[i].1)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// In file order.
    pub fn users(&self) -> impl Iterator<Item = (&str, &Secret)> {
        self.entries.iter().map(|(u, s)| (u.as_str(), s))
    }
}

/// The raw user and secret of one line; `None` for blank lines and `;` comments.
fn parse_line(line: &str) -> Result<Option<(String, String)>, String> {
    const FORMAT: &str = "expected two quoted fields: \"user\" \"secret\"";
    let line = line.trim_start();
    if line.is_empty() || line.starts_with(';') {
        return Ok(None);
    }
    if !line.starts_with('"') {
        let hint = if line.starts_with('#') {
            " (comments start with ';')"
        } else {
            ""
        };
        return Err(format!("{FORMAT}{hint}"));
    }
    let (user, rest) = quoted(line).ok_or("the quoted user name is not closed")?;
    // PgBouncer skips whatever lies between the fields; do the same so files it accepts
    // load here too.
    let Some(start) = rest.find('"') else {
        return Err(format!("{FORMAT}; the secret is missing"));
    };
    let (secret, _ignored) = quoted(&rest[start..]).ok_or("the quoted secret is not closed")?;
    if user.is_empty() {
        return Err("empty user name".to_string());
    }
    Ok(Some((user, secret)))
}

/// Reads a field starting at its opening quote, where `""` stands for one `"`;
/// returns it and what follows the closing quote, or `None` if it is not closed.
fn quoted(text: &str) -> Option<(String, &str)> {
    let body = text.strip_prefix('"')?;
    let mut field = String::new();
    let mut chars = body.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c != '"' {
            field.push(c);
        } else if chars.peek().map(|&(_, next)| next) == Some('"') {
            field.push('"');
            chars.next();
        } else {
            return Some((field, &body[i + 1..]));
        }
    }
    None
}

fn classify((user, secret): (String, String)) -> Result<(String, Secret), String> {
    let secret = Secret::parse(&secret).map_err(|e| format!("user \"{user}\": {e}"))?;
    Ok((user, secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAM: &str = "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=";

    fn parse(text: &str) -> Result<Userlist, ConfigError> {
        Userlist::parse(text, Path::new("userlist_a.txt"))
    }

    #[test]
    fn reads_users_secrets_comments_and_blank_lines() {
        let text = format!(
            "; PgBouncer userlist\n\n  ; indented comment\n\"alice\" \"md50123456789abcdef0123456789abcdef\"\n\"bob\" \"{SCRAM}\"\n\"carol\"\t\"pencil\"   \r\n\"us\"\"er\" \"pa\"\"ss\"\"\"\n"
        );
        let list = parse(&text).unwrap();
        assert_eq!(list.len(), 4);
        assert!(matches!(list.get("alice"), Some(Secret::Md5(h)) if h == "md50123456789abcdef0123456789abcdef"));
        assert!(matches!(list.get("bob"), Some(Secret::Scram(s)) if s.iterations == 4096));
        assert!(matches!(list.get("carol"), Some(Secret::Plain(p)) if p == "pencil"));
        assert!(matches!(list.get("us\"er"), Some(Secret::Plain(p)) if p == "pa\"ss\""));
        assert_eq!(list.get("dave"), None);
        let users: Vec<_> = list.users().map(|(u, _)| u).collect();
        assert_eq!(users, ["alice", "bob", "carol", "us\"er"]);
        assert_eq!(list.path, Path::new("userlist_a.txt"));
    }

    #[test]
    fn ignores_what_pgbouncer_ignores() {
        // After the secret, and between the fields: PgBouncer skips both.
        let list = parse("\"a\" \"x\" trailing words\n\"b\" = \"y\"\n\"c\"\"\" \"\"\n").unwrap();
        assert!(matches!(list.get("a"), Some(Secret::Plain(p)) if p == "x"));
        assert!(matches!(list.get("b"), Some(Secret::Plain(p)) if p == "y"));
        assert!(matches!(list.get("c\""), Some(Secret::Plain(p)) if p.is_empty()));
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn a_later_entry_for_the_same_user_wins() {
        let list = parse("\"a\" \"first\"\n\"b\" \"x\"\n\"a\" \"second\"\n").unwrap();
        assert_eq!(list.len(), 2);
        assert!(matches!(list.get("a"), Some(Secret::Plain(p)) if p == "second"));
        let users: Vec<_> = list.users().map(|(u, _)| u).collect();
        assert_eq!(users, ["a", "b"]);
    }

    #[test]
    fn every_bad_line_is_reported_with_its_number() {
        let text = "\"ok\" \"fine\"\nbare words\n# hash comment\n\"lonely\"\n\"open \"x\"\n\"u\" \"unclosed\n\"\" \"x\"\n\"s\" \"SCRAM-SHA-256$4096:salt\"\n\"ok2\" \"fine\"\n";
        let err = parse(text).unwrap_err();
        let m = err.messages();
        let expected = [
            "auth_file userlist_a.txt line 2: expected two quoted fields: \"user\" \"secret\"",
            "auth_file userlist_a.txt line 3: expected two quoted fields: \"user\" \"secret\" (comments start with ';')",
            "auth_file userlist_a.txt line 4: expected two quoted fields: \"user\" \"secret\"; the secret is missing",
            "auth_file userlist_a.txt line 5: the quoted secret is not closed",
            "auth_file userlist_a.txt line 6: the quoted secret is not closed",
            "auth_file userlist_a.txt line 7: empty user name",
            "auth_file userlist_a.txt line 8: user \"s\": malformed SCRAM-SHA-256 secret: expected <iterations>:<salt>$<storedkey>:<serverkey>",
        ];
        assert_eq!(m, expected);
        assert_eq!(err.to_string(), expected.join("\n"));
        // A secret never appears in a message.
        assert!(!err.to_string().contains("fine"));
    }

    #[test]
    fn load_reports_unreadable_files_and_bad_utf8_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.txt");
        let err = Userlist::load(&path).unwrap_err();
        assert!(matches!(
            err,
            ConfigError::Read {
                kind: FileKind::AuthFile,
                ..
            }
        ));
        assert!(err.to_string().starts_with("cannot read auth_file "));

        std::fs::write(&path, b"\"a\" \"b\"\n\"\xff\" \"c\"\n").unwrap();
        let m = Userlist::load(&path).unwrap_err().messages();
        assert_eq!(m, [format!("auth_file {} line 2: not valid UTF-8", path.display())]);
    }
}
