//! Opening a server connection: TCP or Unix-socket connect, TLS as server_tls_sslmode
//! asks, startup, the password exchange PostgreSQL asks for, and the session parameters
//! it reports.

use std::net::{SocketAddr, ToSocketAddrs};

use monoio::io::AsyncReadRent;

use super::server::{ServerConn, ServerMeta, INTERNAL_MESSAGE_LIMIT};
use super::settings::parse_parameter_status;
use super::target::{Credential, ServerTarget};
use super::PoolError;
use crate::auth::md5::{md5_salted_response, md5_secret};
use crate::auth::{ScramClient, ScramClientKeys};
use crate::metrics::{ConnEntry, ConnState, Registered, SERVERS};
use crate::net::{Endpoint, Stream, TlsStream};
use crate::protocol::io::{read_message, write_out, WireError};
use crate::protocol::{frontend, ErrorFields, MsgBuf};

/// Resolves the target host: a path is the folder of PostgreSQL's Unix socket, as in
/// libpq. Names go through the system resolver; in practice they are loopback or
/// /etc/hosts entries, so the blocking call is brief.
pub fn resolve(host: &str, port: u16) -> Result<Vec<Endpoint>, PoolError> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(vec![Endpoint::Tcp(SocketAddr::new(ip, port))]);
    }
    if host.starts_with('/') {
        return Ok(vec![Endpoint::unix(host, port)]);
    }
    let addrs: Vec<Endpoint> = (host, port)
        .to_socket_addrs()
        .map_err(|e| PoolError::Connect(format!("cannot resolve {host}: {e}")))?
        .map(Endpoint::Tcp)
        .collect();
    if addrs.is_empty() {
        return Err(PoolError::Connect(format!("{host} resolves to no address")));
    }
    Ok(addrs)
}

