//! Named prepared statements under transaction pooling.
//!
//! A client's statement names mean nothing to the next server it lands on. pgsilo keeps
//! each client's definitions, prepares them on servers under names of its own derived
//! from the definition, so identical statements from different clients share one
//! server-side statement, prepares them again on a server that lacks them, and rewrites
//! the names: in Bind, Describe and Close for protocol-level statements (`pgsilo_<hash>`),
//! in EXECUTE and DEALLOCATE for SQL-level ones (`PREPARE`, `pgsilo_s<hash>`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use sha2::{Digest, Sha256};

use super::sql_scan::{classify, Classified, SqlCommand};
use crate::pool::prepared::{stamp, Stamp, StmtHash};
use crate::protocol::backend::message;
use crate::protocol::framing::read_cstr;

/// A statement as the client defined it.
pub struct StmtDef {
    pub hash: StmtHash,
    /// `pgsilo_` + 32 hex digits, NUL-terminated, ready to splice into messages.
    pub server_name: [u8; 40],
    /// The Parse body after the statement name: query text and parameter types.
    pub body: Box<[u8]>,
    /// When the client prepared it (or last learned its result shape again): a server's
    /// copy made earlier may predate a schema change the client's statement already
    /// sees, and is not used for it.
    pub born: Cell<Stamp>,
    /// The statement is an SQL `PREPARE`, `EXECUTE` or `DEALLOCATE` of a name: see
    /// [`NamedCommand`].
    pub command: Option<NamedCommand>,
}

/// Which SQL command a statement's text is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandKind {
    Prepare,
    Execute,
    Deallocate,
}

/// A protocol-level statement whose text is an SQL command naming a prepared statement
/// (psycopg prepares a query it runs often, `EXECUTE p(1)` and `PREPARE p AS …` too).
/// PostgreSQL resolves the name each time the statement runs, and the name is the
/// client's, which servers know under pgsilo's: each Bind runs a statement derived from
/// this one with pgsilo's name for what the client's name stands for then (kept while
/// that stays the same).
pub struct NamedCommand {
    pub kind: CommandKind,
    /// The name as PostgreSQL resolves it, and where it is in the text.
    pub name: Box<[u8]>,
    pub at: std::ops::Range<usize>,
    derived: RefCell<Option<Derived>>,
}

/// The statement a [`NamedCommand`] was last bound as.
struct Derived {
    /// pgsilo's name in place of the client's.
    name: Box<[u8]>,
    def: Rc<StmtDef>,
}

impl NamedCommand {
    /// The command in a Parse body (query text, NUL, parameter types), if it is one.
    pub fn of(body: &[u8]) -> Option<NamedCommand> {
        let text = read_cstr(body, 0).map_or(&[][..], |(text, _)| text);
        let (kind, n) = match classify(text) {
            Classified::Command(SqlCommand::Prepare(n)) => (CommandKind::Prepare, n),
            Classified::Command(SqlCommand::Execute(n)) => (CommandKind::Execute, n),
            Classified::Command(SqlCommand::Deallocate(n)) => (CommandKind::Deallocate, n),
            _ => return None,
        };
        Some(NamedCommand {
            kind,
            name: n.name.into(),
            at: n.at,
            derived: RefCell::new(None),
        })
    }
}

/// `body` with the name at `at` replaced by `name`.
pub fn renamed(body: &[u8], at: &std::ops::Range<usize>, name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + name.len());
    out.extend_from_slice(&body[..at.start]);
    out.extend_from_slice(name);
    out.extend_from_slice(&body[at.end..]);
    out
}

/// The top bit of a statement's hash says that it is a client's SQL-level statement
/// (`PREPARE`) rather than a protocol-level one (Parse). The bit decides the name of its
/// copies on servers, so a copy's name follows from its hash alone: whatever closes or
/// evicts copies needs nothing else, and the two kinds can never share a name.
pub const SQL_LEVEL: StmtHash = 1 << 127;

