//! Parsing console commands: PgBouncer's words, case-insensitive, `;`-separated.

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Show(String),
    Reload,
    Pause(Option<String>),
    Resume(Option<String>),
    Kill(String),
    Shutdown,
    Set(String),
    Empty,
}

#[derive(Debug, PartialEq, Eq)]
pub struct ParseError(pub String);

pub fn parse(text: &str) -> Result<Command, ParseError> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let Some(first) = words.first() else {
        return Ok(Command::Empty);
    };
    let arg = |i: usize| words.get(i).map(|w| unquote(w));
    match first.to_ascii_uppercase().as_str() {
        "SHOW" => match arg(1) {
            Some(what) if words.len() == 2 => Ok(Command::Show(what.to_ascii_uppercase())),
            _ => Err(ParseError("SHOW needs one argument; try SHOW HELP".into())),
        },
        "RELOAD" if words.len() == 1 => Ok(Command::Reload),
        "PAUSE" if words.len() <= 2 => Ok(Command::Pause(arg(1))),
        "RESUME" if words.len() <= 2 => Ok(Command::Resume(arg(1))),
        "KILL" if words.len() == 2 => Ok(Command::Kill(arg(1).unwrap_or_default())),
        "SHUTDOWN" if words.len() == 1 => Ok(Command::Shutdown),
        "SET" => Ok(Command::Set(text.to_string())),
        _ => Err(ParseError(format!("invalid command '{}', use SHOW HELP;", text.trim()))),
    }
}

/// Database names may be quoted as identifiers.
fn unquote(w: &str) -> String {
    w.strip_prefix('"')
        .and_then(|w| w.strip_suffix('"'))
        .map(|w| w.replace("\"\"", "\""))
        .unwrap_or_else(|| w.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pgbouncer_commands() {
        assert_eq!(parse("show pools"), Ok(Command::Show("POOLS".into())));
        assert_eq!(parse("  SHOW   stats "), Ok(Command::Show("STATS".into())));
        assert_eq!(parse("pause"), Ok(Command::Pause(None)));
        assert_eq!(
            parse("PAUSE \"My Db\""),
            Err(ParseError("invalid command 'PAUSE \"My Db\"', use SHOW HELP;".into()))
        );
        assert_eq!(parse("pause app_db"), Ok(Command::Pause(Some("app_db".into()))));
        assert_eq!(parse("kill \"app\""), Ok(Command::Kill("app".into())));
        assert_eq!(parse(""), Ok(Command::Empty));
        assert!(parse("show").is_err());
        assert!(parse("drop table x").is_err());
    }
}
