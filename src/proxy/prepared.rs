//! Protocol-level named prepared statements under transaction pooling.
//!
//! A client's statement names mean nothing to the next server it lands on. pgsilo keeps
//! each client's definitions, prepares them on servers under names of its own derived
//! from the definition (`pgsilo_<hash>`, so identical statements from different clients
//! share one server-side statement), prepares them again on a server that lacks them,
//! and rewrites the names in Bind, Describe and Close.

use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;

use sha2::{Digest, Sha256};

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
}

impl StmtDef {
    pub fn new(body: &[u8]) -> StmtDef {
        // A cryptographic hash: statements are shared between clients by hash, so a
        // collision must not be something a client can construct.
        let digest = Sha256::digest(body);
        let mut h = [0u8; 16];
        h.copy_from_slice(&digest[..16]);
        let hash = u128::from_be_bytes(h);
        StmtDef {
            hash,
            server_name: server_name(hash),
            body: body.into(),
            born: Cell::new(stamp()),
        }
    }

    /// The server name without its NUL.
    pub fn name(&self) -> &[u8] {
        &self.server_name[..39]
    }
}

pub fn server_name(hash: StmtHash) -> [u8; 40] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = [0u8; 40];
    n[..7].copy_from_slice(b"pgsilo_");
    for i in 0..32 {
        n[7 + i] = HEX[((hash >> (124 - 4 * i)) & 0xf) as usize];
    }
    n
}

/// One client's named statements.
#[derive(Default)]
pub struct ClientStatements {
    by_name: HashMap<Box<[u8]>, Rc<StmtDef>>,
}

impl ClientStatements {
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
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
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
        self.hash
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

pub fn write_describe_statement(out: &mut Vec<u8>, def: &StmtDef) {
    message(out, b'D', |b| {
        b.push(b'S');
        b.extend_from_slice(&def.server_name);
    });
}

/// The start of a Bind with the statement name replaced: header (with the length
/// adjusted for the new name), portal name, new statement name. The caller appends the
/// rest of the original body (from `rest_at`), which may still be arriving.
pub fn write_bind_prefix(
    out: &mut Vec<u8>,
    original_len: u32,
    body_prefix: &[u8],
    name_at: usize,
    name_end: usize,
    def: &StmtDef,
) {
    let old = (name_end - name_at) as i64;
    let new = def.server_name.len() as i64;
    let len = (original_len as i64 - old + new) as u32;
    out.push(b'B');
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body_prefix[..name_at]);
    out.extend_from_slice(&def.server_name);
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
    fn rewrites_a_bind_statement_name() {
        let def = StmtDef::new(b"select 1\0\0\0");
        // portal "", statement "P_0", then 0 formats, 0 params, 0 result formats
        let body = b"\0P_0\0\0\0\0\0\0\0";
        let (at, name, end) = bind_statement(body).unwrap();
        assert_eq!(name, b"P_0");
        let mut out = Vec::new();
        write_bind_prefix(&mut out, (body.len() + 4) as u32, body, at, end, &def);
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