/// A cryptographic hash: statements are shared between clients by hash, so a collision
/// must not be something a client can construct. `domain` keeps the two kinds apart.
fn digest(domain: &[u8], body: &[u8]) -> StmtHash {
    let digest = Sha256::new().chain_update(domain).chain_update(body).finalize();
    let mut h = [0u8; 16];
    h.copy_from_slice(&digest[..16]);
    u128::from_be_bytes(h)
}

impl StmtDef {
    pub fn new(body: &[u8]) -> StmtDef {
        let mut def = StmtDef::plain(body);
        def.command = NamedCommand::of(body);
        def
    }

    fn plain(body: &[u8]) -> StmtDef {
        let hash = digest(b"", body) & !SQL_LEVEL;
        StmtDef {
            hash,
            server_name: server_name(hash),
            body: body.into(),
            born: Cell::new(stamp()),
            command: None,
        }
    }

    /// For a statement that is an SQL command naming a prepared statement: the same
    /// statement with `name` (pgsilo's) in place of the client's.
    pub fn naming(&self, name: &[u8]) -> Option<Rc<StmtDef>> {
        let cmd = self.command.as_ref()?;
        let mut derived = cmd.derived.borrow_mut();
        if let Some(d) = derived.as_ref().filter(|d| *d.name == *name) {
            return Some(d.def.clone());
        }
        let def = Rc::new(StmtDef::plain(&renamed(&self.body, &cmd.at, name)));
        *derived = Some(Derived {
            name: name.into(),
            def: def.clone(),
        });
        Some(def)
    }

    /// The server name without its NUL.
    pub fn name(&self) -> &[u8] {
        &self.server_name[..39]
    }
}

/// The name of a statement's copies on servers, NUL-terminated: `pgsilo_` and 32 hex
/// digits for a protocol-level statement (the first digit below 8: the top bit is clear),
/// `pgsilo_s` and 31 for an SQL-level one (its hash has no other bits above those).
pub fn server_name(hash: StmtHash) -> [u8; 40] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = [0u8; 40];
    let (prefix, digits): (&[u8], usize) = if hash & SQL_LEVEL != 0 {
        (b"pgsilo_s", 31)
    } else {
        (b"pgsilo_", 32)
    };
    n[..prefix.len()].copy_from_slice(prefix);
    for i in 0..digits {
        n[prefix.len() + i] = HEX[((hash >> (4 * (digits - 1 - i))) & 0xf) as usize];
    }
    n
}

/// A client's SQL-level statement: `PREPARE name [ ( types ) ] AS statement`.
pub struct SqlDef {
    pub hash: StmtHash,
    /// `pgsilo_s` + 31 hex digits, NUL-terminated.
    pub server_name: [u8; 40],
    /// What follows the name in the client's PREPARE, without the whitespace around it:
    /// `[ ( types ) ] AS statement`. The name is not part of it, so clients that prepare
    /// the same statement under different names share one copy on a server.
    pub definition: Box<[u8]>,
    /// When the client prepared it: a server's copy made earlier may predate a schema
    /// change the client's PREPARE already saw, and is not used for it.
    pub born: Stamp,
}

impl SqlDef {
    pub fn new(definition: &[u8]) -> SqlDef {
        let definition = definition.trim_ascii();
        // The SQL-level bit set, and no other bit above the 124 the name shows.
        let hash = (digest(b"PREPARE\0", definition) & !(0xf << 124)) | SQL_LEVEL;
        SqlDef {
            hash,
            server_name: server_name(hash),
            definition: definition.into(),
            born: stamp(),
        }
    }

    /// The server name without its NUL.
    pub fn name(&self) -> &[u8] {
        &self.server_name[..39]
    }
}

/// One client's named statements. Protocol-level and SQL-level statements share one
/// namespace in PostgreSQL: a name is taken by either kind.
#[derive(Default)]
pub struct ClientStatements {
    by_name: HashMap<Box<[u8]>, Rc<StmtDef>>,
    sql: HashMap<Box<[u8]>, Rc<SqlDef>>,
}

