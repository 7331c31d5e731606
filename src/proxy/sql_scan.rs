//! Just enough of PostgreSQL's lexer to find the statements of a simple Query and to
//! recognise the few pgsilo must act on under transaction pooling, where a client's
//! statement names mean nothing to the server it lands on: `PREPARE name … AS …`,
//! `EXECUTE name …` (also under `EXPLAIN`), `DEALLOCATE [PREPARE] name | ALL`, and
//! `DISCARD ALL`. Only the first keyword of each statement is looked at (and for these,
//! the name after it); the server still judges every statement itself.
//!
//! The splitter follows the server's own rules where they decide where a statement ends:
//! '…' strings ('' inside), E'…' strings (backslash escapes), "…" identifiers, $tag$…$tag$
//! bodies, -- and nested /* */ comments, and parentheses (CREATE RULE's `(a; b)`). Empty
//! statements (`;;`) produce no reply from PostgreSQL, so they are not statements here
//! either: the n-th statement found is the one whose CommandComplete comes n-th.

use std::ops::Range;

/// The statements of `sql`, as byte ranges without their terminating `;`. None when the
/// text is something the splitter does not follow exactly (a SQL-standard function body,
/// `BEGIN ATOMIC … END`, whose inner semicolons do not end the statement).
/// `backslash_quotes`: standard_conforming_strings is off, so '…' takes backslash escapes.
pub fn split_statements(sql: &[u8], backslash_quotes: bool) -> Option<Vec<Range<usize>>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut depth = 0usize;
    let mut has_token = false;
    let mut i = 0;
    let mut prev_word: Option<Range<usize>> = None;
    while i < sql.len() {
        let c = sql[i];
        match c {
            b'-' if sql.get(i + 1) == Some(&b'-') => {
                while i < sql.len() && sql[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'/' if sql.get(i + 1) == Some(&b'*') => {
                let mut nest = 1;
                i += 2;
                while i < sql.len() && nest > 0 {
                    if sql[i] == b'/' && sql.get(i + 1) == Some(&b'*') {
                        nest += 1;
                        i += 2;
                    } else if sql[i] == b'*' && sql.get(i + 1) == Some(&b'/') {
                        nest -= 1;
                        i += 2;
                    } else {
                        i += 1;
                    }
                }
                continue;
            }
            b'\'' => {
                // E'…' (the E was the previous byte, directly before the quote) takes
                // backslash escapes; standard strings do not.
                let escapes = backslash_quotes
                    || (i > 0 && matches!(sql[i - 1], b'e' | b'E') && !is_ident_byte_before(sql, i - 1));
                i = skip_quoted(sql, i + 1, b'\'', escapes);
                has_token = true;
                prev_word = None;
                continue;
            }
            b'"' => {
                i = skip_quoted(sql, i + 1, b'"', false);
                has_token = true;
                prev_word = None;
                continue;
            }
            b'$' if !is_ident_byte_before(sql, i) => {
                if let Some(end) = dollar_tag_end(sql, i) {
                    let tag = &sql[i..end];
                    let body = end;
                    match find(&sql[body..], tag) {
                        Some(off) => i = body + off + tag.len(),
                        None => i = sql.len(),
                    }
                    has_token = true;
                    prev_word = None;
                    continue;
                }
                i += 1;
                has_token = true;
            }
            b'(' => {
                depth += 1;
                i += 1;
                has_token = true;
                prev_word = None;
            }
            b')' => {
                depth = depth.saturating_sub(1);
                i += 1;
                has_token = true;
                prev_word = None;
            }
            b';' if depth == 0 => {
                if has_token {
                    out.push(start..i);
                }
                i += 1;
                start = i;
                has_token = false;
                prev_word = None;
            }
            c if c.is_ascii_whitespace() => i += 1,
            c if is_ident_start(c) => {
                let w = i;
                while i < sql.len() && is_ident_byte(sql[i]) {
                    i += 1;
                }
                // An E'…' string: leave the E to the quote handling.
                if i - w == 1 && matches!(c, b'e' | b'E') && sql.get(i) == Some(&b'\'') {
                    has_token = true;
                    continue;
                }
                if sql[w..i].eq_ignore_ascii_case(b"atomic")
                    && prev_word
                        .as_ref()
                        .is_some_and(|p| sql[p.clone()].eq_ignore_ascii_case(b"begin"))
                {
                    return None;
                }
                prev_word = Some(w..i);
                has_token = true;
            }
            _ => {
                i += 1;
                has_token = true;
                prev_word = None;
            }
        }
    }
    if has_token {
        out.push(start..sql.len());
    }
    Some(out)
}

/// A statement name as written (its token, quotes included) and as PostgreSQL resolves it
/// (unquoted names folded to lower case).
#[derive(Debug, PartialEq, Eq)]
pub struct StmtName {
    pub at: Range<usize>,
    pub name: Vec<u8>,
}

/// A statement of a simple Query that pgsilo acts on under transaction pooling.
#[derive(Debug, PartialEq, Eq)]
pub enum SqlCommand {
    /// `PREPARE name [ ( types ) ] AS statement`: the definition is the text after the name.
    Prepare(StmtName),
    /// `EXECUTE name [ ( args ) ]`, alone or under `EXPLAIN [ options ]`.
    Execute(StmtName),
    /// `DEALLOCATE [ PREPARE ] name`.
    Deallocate(StmtName),
    /// `DEALLOCATE [ PREPARE ] ALL` or `DISCARD ALL`: every prepared statement goes.
    DropAll,
}

/// What one statement is, to pgsilo.
#[derive(Debug, PartialEq, Eq)]
pub enum Classified {
    Command(SqlCommand),
    /// Any other statement (or one of these in a form this module does not resolve, such
    /// as a `U&"…"` name): it goes to the server as it is.
    Other,
    /// One of these with a reserved word for a name: PostgreSQL rejects the whole query
    /// as a syntax error, which only the text as the client wrote it reproduces exactly.
    SyntaxError,
}

/// Looks at the first keyword of a statement (and, for the commands above, at the name
/// after it); everything else is the server's to judge.
pub fn classify(stmt: &[u8]) -> Classified {
    let mut t = Tokens { sql: stmt, at: 0 };
    let Some((Token::Word(first), _)) = t.next_token() else {
        return Classified::Other;
    };
    let word = |w: &[u8], kw: &[u8]| w.eq_ignore_ascii_case(kw);
    if word(&first, b"prepare") {
        let Some(name) = t.name() else {
            return Classified::Other;
        };
        // `PREPARE TRANSACTION 'gid'` (two-phase commit) is another statement; a statement
        // may still be called "transaction" (`PREPARE transaction AS …`).
        if name.name == b"transaction" && stmt[name.at.start] != b'"' {
            let mut after = Tokens { sql: stmt, at: t.at };
            after.skip_blank();
            let is_definition = match stmt.get(after.at) {
                Some(b'(') => true,
                _ => matches!(after.next_token(), Some((Token::Word(w), _)) if word(&w, b"as")),
            };
            if !is_definition {
                return Classified::Other;
            }
        }
        return checked(stmt, SqlCommand::Prepare(name));
    }
    if word(&first, b"execute") {
        return match t.name() {
            Some(name) => checked(stmt, SqlCommand::Execute(name)),
            None => Classified::Other,
        };
    }
    if word(&first, b"explain") {
        return explain(t);
    }
    if word(&first, b"deallocate") {
        let Some((mut tok, mut at)) = t.next_token() else {
            return Classified::Other;
        };
        if matches!(&tok, Token::Word(w) if word(w, b"prepare")) {
            // `DEALLOCATE prepare` alone deallocates a statement called "prepare".
            if let Some(next) = t.next_token() {
                (tok, at) = next;
            }
        }
        if t.next_token().is_some() {
            // More after the name: a syntax error the server reports as it is.
            return Classified::Other;
        }
        return match tok {
            Token::Word(w) if word(&w, b"all") => Classified::Command(SqlCommand::DropAll),
            Token::Word(w) => checked(
                stmt,
                SqlCommand::Deallocate(StmtName {
                    at,
                    name: w.to_ascii_lowercase(),
                }),
            ),
            Token::Quoted(name) if !name.is_empty() => {
                Classified::Command(SqlCommand::Deallocate(StmtName { at, name }))
            }
            _ => Classified::Other,
        };
    }
    if word(&first, b"discard") {
        if let Some((Token::Word(w), _)) = t.next_token() {
            if word(&w, b"all") && t.next_token().is_none() {
                return Classified::Command(SqlCommand::DropAll);
            }
        }
    }
    Classified::Other
}

/// `EXPLAIN [ ( options ) ] | [ ANALYZE ] [ VERBOSE ]` followed by EXECUTE.
fn explain(mut t: Tokens) -> Classified {
    t.skip_blank();
    if t.sql.get(t.at) == Some(&b'(') {
        let mut depth = 0usize;
        while let Some(&c) = t.sql.get(t.at) {
            match c {
                b'(' => depth += 1,
                b')' => depth -= 1,
                b'\'' | b'"' => {
                    t.at = skip_quoted(t.sql, t.at + 1, c, false);
                    continue;
                }
                _ => {}
            }
            t.at += 1;
            if depth == 0 {
                break;
            }
        }
    }
    loop {
        let Some((Token::Word(w), _)) = t.next_token() else {
            return Classified::Other;
        };
        if w.eq_ignore_ascii_case(b"execute") {
            return match t.name() {
                Some(name) => checked(t.sql, SqlCommand::Execute(name)),
                None => Classified::Other,
            };
        }
        if !(w.eq_ignore_ascii_case(b"analyze")
            || w.eq_ignore_ascii_case(b"analyse")
            || w.eq_ignore_ascii_case(b"verbose"))
        {
            return Classified::Other;
        }
    }
}

/// A command whose name is an unquoted reserved word is a syntax error.
fn checked(stmt: &[u8], cmd: SqlCommand) -> Classified {
    let name = match &cmd {
        SqlCommand::Prepare(n) | SqlCommand::Execute(n) | SqlCommand::Deallocate(n) => n,
        SqlCommand::DropAll => return Classified::Command(cmd),
    };
    if stmt[name.at.start] != b'"' && RESERVED.binary_search(&name.name.as_slice()).is_ok() {
        return Classified::SyntaxError;
    }
    Classified::Command(cmd)
}

/// PostgreSQL's reserved and type/function-name keywords (`pg_get_keywords()`, catcode R
/// and T): none of them can name a prepared statement unquoted. Sorted.
#[rustfmt::skip]
const RESERVED: &[&[u8]] = &[
    b"all", b"analyse", b"analyze", b"and", b"any", b"array", b"as", b"asc", b"asymmetric",
    b"authorization", b"binary", b"both", b"case", b"cast", b"check", b"collate", b"collation",
    b"column", b"concurrently", b"constraint", b"create", b"cross", b"current_catalog",
    b"current_date", b"current_role", b"current_schema", b"current_time", b"current_timestamp",
    b"current_user", b"default", b"deferrable", b"desc", b"distinct", b"do", b"else", b"end",
    b"except", b"false", b"fetch", b"for", b"foreign", b"freeze", b"from", b"full", b"grant",
    b"group", b"having", b"ilike", b"in", b"initially", b"inner", b"intersect", b"into", b"is",
    b"isnull", b"join", b"lateral", b"leading", b"left", b"like", b"limit", b"localtime",
    b"localtimestamp", b"natural", b"not", b"notnull", b"null", b"offset", b"on", b"only", b"or",
    b"order", b"outer", b"overlaps", b"placing", b"primary", b"references", b"returning", b"right",
    b"select", b"session_user", b"similar", b"some", b"symmetric", b"system_user", b"table",
    b"tablesample", b"then", b"to", b"trailing", b"true", b"union", b"unique", b"user", b"using",
    b"variadic", b"verbose", b"when", b"where", b"window", b"with",
];

/// What a `DEALLOCATE` statement names.
#[derive(Debug, PartialEq, Eq)]
pub enum Deallocate {
    All,
    /// The statement name as PostgreSQL resolves it (unquoted names folded to lower case).
    Name(Vec<u8>),
}

/// Recognises `DEALLOCATE [PREPARE] name` and `DEALLOCATE [PREPARE] ALL` (any case,
/// comments and whitespace anywhere, the name quoted or not).
pub fn parse_deallocate(stmt: &[u8]) -> Option<Deallocate> {
    let mut t = Tokens { sql: stmt, at: 0 };
    if !matches!(t.next_token(), Some((Token::Word(w), _)) if w.eq_ignore_ascii_case(b"deallocate")) {
        return None;
    }
    match classify(stmt) {
        Classified::Command(SqlCommand::Deallocate(n)) => Some(Deallocate::Name(n.name)),
        Classified::Command(SqlCommand::DropAll) => Some(Deallocate::All),
        _ => None,
    }
}

/// Whether `sql` may hold a PREPARE, EXECUTE or DEALLOCATE: the cheap test every simple
/// Query of transaction pooling passes through before any splitting (one comparison per
/// byte, a word comparison only at a p, e or d).
pub fn mentions_prepared_statements(sql: &[u8]) -> bool {
    sql.iter().enumerate().any(|(i, &c)| {
        let word: &[u8] = match c | 0x20 {
            b'p' => b"prepare",
            b'e' => b"execute",
            b'd' => b"deallocate",
            _ => return false,
        };
        sql.get(i..i + word.len()).is_some_and(|w| w.eq_ignore_ascii_case(word))
    })
}

/// A LISTEN or UNLISTEN statement, its channel as PostgreSQL resolves it (unquoted names
/// folded to lower case).
#[derive(Debug, PartialEq, Eq)]
pub enum ListenStmt {
    Listen(Vec<u8>),
    Unlisten(Vec<u8>),
    UnlistenAll,
}

/// The statements of a simple Query made only of `LISTEN ch`, `UNLISTEN ch` and
/// `UNLISTEN *`; None when anything else is in it (or a channel this module does not
/// resolve, such as a `U&"…"` name), and for an empty query. pgsilo answers such a query
/// itself under transaction pooling; anything else goes to the server as it is.
pub fn listen_only(sql: &[u8]) -> Option<Vec<ListenStmt>> {
    let ranges = split_statements(sql, false)?;
    if ranges.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        let stmt = &sql[r];
        let mut t = Tokens { sql: stmt, at: 0 };
        let Some((Token::Word(first), _)) = t.next_token() else {
            return None;
        };
        let listen = if first.eq_ignore_ascii_case(b"listen") {
            true
        } else if first.eq_ignore_ascii_case(b"unlisten") {
            false
        } else {
            return None;
        };
        t.skip_blank();
        if !listen && stmt.get(t.at) == Some(&b'*') {
            t.at += 1;
            t.skip_blank();
            if t.at != stmt.len() {
                return None;
            }
            out.push(ListenStmt::UnlistenAll);
            continue;
        }
        let name = t.name()?;
        t.skip_blank();
        if t.at != stmt.len() {
            return None;
        }
        if stmt[name.at.start] != b'"' && RESERVED.binary_search(&name.name.as_slice()).is_ok() {
            // A syntax error: the server says so in its own words.
            return None;
        }
        out.push(if listen {
            ListenStmt::Listen(name.name)
        } else {
            ListenStmt::Unlisten(name.name)
        });
    }
    Some(out)
}

