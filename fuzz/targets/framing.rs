//! The protocol reader: message boundaries and length checks in both directions
//! (`framing::scan`, `Header::validate`, `upstream::peek`), and the bodies pgsilo reads
//! of messages it only passes on (ErrorResponse fields, ParameterStatus, C strings).

use pgsilo::pool::settings::parse_parameter_status;
use pgsilo::protocol::framing::{read_cstr, scan, Scan, HEADER_LEN};
use pgsilo::protocol::ErrorFields;
use pgsilo::proxy::downstream::SERVER_MESSAGE_LIMIT;
use pgsilo::proxy::upstream::{self, CLIENT_MESSAGE_LIMIT};

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let _ = upstream::peek(data);
        let mut at = 0;
        while let Scan::Whole(h) = scan(&data[at..]) {
            if h.validate(CLIENT_MESSAGE_LIMIT).is_err() || h.validate(SERVER_MESSAGE_LIMIT).is_err() {
                return;
            }
            let body = &data[at + HEADER_LEN..at + h.total()];
            assert_eq!(body.len(), h.body_len());
            match h.tag {
                b'E' | b'N' => {
                    let _ = ErrorFields::parse(body);
                    let _ = ErrorFields::code_of(body);
                }
                b'S' => {
                    let _ = parse_parameter_status(body);
                }
                _ => {
                    let mut i = 0;
                    while let Some((_, next)) = read_cstr(body, i) {
                        assert!(next > i && next <= body.len());
                        i = next;
                    }
                }
            }
            at += h.total();
        }
    });
}