impl ClientStatements {
    /// Whether the client has a statement of this name, of either kind.
    pub fn has_name(&self, name: &[u8]) -> bool {
        self.by_name.contains_key(name) || self.sql.contains_key(name)
    }

    pub fn sql_get(&self, name: &[u8]) -> Option<&Rc<SqlDef>> {
        self.sql.get(name)
    }

    pub fn sql_insert(&mut self, name: &[u8], def: Rc<SqlDef>) {
        self.sql.insert(name.into(), def);
    }

    pub fn sql_remove(&mut self, name: &[u8]) -> Option<Rc<SqlDef>> {
        self.sql.remove(name)
    }

    pub fn get(&self, name: &[u8]) -> Option<&Rc<StmtDef>> {
        self.by_name.get(name)
    }

    pub fn insert(&mut self, name: &[u8], def: Rc<StmtDef>) {
        self.by_name.insert(name.into(), def);
    }

    pub fn remove(&mut self, name: &[u8]) {
        self.by_name.remove(name);
    }

    pub fn clear(&mut self) {
        self.by_name.clear();
        self.sql.clear();
    }

    pub fn len(&self) -> usize {
        self.by_name.len() + self.sql.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty() && self.sql.is_empty()
    }
}

/// The client's unnamed statement. PostgreSQL keeps it until the next Parse of the
/// unnamed statement or a simple Query; under transaction pooling a later Bind may reach a
/// server whose unnamed statement is another client's, so pgsilo keeps the definition
/// and prepares it again there.
#[derive(Default)]
pub struct UnnamedStmt {
    body: Vec<u8>,
    hash: u64,
    valid: bool,
    /// The statement EXECUTEs this SQL-level statement of the client's (the body names
    /// its copies): a server needs a copy before it can run it.
    needs: Option<Rc<SqlDef>>,
}

/// Per-process keys: a client cannot construct another client's identity.
static UNNAMED_KEYS: std::sync::LazyLock<std::collections::hash_map::RandomState> =
    std::sync::LazyLock::new(std::collections::hash_map::RandomState::new);

impl UnnamedStmt {
    /// Records a Parse of the unnamed statement; returns its identity. Reuses the
    /// buffer, so extended-protocol traffic does not allocate per transaction.
    pub fn set(&mut self, body: &[u8]) -> u64 {
        use std::hash::BuildHasher;
        self.body.clear();
        self.body.extend_from_slice(body);
        self.hash = UNNAMED_KEYS.hash_one(body);
        self.valid = true;
        self.needs = None;
        self.hash
    }

    /// As [`UnnamedStmt::set`], for a statement that EXECUTEs `sql`.
    pub fn set_executing(&mut self, body: &[u8], sql: Rc<SqlDef>) -> u64 {
        let hash = self.set(body);
        self.needs = Some(sql);
        hash
    }

    pub fn needs(&self) -> Option<&Rc<SqlDef>> {
        self.needs.as_ref().filter(|_| self.valid)
    }

    /// A simple Query destroys the unnamed statement.
    pub fn invalidate(&mut self) {
        self.valid = false;
    }

    pub fn current(&self) -> Option<(u64, &[u8])> {
        self.valid.then_some((self.hash, self.body.as_slice()))
    }
}

pub fn write_unnamed_parse(out: &mut Vec<u8>, body: &[u8]) {
    message(out, b'P', |b| {
        b.push(0);
        b.extend_from_slice(body);
    });
}

/// Parse: (statement name, body after the name).
pub fn split_parse(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let (name, at) = read_cstr(body, 0)?;
    Some((name, &body[at..]))
}

/// Bind: (offset of the statement name, the name, offset just after its NUL).
pub fn bind_statement(body: &[u8]) -> Option<(usize, &[u8], usize)> {
    let (_, at) = read_cstr(body, 0)?;
    let (name, end) = read_cstr(body, at)?;
    Some((at, name, end))
}

/// Describe / Close: ('S' or 'P', name).
pub fn target(body: &[u8]) -> Option<(u8, &[u8])> {
    let kind = *body.first()?;
    let (name, _) = read_cstr(body, 1)?;
    Some((kind, name))
}

