//! SQL text through what pgsilo reads of it: the statement splitter and classifier
//! (`proxy/sql_scan.rs`: PREPARE, EXECUTE, DEALLOCATE, DISCARD, LISTEN), the protocol
//! statements made of it (`proxy/prepared.rs`), and the rewrite of a simple Query and
//! an unnamed Parse for a client that has prepared statements (`upstream::process`).
//! Input: a flags byte, then the SQL text.

use std::rc::Rc;

use pgsilo::proxy::prepared::{NamedCommand, SqlDef, StmtDef};
use pgsilo::proxy::sql_scan;
use pgsilo_fuzz::{assert_whole_messages, msg, Session};

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Some((&flags, sql)) = data.split_first() else {
            return;
        };
        if let Some(ranges) = sql_scan::split_statements(sql, flags & 1 != 0) {
            for r in ranges {
                let stmt = &sql[r];
                let _ = sql_scan::classify(stmt);
                let _ = sql_scan::parse_deallocate(stmt);
            }
        }
        let _ = sql_scan::mentions_prepared_statements(sql);
        let _ = sql_scan::may_be_listen_only(sql);
        let _ = sql_scan::listen_only(sql);
        let _ = SqlDef::new(sql);
        if sql.contains(&0) {
            return;
        }
        let mut parse_body = sql.to_vec();
        parse_body.extend_from_slice(&[0, 0, 0]);
        if let Some(cmd) = NamedCommand::of(&parse_body) {
            assert!(cmd.at.end <= parse_body.len());
        }
        let def = StmtDef::new(&parse_body);
        let _ = def.naming(b"pgsilo_other");

        let tag = if flags & 2 != 0 { b'P' } else { b'Q' };
        let mut body = Vec::new();
        if tag == b'P' {
            body.push(0);
        }
        body.extend_from_slice(sql);
        body.push(0);
        if tag == b'P' {
            body.extend_from_slice(&[0, 0]);
        }
        let wire = msg(tag, &body);
        let mut s = Session::new(true, if flags & 4 != 0 { 1 } else { 100 });
        s.statements.insert(b"s1", Rc::new(StmtDef::new(b"select 1\0\0\0")));
        s.statements.sql_insert(b"p1", Rc::new(SqlDef::new(b"AS select 2")));
        let mut out = Vec::new();
        if let Ok(r) = s.up(&wire, &mut out) {
            if !r.blocked {
                assert_eq!(r.consumed, wire.len());
            }
            if !r.zero_copy {
                assert_whole_messages(&out);
            }
        }
    });
}
