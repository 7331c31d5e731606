//! Messages pgsilo sends to PostgreSQL as a client of its own: logging in, internal
//! queries (reset, settings), cancel requests.

use super::backend::{cstr, message};
use super::startup::{CANCEL_REQUEST, PROTOCOL_3_0};

pub fn startup_message<'a>(out: &mut Vec<u8>, params: impl IntoIterator<Item = (&'a str, &'a str)>) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
    for (k, v) in params {
        cstr(out, k);
        cstr(out, v);
    }
    out.push(0);
    let len = (out.len() - at) as u32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

pub fn cancel_request(out: &mut Vec<u8>, pid: u32, secret: &[u8]) {
    out.extend_from_slice(&((12 + secret.len()) as u32).to_be_bytes());
    out.extend_from_slice(&CANCEL_REQUEST.to_be_bytes());
    out.extend_from_slice(&pid.to_be_bytes());
    out.extend_from_slice(secret);
}

/// SSLRequest: asks the server to switch to TLS before the startup message.
pub fn ssl_request(out: &mut Vec<u8>) {
    out.extend_from_slice(&8u32.to_be_bytes());
    out.extend_from_slice(&super::startup::SSL_REQUEST.to_be_bytes());
}

/// PasswordMessage carrying a cleartext password or an md5 response (NUL-terminated).
pub fn password_message(out: &mut Vec<u8>, password: &[u8]) {
    message(out, b'p', |b| {
        b.extend_from_slice(password);
        b.push(0);
    });
}

pub fn sasl_initial_response(out: &mut Vec<u8>, mechanism: &str, data: &[u8]) {
    message(out, b'p', |b| {
        cstr(b, mechanism);
        b.extend_from_slice(&(data.len() as i32).to_be_bytes());
        b.extend_from_slice(data);
    });
}

pub fn sasl_response(out: &mut Vec<u8>, data: &[u8]) {
    message(out, b'p', |b| b.extend_from_slice(data));
}

pub fn query(out: &mut Vec<u8>, sql: &str) {
    message(out, b'Q', |b| cstr(b, sql));
}

/// Parse of an unnamed statement; the server infers the parameters' types.
pub fn parse(out: &mut Vec<u8>, sql: &str) {
    message(out, b'P', |b| {
        cstr(b, "");
        cstr(b, sql);
        b.extend_from_slice(&0i16.to_be_bytes());
    });
}

/// Bind of the unnamed statement to the unnamed portal: parameters and results in text.
pub fn bind(out: &mut Vec<u8>, params: &[Option<&[u8]>]) {
    message(out, b'B', |b| {
        cstr(b, "");
        cstr(b, "");
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&(params.len() as i16).to_be_bytes());
        for p in params {
            match p {
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v);
                }
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        b.extend_from_slice(&0i16.to_be_bytes());
    });
}

/// Execute of the unnamed portal, every row.
pub fn execute(out: &mut Vec<u8>) {
    message(out, b'E', |b| {
        cstr(b, "");
        b.extend_from_slice(&0i32.to_be_bytes());
    });
}

pub fn sync(out: &mut Vec<u8>) {
    message(out, b'S', |_| {});
}

pub fn terminate(out: &mut Vec<u8>) {
    message(out, b'X', |_| {});
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::startup::{parse, StartupPacket};

    #[test]
    fn startup_message_round_trips() {
        let mut out = Vec::new();
        startup_message(&mut out, [("user", "u"), ("database", "d")]);
        match parse(&out).unwrap() {
            StartupPacket::Startup(s) => assert_eq!(s.get("database"), Some("d")),
            other => panic!("{other:?}"),
        }
    }
}
