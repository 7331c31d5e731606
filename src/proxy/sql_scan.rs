//! Just enough of PostgreSQL's lexer to find the statements of a simple Query and to
//! recognise `DEALLOCATE [PREPARE] name | ALL`, the one statement pgsilo must act on
//! under transaction pooling (a client's protocol-level statement names mean nothing to
//! the server it lands on).
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
    if !t.next_word()?.eq_ignore_ascii_case(b"deallocate") {
        return None;
    }
    let mut tok = t.next_token()?;
    if let Token::Word(w) = &tok {
        if w.eq_ignore_ascii_case(b"prepare") {
            // `DEALLOCATE prepare` alone deallocates a statement called "prepare".
            match t.next_token() {
                Some(next) => tok = next,
                None => return Some(Deallocate::Name(b"prepare".to_vec())),
            }
        }
    }
    if t.next_token().is_some() {
        return None;
    }
    match tok {
        Token::Word(w) if w.eq_ignore_ascii_case(b"all") => Some(Deallocate::All),
        Token::Word(w) => Some(Deallocate::Name(w.to_ascii_lowercase())),
        Token::Quoted(name) if !name.is_empty() => Some(Deallocate::Name(name)),
        Token::Quoted(_) => None,
    }
}

/// Whether `sql` may hold a DEALLOCATE: a cheap test before any splitting.
pub fn mentions_deallocate(sql: &[u8]) -> bool {
    const WORD: &[u8] = b"deallocate";
    let Some(last) = sql.len().checked_sub(WORD.len()) else {
        return false;
    };
    // One comparison per byte on every simple Query of transaction pooling.
    (0..=last).any(|i| sql[i] | 0x20 == b'd' && sql[i..i + WORD.len()].eq_ignore_ascii_case(WORD))
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

    fn next_word(&mut self) -> Option<Vec<u8>> {
        match self.next_token()? {
            Token::Word(w) => Some(w),
            Token::Quoted(_) => None,
        }
    }

    fn next_token(&mut self) -> Option<Token> {
        self.skip_blank();
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
                        return Some(Token::Quoted(name));
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
            let w = self.at;
            while self.at < self.sql.len() && is_ident_byte(self.sql[self.at]) {
                self.at += 1;
            }
            // U&"…" and the like are not names this module resolves.
            if self.sql.get(self.at).is_some_and(|b| matches!(b, b'"' | b'\'' | b'&')) {
                return None;
            }
            return Some(Token::Word(self.sql[w..self.at].to_vec()));
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
        assert!(mentions_deallocate(b"select 1; DeAlLoCaTe x"));
        assert!(!mentions_deallocate(b"select 1"));
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
                        let _ = parse_deallocate(&sql[r]);
                    }
                }
            }
            let _ = parse_deallocate(&sql);
            let _ = mentions_deallocate(&sql);
        }
    }
}
