//! The first packet a client sends: startup message, SSLRequest, GSSENCRequest or
//! CancelRequest (`protocol::startup`), and the libpq `options` parameter inside it.

use pgsilo::protocol::startup::{self, StartupPacket};

fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Some(Ok(len)) = startup::declared_len(data) {
            if data.len() < len {
                return;
            }
            if let Ok(StartupPacket::Startup(s)) = startup::parse(&data[..len]) {
                let _ = s.get("user");
                if let Some(options) = s.get("options") {
                    let _ = startup::parse_options(options);
                }
            }
        }
        // Whatever the declared length says, the parser sees the bytes as they are.
        let _ = startup::parse(data);
        if let Ok(text) = std::str::from_utf8(data) {
            let _ = startup::parse_options(text);
        }
    });
}