/// Whether `sql` may be a query [`listen_only`] accepts: its first statement begins with
/// LISTEN or UNLISTEN. The cheap test run on every simple Query: it looks at the first
/// word only (after blanks, comments and empty statements), not the whole text.
pub fn may_be_listen_only(sql: &[u8]) -> bool {
    let mut t = Tokens { sql, at: 0 };
    loop {
        t.skip_blank();
        if t.sql.get(t.at) == Some(&b';') {
            t.at += 1;
        } else {
            break;
        }
    }
    let rest = &sql[t.at..];
    let starts = |word: &[u8]| rest.get(..word.len()).is_some_and(|w| w.eq_ignore_ascii_case(word));
    starts(b"listen") || starts(b"unlisten")
}

enum Token {
    Word(Vec<u8>),
    Quoted(Vec<u8>),
}

struct Tokens<'a> {
    sql: &'a [u8],
    at: usize,
}

impl Tokens<'_> {
    fn skip_blank(&mut self) {
        loop {
            let s = &self.sql[self.at..];
            if s.first().is_some_and(|c| c.is_ascii_whitespace()) {
                self.at += 1;
            } else if s.starts_with(b"--") {
                while self.at < self.sql.len() && self.sql[self.at] != b'\n' {
                    self.at += 1;
                }
            } else if s.starts_with(b"/*") {
                let mut nest = 0;
                while self.at < self.sql.len() {
                    let r = &self.sql[self.at..];
                    if r.starts_with(b"/*") {
                        nest += 1;
                        self.at += 2;
                    } else if r.starts_with(b"*/") {
                        nest -= 1;
                        self.at += 2;
                        if nest == 0 {
                            break;
                        }
                    } else {
                        self.at += 1;
                    }
                }
            } else {
                return;
            }
        }
    }

    /// The next statement name, if the next token is one.
    fn name(&mut self) -> Option<StmtName> {
        match self.next_token()? {
            (Token::Word(w), at) => Some(StmtName {
                at,
                name: w.to_ascii_lowercase(),
            }),
            (Token::Quoted(name), at) if !name.is_empty() => Some(StmtName { at, name }),
            _ => None,
        }
    }

    /// The next word or quoted identifier and where it is; None for anything else.
    fn next_token(&mut self) -> Option<(Token, Range<usize>)> {
        self.skip_blank();
        let start = self.at;
        let c = *self.sql.get(self.at)?;
        if c == b'"' {
            let mut name = Vec::new();
            let mut i = self.at + 1;
            loop {
                match self.sql.get(i) {
                    Some(b'"') if self.sql.get(i + 1) == Some(&b'"') => {
                        name.push(b'"');
                        i += 2;
                    }
                    Some(b'"') => {
                        self.at = i + 1;
                        return Some((Token::Quoted(name), start..self.at));
                    }
                    Some(&b) => {
                        name.push(b);
                        i += 1;
                    }
                    None => return None,
                }
            }
        }
        if is_ident_start(c) {
            while self.at < self.sql.len() && is_ident_byte(self.sql[self.at]) {
                self.at += 1;
            }
            // U&"…", E'…' and the like are not names this module resolves.
            if self.sql.get(self.at).is_some_and(|b| matches!(b, b'"' | b'\'' | b'&')) {
                return None;
            }
            return Some((Token::Word(self.sql[start..self.at].to_vec()), start..self.at));
        }
        None
    }
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

