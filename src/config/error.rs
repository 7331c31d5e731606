//! The one error type of the config layer, and the located problems it carries.

use std::fmt;
use std::path::PathBuf;

use thiserror::Error;

/// Which kind of file a problem was found in; decides the message prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Config,
    AuthFile,
}

impl FileKind {
    fn label(self) -> &'static str {
        match self {
            FileKind::Config => "config file",
            FileKind::AuthFile => "auth_file",
        }
    }
}

/// One thing wrong with a file, located as precisely as the parser allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub kind: FileKind,
    /// The path as the user wrote it (or as resolved, for the auth_file).
    pub file: PathBuf,
    /// 1-based; `None` when the problem is about the file as a whole.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Config messages lead with the path alone so they read like compiler output;
        // auth_file messages say which file they are about, since the user may not
        // recognise the resolved path.
        if self.kind == FileKind::AuthFile {
            write!(f, "auth_file ")?;
        }
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, " line {line}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Something about a config that works, but that its author should know: how a PgBouncer
/// ini reads, and PgBouncer settings pgsilo does not implement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub file: PathBuf,
    /// 1-based; `None` when it is about the file as a whole.
    pub line: Option<usize>,
    pub message: String,
    /// A setting pgsilo does not implement: a warning, or a problem with `--strict`.
    pub unsupported: bool,
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, " line {line}")?;
        }
        write!(f, ": {}", self.message)
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("cannot read {} {}: {source}", kind.label(), path.display())]
    Read {
        kind: FileKind,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file was read; these are every problem found in it, in file order.
    #[error("{}", join_lines(problems))]
    Invalid { problems: Vec<Problem> },
}

impl ConfigError {
    /// One message per problem, as `Display` prints them.
    pub fn messages(&self) -> Vec<String> {
        match self {
            ConfigError::Read { .. } => vec![self.to_string()],
            ConfigError::Invalid { problems } => problems.iter().map(|p| p.to_string()).collect(),
        }
    }

    /// The located problems; empty for a read failure.
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid { problems } => problems,
        }
    }
}

fn join_lines(problems: &[Problem]) -> String {
    problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n")
}
