//! Whole sessions (`serve`) on in-memory sockets: the test is the client, and where a
//! server is needed, it plays PostgreSQL with a few scripted bytes. What a real server
//! does is for the tests under tests/.

use std::time::Duration;

use monoio::net::UnixStream;

use super::testkit::{block_on, msg, query, recv, recv_to_end, send, Kit};
use super::{serve, SessionError};
use crate::config::PoolMode;
use crate::pool::LocalPool;

const TERMINATE: &[u8] = b"X\0\0\0\x04";

/// Starts a session for a new client of `kit`; the test's end of the client socket, and
/// the session's outcome to await.
fn start(kit: &Kit) -> (UnixStream, monoio::task::JoinHandle<Result<(), SessionError>>) {
    let (who, stream, client) = kit.client();
    (client, monoio::spawn(serve(kit.ctx.clone(), stream, who)))
}

async fn ended(session: monoio::task::JoinHandle<Result<(), SessionError>>) -> Result<(), SessionError> {
    monoio::time::timeout(Duration::from_secs(2), session)
        .await
        .expect("the session ends within two seconds")
}

/// Waits (up to two seconds) until `count` of the pool is `n`: `what` names it.
async fn pool_count(pool: &LocalPool, what: &str, count: fn(&LocalPool) -> usize, n: usize) {
    for _ in 0..400 {
        if count(pool) == n {
            return;
        }
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the pool has {} {what}, not {n}", count(pool));
}

/// Waits (up to two seconds) until the pool holds `n` idle servers.
async fn idle_servers(pool: &LocalPool, n: usize) {
    pool_count(pool, "idle servers", LocalPool::idle_len, n).await
}

/// Waits (up to two seconds) until `n` clients wait in the pool.
async fn waiting_clients(pool: &LocalPool, n: usize) {
    pool_count(pool, "waiting clients", LocalPool::waiting_len, n).await
}

/// A transaction-pooling worker with one idle server the test plays.
fn with_idle_server() -> (Kit, UnixStream) {
    let kit = Kit::new(PoolMode::Transaction, |_| {});
    let (conn, server) = kit.server();
    kit.pool.release(conn, true);
    assert_eq!(kit.pool.idle_len(), 1);
    (kit, server)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_client_that_sends_terminate_while_idle_ends_its_session_cleanly() {
    block_on(async {
        let kit = Kit::new(PoolMode::Transaction, |_| {});
        let (mut client, session) = start(&kit);
        send(&mut client, TERMINATE).await;
        assert!(ended(session).await.is_ok());
        assert_eq!(recv_to_end(&mut client).await, b"", "closed without a word");
        assert_eq!(kit.pool.shared.total(), 0, "no server was opened");
    })
}

#[test]
fn a_client_that_hangs_up_while_idle_ends_its_session() {
    block_on(async {
        let kit = Kit::new(PoolMode::Transaction, |_| {});
        let (client, session) = start(&kit);
        drop(client);
        assert!(ended(session).await.is_ok());
        assert_eq!(kit.pool.shared.total(), 0);
    })
}

#[test]
fn a_bare_flush_needs_no_server() {
    block_on(async {
        let kit = Kit::new(PoolMode::Transaction, |_| {});
        let (mut client, session) = start(&kit);
        send(&mut client, &[msg(b'H', b""), TERMINATE.to_vec()].concat()).await;
        assert!(ended(session).await.is_ok());
        assert_eq!(recv_to_end(&mut client).await, b"");
        assert_eq!(kit.pool.shared.total(), 0, "no server was opened");
    })
}

#[test]
fn a_killed_idle_session_tells_its_client_why() {
    block_on(async {
        let kit = Kit::new(PoolMode::Transaction, |_| {});
        let (mut client, session) = start(&kit);
        // Let the session reach its idle wait first.
        monoio::time::sleep(Duration::from_millis(20)).await;
        kit.ctx.sessions.each(|s| s.kill("terminated by the test"));
        assert!(matches!(
            ended(session).await,
            Err(SessionError::Killed("terminated by the test"))
        ));
        let said = recv_to_end(&mut client).await;
        assert_eq!(said[0], b'E');
        assert!(contains(&said, b"C57P01\0"), "{said:?}");
        assert!(contains(&said, b"terminated by the test"), "{said:?}");
    })
}

#[test]
fn client_idle_timeout_closes_a_quiet_client_with_57p05() {
    block_on(async {
        let kit = Kit::new(PoolMode::Transaction, |g| {
            g.client_idle_timeout = Some(Duration::from_millis(50))
        });
        let (mut client, session) = start(&kit);
        assert!(matches!(
            ended(session).await,
            Err(SessionError::TimedOut(_, "client_idle_timeout"))
        ));
        let said = recv_to_end(&mut client).await;
        assert!(contains(&said, b"C57P05\0"), "{said:?}");
    })
}

#[test]
fn transaction_pooling_passes_a_query_and_its_answer_through_and_pools_the_server_after_it() {
    block_on(async {
        let (kit, mut server) = with_idle_server();
        let (mut client, session) = start(&kit);
        let q = query("select 1");
        send(&mut client, &q).await;
        assert_eq!(recv(&mut server, q.len()).await, q, "the query as the client sent it");
        assert_eq!(kit.pool.idle_len(), 0, "the server is the session's");
        let answer = [msg(b'C', b"SELECT 1\0"), msg(b'Z', b"I")].concat();
        send(&mut server, &answer).await;
        assert_eq!(
            recv(&mut client, answer.len()).await,
            answer,
            "the answer as the server sent it"
        );
        // ReadyForQuery I with nothing in flight: the server goes back.
        idle_servers(&kit.pool, 1).await;
        send(&mut client, TERMINATE).await;
        assert!(ended(session).await.is_ok());
        assert_eq!(kit.pool.idle_len(), 1);
    })
}

#[test]
fn a_client_that_leaves_inside_a_transaction_has_it_rolled_back_and_the_server_pooled() {
    block_on(async {
        let (kit, mut server) = with_idle_server();
        let (mut client, session) = start(&kit);
        let begin = query("begin");
        send(&mut client, &begin).await;
        assert_eq!(recv(&mut server, begin.len()).await, begin);
        let answer = [msg(b'C', b"BEGIN\0"), msg(b'Z', b"T")].concat();
        send(&mut server, &answer).await;
        assert_eq!(recv(&mut client, answer.len()).await, answer);
        assert_eq!(kit.pool.idle_len(), 0, "a transaction is open: the server stays");
        drop(client);
        let rollback = query("ROLLBACK");
        assert_eq!(recv(&mut server, rollback.len()).await, rollback);
        send(&mut server, &[msg(b'C', b"ROLLBACK\0"), msg(b'Z', b"I")].concat()).await;
        assert!(ended(session).await.is_ok());
        assert_eq!(kit.pool.idle_len(), 1, "clean again: pooled");
    })
}

#[test]
fn a_client_that_leaves_with_a_request_in_flight_has_its_server_closed() {
    block_on(async {
        let (kit, mut server) = with_idle_server();
        let (mut client, session) = start(&kit);
        let q = query("select pg_sleep(10)");
        send(&mut client, &q).await;
        assert_eq!(recv(&mut server, q.len()).await, q);
        drop(client);
        assert!(ended(session).await.is_ok());
        assert_eq!(recv_to_end(&mut server).await, b"", "closed, nothing more sent");
        assert_eq!(kit.pool.idle_len(), 0);
        assert_eq!(kit.pool.shared.total(), 0, "its slot is free");
    })
}

#[test]
fn a_server_that_closes_under_its_client_is_reported_to_the_client() {
    block_on(async {
        let (kit, mut server) = with_idle_server();
        let (mut client, session) = start(&kit);
        let q = query("select 1");
        send(&mut client, &q).await;
        assert_eq!(recv(&mut server, q.len()).await, q);
        drop(server);
        assert!(matches!(ended(session).await, Err(SessionError::ServerGone)));
        let said = recv_to_end(&mut client).await;
        assert_eq!(said[0], b'E');
        assert!(contains(&said, b"C08006\0"), "{said:?}");
        assert!(contains(&said, b"server conn crashed?"), "{said:?}");
        assert_eq!(kit.pool.shared.total(), 0, "its slot is free");
    })
}

/// A pool of four with every server taken (the test holds them, and plays their
/// PostgreSQL): the next client has to wait.
fn with_full_pool(tune: impl FnOnce(&mut crate::config::General)) -> (Kit, Vec<(crate::pool::ServerConn, UnixStream)>) {
    let kit = Kit::new(PoolMode::Transaction, tune);
    let taken = (0..4).map(|_| kit.server()).collect();
    (kit, taken)
}

#[test]
fn a_client_that_hangs_up_while_waiting_for_a_server_leaves_the_queue() {
    block_on(async {
        let (kit, _taken) = with_full_pool(|_| {});
        let (mut client, session) = start(&kit);
        send(&mut client, &query("SELECT 1")).await;
        waiting_clients(&kit.pool, 1).await;
        drop(client);
        // Noticed once the wait is old enough to be watched (deadline::PROBE_AFTER), not
        // when a server comes free, nor at query_wait_timeout (120 s).
        assert!(ended(session).await.is_ok());
        assert_eq!(kit.pool.waiting_len(), 0);
    })
}

#[test]
fn query_wait_timeout_ends_a_waiting_client_with_08p01() {
    block_on(async {
        let (kit, _taken) = with_full_pool(|g| g.query_wait_timeout = Some(Duration::from_millis(50)));
        let (mut client, session) = start(&kit);
        send(&mut client, &query("SELECT 1")).await;
        assert!(matches!(
            ended(session).await,
            Err(SessionError::Pool(crate::pool::PoolError::WaitTimeout))
        ));
        let said = recv_to_end(&mut client).await;
        assert!(contains(&said, b"C08P01\0"), "{said:?}");
        assert!(contains(&said, b"query_wait_timeout"), "{said:?}");
        assert_eq!(kit.pool.waiting_len(), 0, "the wait was taken back");
    })
}

#[test]
fn a_client_still_waiting_when_it_is_watched_gets_the_next_released_server() {
    block_on(async {
        let (kit, mut taken) = with_full_pool(|_| {});
        let (mut client, session) = start(&kit);
        let q = query("SELECT 1");
        send(&mut client, &q).await;
        waiting_clients(&kit.pool, 1).await;
        // Past the moment the client is watched for a hang-up: it is still there.
        monoio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(kit.pool.waiting_len(), 1);
        let (conn, mut server) = taken.pop().expect("a server");
        kit.pool.release(conn, true);
        assert_eq!(
            recv(&mut server, q.len()).await,
            q,
            "the query went to the released server"
        );
        let answer = [msg(b'C', b"SELECT 1\0"), msg(b'Z', b"I")].concat();
        send(&mut server, &answer).await;
        assert_eq!(recv(&mut client, answer.len()).await, answer);
        send(&mut client, TERMINATE).await;
        assert!(ended(session).await.is_ok());
    })
}
