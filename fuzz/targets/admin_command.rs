//! The admin console's commands: a simple Query's text, split at `;` and parsed as
//! admin/mod.rs does.

use pgsilo::protocol::framing::read_cstr;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let text =
            read_cstr(data, 0).map_or_else(|| String::from_utf8_lossy(data), |(t, _)| String::from_utf8_lossy(t));
        for part in text.split(';') {
            if !part.trim().is_empty() {
                let _ = pgsilo::admin::command::parse(part);
            }
        }
    });
}