/// The byte before `i` continues an identifier (so a `$` or `E` at `i` is part of it).
fn is_ident_byte_before(sql: &[u8], i: usize) -> bool {
    i > 0 && is_ident_byte(sql[i - 1])
}

/// Past the closing quote of a quoted run that starts at `i` (just after the opening one).
fn skip_quoted(sql: &[u8], mut i: usize, quote: u8, escapes: bool) -> usize {
    while i < sql.len() {
        let c = sql[i];
        if escapes && c == b'\\' {
            i += 2;
            continue;
        }
        if c == quote {
            if sql.get(i + 1) == Some(&quote) {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i += 1;
    }
    sql.len()
}

/// `$tag$` starting at `i`: the index just past its closing `$`.
fn dollar_tag_end(sql: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    if sql.get(j).is_some_and(|c| c.is_ascii_digit()) {
        return None; // a parameter ($1), not a tag
    }
    while j < sql.len() && sql[j] != b'$' {
        if !(sql[j].is_ascii_alphanumeric() || sql[j] == b'_' || sql[j] >= 0x80) {
            return None;
        }
        j += 1;
    }
    (j < sql.len()).then_some(j + 1)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stmts(sql: &str) -> Vec<&str> {
        split_statements(sql.as_bytes(), false)
            .unwrap()
            .into_iter()
            .map(|r| sql[r].trim())
            .collect()
    }

    #[test]
    fn splits_at_top_level_semicolons_only() {
        assert_eq!(stmts("select 1; select 2"), ["select 1", "select 2"]);
        assert_eq!(stmts("select ';'; select \"a;b\""), ["select ';'", "select \"a;b\""]);
        assert_eq!(stmts("select E'\\';'; select 2"), ["select E'\\';'", "select 2"]);
        assert_eq!(stmts("select 'it''s;'; select 2;"), ["select 'it''s;'", "select 2"]);
        assert_eq!(
            stmts("select $$a;b$$; select $x$ $$; $x$"),
            ["select $$a;b$$", "select $x$ $$; $x$"]
        );
        assert_eq!(
            stmts("select 1 -- ;\n; /* ; /* ; */ ; */ select 2"),
            ["select 1 -- ;", "/* ; /* ; */ ; */ select 2"]
        );
        assert_eq!(
            stmts("create rule r as on insert to t do also (select 1; select 2); select 3"),
            [
                "create rule r as on insert to t do also (select 1; select 2)",
                "select 3"
            ]
        );
        assert_eq!(stmts("select $1; select a$b"), ["select $1", "select a$b"]);
    }

    #[test]
    fn empty_statements_are_not_statements() {
        assert_eq!(stmts(";; select 1;;; -- x\n ;"), ["select 1"]);
        assert!(stmts("  ").is_empty());
        assert!(stmts("/* only */").is_empty());
    }

    #[test]
    fn a_standard_function_body_is_not_followed() {
        let sql = b"create function f() returns int begin atomic select 1; end; select 2";
        assert_eq!(split_statements(sql, false), None);
    }

    #[test]
    fn backslashes_escape_in_plain_strings_when_strings_are_not_standard() {
        let sql = b"select '\\'; select 1; --'";
        assert_eq!(split_statements(sql, true).unwrap().len(), 1);
        assert_eq!(split_statements(sql, false).unwrap().len(), 2);
    }

    #[test]
    fn recognises_deallocate_forms() {
        let name = |s: &str| Some(Deallocate::Name(s.as_bytes().to_vec()));
        assert_eq!(parse_deallocate(b"DEALLOCATE _pg3_0"), name("_pg3_0"));
        assert_eq!(parse_deallocate(b"deallocate prepare S1"), name("s1"));
        assert_eq!(parse_deallocate(b" Deallocate \"S\"\"1\" "), name("S\"1"));
        assert_eq!(parse_deallocate(b"/* x */ DEALLOCATE -- y\n s1"), name("s1"));
        assert_eq!(parse_deallocate(b"DEALLOCATE ALL"), Some(Deallocate::All));
        assert_eq!(parse_deallocate(b"deallocate prepare all"), Some(Deallocate::All));
        assert_eq!(parse_deallocate(b"deallocate \"all\""), name("all"));
        assert_eq!(parse_deallocate(b"deallocate prepare"), name("prepare"));
        assert_eq!(parse_deallocate(b"deallocate s1 s2"), None);
        assert_eq!(parse_deallocate(b"deallocate"), None);
        assert_eq!(parse_deallocate(b"select 1"), None);
        assert_eq!(parse_deallocate(b"deallocate U&\"x\""), None);
        assert!(mentions_prepared_statements(b"select 1; DeAlLoCaTe x"));
    }

    fn command(sql: &str) -> Classified {
        classify(sql.as_bytes())
    }

    fn named(at: Range<usize>, name: &str) -> StmtName {
        StmtName {
            at,
            name: name.as_bytes().to_vec(),
        }
    }

    #[test]
    fn recognises_prepared_statement_commands_by_their_first_keyword() {
        use Classified::*;
        use SqlCommand::*;
        assert_eq!(command("PREPARE p AS SELECT 1"), Command(Prepare(named(8..9, "p"))));
        assert_eq!(
            command(" prepare /* c */ \"My P\"(int) as select $1"),
            Command(Prepare(named(17..23, "My P")))
        );
        assert_eq!(command("Prepare Q1 AS select 1"), Command(Prepare(named(8..10, "q1"))));
        assert_eq!(command("EXECUTE p"), Command(Execute(named(8..9, "p"))));
        assert_eq!(command("execute P(1, 'x')"), Command(Execute(named(8..9, "p"))));
        assert_eq!(
            command("EXPLAIN (ANALYZE, COSTS off) EXECUTE p(1)"),
            Command(Execute(named(37..38, "p")))
        );
        assert_eq!(
            command("explain analyze verbose execute p"),
            Command(Execute(named(32..33, "p")))
        );
        assert_eq!(command("DEALLOCATE PREPARE p"), Command(Deallocate(named(19..20, "p"))));
        assert_eq!(command("deallocate \"P\""), Command(Deallocate(named(11..14, "P"))));
        assert_eq!(command("DEALLOCATE ALL"), Command(DropAll));
        assert_eq!(command("discard all"), Command(DropAll));
        // Not these commands.
        assert_eq!(command("PREPARE TRANSACTION 'x'"), Other);
        assert_eq!(
            command("prepare transaction as select 1"),
            Command(Prepare(named(8..19, "transaction")))
        );
        assert_eq!(
            command("prepare transaction(int) as select 1"),
            Command(Prepare(named(8..19, "transaction")))
        );
        assert_eq!(command("select 'PREPARE p AS x'"), Other);
        assert_eq!(command("explain select 1"), Other);
        assert_eq!(command("discard plans"), Other);
        assert_eq!(command("create table t as execute p"), Other);
        assert_eq!(command("execute U&\"p\""), Other);
        assert_eq!(command("EXECUTE"), Other);
        // A reserved word as a name: the server's syntax error, from the text as it is.
        assert_eq!(command("PREPARE select AS SELECT 1"), SyntaxError);
        assert_eq!(command("execute left"), SyntaxError);
        assert_eq!(command("execute \"left\""), Command(Execute(named(8..14, "left"))));
        assert!(RESERVED.windows(2).all(|w| w[0] < w[1]), "sorted, for binary search");
    }

    #[test]
    fn finds_the_keywords_cheaply() {
        assert!(mentions_prepared_statements(b"PREPARE p AS SELECT 1"));
        assert!(mentions_prepared_statements(b"select 1; eXeCuTe p"));
        assert!(mentions_prepared_statements(b"DEALLOCATE p"));
        // Only a first filter: the statements are then classified.
        assert!(mentions_prepared_statements(b"select prepared from t"));
        assert!(!mentions_prepared_statements(b"select 1"));
        assert!(!mentions_prepared_statements(b"prepar"));
    }

    /// Client bytes of any kind: never a panic, ranges always inside the text and in order.
    #[test]
    fn arbitrary_bytes_never_panic() {
        const PIECES: &[&[u8]] = &[
            b"'",
            b"\"",
            b"$",
            b"$a$",
            b"$$",
            b"--",
            b"\n",
            b"/*",
            b"*/",
            b";",
            b"(",
            b")",
            b"E",
            b"e'",
            b"\\",
            b"deallocate",
            b"DEALLOCATE ",
            b"execute ",
            b"EXPLAIN (",
            b"PREPARE ",
            b"transaction",
            b"select",
            b"prepare",
            b"all",
            b"begin atomic",
            b" ",
            b"x",
            b"\xff",
            b"U&",
        ];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..50_000 {
            let mut sql = Vec::new();
            for _ in 0..(next() % 12) {
                sql.extend_from_slice(PIECES[(next() % PIECES.len() as u64) as usize]);
            }
            for backslash in [false, true] {
                if let Some(ranges) = split_statements(&sql, backslash) {
                    let mut end = 0;
                    for r in ranges {
                        assert!(r.start >= end && r.end <= sql.len() && r.start <= r.end, "{sql:?}");
                        end = r.end;
                        let _ = parse_deallocate(&sql[r.clone()]);
                        let _ = classify(&sql[r]);
                    }
                }
            }
            let _ = parse_deallocate(&sql);
            let _ = mentions_prepared_statements(&sql);
            let _ = classify(&sql);
        }
    }

    #[test]
    fn a_query_of_only_listen_and_unlisten_is_recognised_with_postgres_names() {
        use ListenStmt::*;
        assert_eq!(
            listen_only(b"LISTEN Foo; unlisten \"Bar\"\"x\"; /* c */ UNLISTEN * ;"),
            Some(vec![Listen(b"foo".to_vec()), Unlisten(b"Bar\"x".to_vec()), UnlistenAll])
        );
        assert_eq!(listen_only(b"listen a -- why\n"), Some(vec![Listen(b"a".to_vec())]));
        assert_eq!(listen_only(b"LISTEN a; SELECT 1"), None, "mixed: to the server");
        assert_eq!(listen_only(b"LISTEN select"), None, "a syntax error is the server's");
        assert_eq!(listen_only(b"LISTEN a b"), None);
        assert_eq!(listen_only(b"LISTEN"), None);
        assert_eq!(listen_only(b"NOTIFY a"), None);
        assert_eq!(listen_only(b""), None);
        // The quick test before it: only the first word counts, and it lets through
        // everything listen_only accepts.
        assert!(may_be_listen_only(b"  /* c */ -- x\n ;; Listen x") && may_be_listen_only(b"unLISTEN *"));
        assert!(!may_be_listen_only(b"select 1; Listen x") && !may_be_listen_only(b"select 1"));
        assert!(!may_be_listen_only(b"") && !may_be_listen_only(b"LISTE"));
        for q in [
            &b"LISTEN Foo; unlisten \"Bar\"\"x\"; /* c */ UNLISTEN * ;"[..],
            b"listen a -- why\n",
            b"; LISTEN a",
        ] {
            if listen_only(q).is_some() {
                assert!(may_be_listen_only(q), "{}", String::from_utf8_lossy(q));
            }
        }
    }
}