/// Connects and logs in, within the target's connect timeout.
pub async fn connect(
    target: &ServerTarget,
    client_key: Option<[u8; 32]>,
    database: &str,
    worker: usize,
) -> Result<ServerConn, PoolError> {
    match monoio::time::timeout(target.connect_timeout, connect_inner(target, client_key)).await {
        Ok(Ok(mut conn)) => {
            let local = conn.local_addr();
            let mut e = ConnEntry::new(
                conn.meta.id,
                &target.user,
                database,
                (conn.meta.addr.addr_text(), conn.meta.addr.port()),
                local,
                worker,
            );
            e.remote_pid = conn.meta.backend_pid;
            conn.meta.entry = Some(Registered::new(&SERVERS, e));
            conn.meta.mark(ConnState::Active, 0);
            Ok(conn)
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(PoolError::Connect(format!(
            "timeout connecting to {}:{} after {:?} (server_connect_timeout)",
            target.host, target.port, target.connect_timeout
        ))),
    }
}

async fn connect_inner(target: &ServerTarget, client_key: Option<[u8; 32]>) -> Result<ServerConn, PoolError> {
    let addrs = resolve(&target.host, target.port)?;
    let mut last_err = None;
    let mut stream = None;
    for addr in &addrs {
        match addr.connect().await {
            Ok(s) => {
                stream = Some((s, *addr));
                break;
            }
            Err(e) => last_err = Some(format!("{addr}: {e}")),
        }
    }
    let Some((stream, addr)) = stream else {
        return Err(PoolError::Connect(last_err.unwrap_or_else(|| "no address".into())));
    };
    if let (true, Stream::Tcp(s)) = (target.tcp_keepalive, &stream) {
        let _ = s.set_tcp_keepalive(None, None, None);
    }
    let local_port = stream.local_addr().map(|a| a.port()).unwrap_or(0);
    let mut stream = negotiate_tls(stream, target).await?;
    let mut meta = ServerMeta::new(addr, local_port);

    let mut out = Vec::with_capacity(128);
    frontend::startup_message(
        &mut out,
        [("user", target.user.as_str()), ("database", target.dbname.as_str())],
    );
    let (res, mut out) = write_out(&mut stream, out).await;
    res.map_err(login_wire)?;

    let mut buf = MsgBuf::with_capacity(1024);
    let mut scram: Option<ScramClient> = None;
    loop {
        let (res, back) = read_message(&mut stream, buf, INTERNAL_MESSAGE_LIMIT).await;
        buf = back;
        let h = res.map_err(login_wire)?;
        let body = &buf.data()[5..h.total()];
        match h.tag {
            b'R' => {
                let code = body
                    .get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                    .ok_or_else(|| PoolError::Login("malformed authentication request".into()))?;
                let data = &body[4..];
                match code {
                    0 => {}
                    3 => match &target.credential {
                        Credential::Password(p) => frontend::password_message(&mut out, p.as_bytes()),
                        _ => return Err(no_secret(target, "a cleartext password")),
                    },
                    5 => {
                        let salt: [u8; 4] = data
                            .get(..4)
                            .and_then(|s| s.try_into().ok())
                            .ok_or_else(|| PoolError::Login("malformed md5 request".into()))?;
                        let secret = match &target.credential {
                            Credential::Password(p) => md5_secret(&target.user, p),
                            Credential::Md5(h) => h.clone(),
                            _ => return Err(no_secret(target, "an md5 password")),
                        };
                        frontend::password_message(&mut out, md5_salted_response(&secret, salt).as_bytes());
                    }
                    10 => {
                        let keys = match &target.credential {
                            Credential::Password(p) => ScramClientKeys::Password(p.clone()),
                            Credential::Scram(v) => match client_key {
                                Some(client_key) => ScramClientKeys::Passthrough {
                                    client_key,
                                    server_key: v.server_key,
                                    salt: v.salt.clone(),
                                    iterations: v.iterations,
                                },
                                None => {
                                    return Err(PoolError::Login(format!(
                                        "no SCRAM key for user \"{}\" yet: a client must log in with SCRAM first, \
                                         or put a plain-text password in the auth_file",
                                        target.user
                                    )))
                                }
                            },
                            _ => return Err(no_secret(target, "a SCRAM-SHA-256 password")),
                        };
                        // Over TLS, channel binding to the server's certificate as libpq's
                        // channel_binding=prefer: PLUS when the server offers it.
                        let binding = stream
                            .tls()
                            .and_then(|t| t.connection().peer_certificates())
                            .and_then(|c| c.first())
                            .and_then(|c| crate::tls::der::server_end_point_hash(c));
                        let mut client = ScramClient::new(keys).with_channel_binding(binding);
                        let mechanism = client
                            .choose_mechanism(data)
                            .map_err(|_| PoolError::Login("server offers no SASL mechanism pgsilo supports".into()))?;
                        frontend::sasl_initial_response(&mut out, mechanism, &client.client_first());
                        scram = Some(client);
                    }
                    11 => {
                        let client = scram
                            .as_mut()
                            .ok_or_else(|| PoolError::Login("SASL continue without SASL start".into()))?;
                        let reply = client
                            .handle_server_first(data)
                            .map_err(|e| PoolError::Login(format!("SCRAM: {e}")))?;
                        frontend::sasl_response(&mut out, &reply);
                    }
                    12 => {
                        let client = scram
                            .as_ref()
                            .ok_or_else(|| PoolError::Login("SASL final without SASL start".into()))?;
                        client
                            .verify_server_final(data)
                            .map_err(|e| PoolError::Login(format!("SCRAM: {e}")))?;
                    }
                    other => {
                        return Err(PoolError::Login(format!(
                            "server asks for authentication method {other}, which pgsilo does not support"
                        )))
                    }
                }
            }
            b'E' => return Err(PoolError::ServerRefused(ErrorFields::parse(body))),
            b'S' => {
                if let Some((name, value)) = parse_parameter_status(body) {
                    meta.settings.set(name, value);
                }
            }
            b'K' => {
                if body.len() >= 4 {
                    meta.backend_pid = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                }
                if body.len() == 8 {
                    meta.backend_secret = Some(u32::from_be_bytes([body[4], body[5], body[6], body[7]]));
                }
            }
            b'Z' => {
                meta.tx_status = body.first().copied().unwrap_or(b'I');
                buf.consume(h.total());
                break;
            }
            // Notices and protocol negotiation need no answer.
            b'N' | b'v' => {}
            other => {
                return Err(PoolError::Login(format!(
                    "unexpected message '{}' during login",
                    other as char
                )))
            }
        }
        buf.consume(h.total());
        if !out.is_empty() {
            let (res, back) = write_out(&mut stream, out).await;
            out = back;
            res.map_err(login_wire)?;
        }
    }
    Ok(ServerConn::new(stream, meta))
}

/// server_tls_sslmode on a TCP connection: an SSLRequest, then TLS if PostgreSQL agrees.
/// A server that refuses when TLS is required is an error, never a quiet fallback to
/// plaintext. Unix sockets stay plain, as in libpq and PgBouncer.
async fn negotiate_tls(stream: Stream, target: &ServerTarget) -> Result<Stream, PoolError> {
    let config = match (&stream, target.tls.as_ref()) {
        (Stream::Tcp(_), Some(config)) => config.clone(),
        _ => return Ok(stream),
    };
    let Stream::Tcp(mut tcp) = stream else {
        return Ok(stream);
    };
    let mut out = Vec::with_capacity(8);
    frontend::ssl_request(&mut out);
    let (res, _) = write_out(&mut tcp, out).await;
    res.map_err(login_wire)?;
    // Exactly one byte: anything PostgreSQL sent after it would belong to the TLS
    // handshake (or be an injection, CVE-2021-23222), so it is not read here.
    let (res, answer) = tcp.read(Vec::with_capacity(1)).await;
    match (res, answer.first()) {
        (Ok(1), Some(b'S')) => {
            let name = rustls::pki_types::ServerName::try_from(target.host.clone())
                .map_err(|_| PoolError::Connect(format!("\"{}\" is not a host name TLS can verify", target.host)))?;
            let conn =
                rustls::ClientConnection::new(config, name).map_err(|e| PoolError::Connect(format!("TLS: {e}")))?;
            let tls = TlsStream::handshake(tcp, rustls::Connection::Client(conn), &[])
                .await
                .map_err(|e| PoolError::Tls(format!("TLS handshake with the server failed: {e}")))?;
            Ok(Stream::Tls(Box::new(tls)))
        }
        (Ok(1), Some(b'N')) if !target.tls_mode.requires_tls() => Ok(Stream::Tcp(tcp)),
        (Ok(1), Some(b'N')) => Err(PoolError::Tls(format!(
            "server does not support TLS, and server_tls_sslmode is {}",
            target.tls_mode
        ))),
        (Ok(0), _) => Err(PoolError::Connect("server closed the connection during login".into())),
        (Err(e), _) => Err(PoolError::Connect(e.to_string())),
        _ => Err(PoolError::Connect(
            "server sent an invalid answer to the SSL request".into(),
        )),
    }
}

fn login_wire(e: WireError) -> PoolError {
    match e {
        WireError::Closed => PoolError::Connect("server closed the connection during login".into()),
        other => PoolError::Connect(other.to_string()),
    }
}

fn no_secret(target: &ServerTarget, what: &str) -> PoolError {
    PoolError::Login(format!(
        "server asks for {what} for user \"{}\", and the auth_file has no usable secret for it",
        target.user
    ))
}