pub fn write_parse(out: &mut Vec<u8>, def: &StmtDef) {
    message(out, b'P', |b| {
        b.extend_from_slice(&def.server_name);
        b.extend_from_slice(&def.body);
    });
}

pub fn write_close_statement(out: &mut Vec<u8>, hash: StmtHash) {
    message(out, b'C', |b| {
        b.push(b'S');
        b.extend_from_slice(&server_name(hash));
    });
}

/// Describe of a statement under its server name (NUL-terminated).
pub fn write_describe_statement(out: &mut Vec<u8>, server_name: &[u8; 40]) {
    message(out, b'D', |b| {
        b.push(b'S');
        b.extend_from_slice(server_name);
    });
}

/// The start of a Bind with the statement name replaced by `server_name`
/// (NUL-terminated): header (with the length adjusted for the new name), portal name,
/// new statement name. The caller appends the rest of the original body (from
/// `name_end`), which may still be arriving.
pub fn write_bind_prefix(
    out: &mut Vec<u8>,
    original_len: u32,
    body_prefix: &[u8],
    name_at: usize,
    name_end: usize,
    server_name: &[u8; 40],
) {
    let old = (name_end - name_at) as i64;
    let new = server_name.len() as i64;
    let len = (original_len as i64 - old + new) as u32;
    out.push(b'B');
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body_prefix[..name_at]);
    out.extend_from_slice(server_name);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::framing::{scan, Scan};

    #[test]
    fn identical_definitions_share_a_server_name() {
        let a = StmtDef::new(b"select $1\0\0\x01\0\0\0\x17");
        let b = StmtDef::new(b"select $1\0\0\x01\0\0\0\x17");
        let c = StmtDef::new(b"select $1\0\0\x01\0\0\0\x14");
        assert_eq!(a.server_name, b.server_name);
        assert_ne!(a.server_name, c.server_name);
        assert!(a.name().starts_with(b"pgsilo_"));
        assert_eq!(a.server_name[39], 0);
    }

    #[test]
    fn sql_level_statements_have_names_of_their_own() {
        let a = SqlDef::new(b" (int) AS select $1 \n");
        let b = SqlDef::new(b"(int) AS select $1");
        assert_eq!(a.server_name, b.server_name, "shared, whatever the client called it");
        assert!(a.name().starts_with(b"pgsilo_s"));
        assert_eq!(a.server_name[39], 0);
        assert_eq!(server_name(a.hash), a.server_name);
        // The same text prepared with the protocol is another statement.
        let p = StmtDef::new(b"(int) AS select $1");
        assert_eq!(p.hash & SQL_LEVEL, 0);
        assert_ne!(&p.name()[..8], b"pgsilo_s");
        assert!((b'0'..=b'7').contains(&p.name()[7]));
    }

    #[test]
    fn rewrites_a_bind_statement_name() {
        let def = StmtDef::new(b"select 1\0\0\0");
        // portal "", statement "P_0", then 0 formats, 0 params, 0 result formats
        let body = b"\0P_0\0\0\0\0\0\0\0";
        let (at, name, end) = bind_statement(body).unwrap();
        assert_eq!(name, b"P_0");
        let mut out = Vec::new();
        write_bind_prefix(&mut out, (body.len() + 4) as u32, body, at, end, &def.server_name);
        out.extend_from_slice(&body[end..]);
        match scan(&out) {
            Scan::Whole(h) => {
                assert_eq!(h.total(), out.len());
                let (_, n2, _) = bind_statement(&out[5..]).unwrap();
                assert_eq!(n2, def.name());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_targets_and_parse_bodies() {
        assert_eq!(target(b"Sfoo\0"), Some((b'S', &b"foo"[..])));
        assert_eq!(target(b"S"), None);
        assert_eq!(
            split_parse(b"s1\0select 1\0\0\0"),
            Some((&b"s1"[..], &b"select 1\0\0\0"[..]))
        );
    }
}
