//! Arbitrary client and server byte streams, interleaved as they arrive, through the
//! session's two byte processors (`upstream::process`, `downstream::process`) and what
//! they keep current: the transaction tracker, the expected-answer queue, prepared
//! statements, the stale-statement retry. Input: a flags byte (statement tracking, a
//! small or large max_prepared_statements, may_hold), then chunks of
//! [direction byte (even: client, odd: server)][u16 length][bytes].

use pgsilo::proxy::downstream::Hold;
use pgsilo_fuzz::Session;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Some((&flags, mut rest)) = data.split_first() else {
            return;
        };
        let max_prepared = if flags & 2 != 0 { 2 } else { 100 };
        let mut s = Session::new(flags & 1 != 0, max_prepared);
        s.may_hold = flags & 4 != 0;
        let mut client = Vec::new();
        let mut server = Vec::new();
        let mut to_client = Vec::new();
        let mut blocked = false;
        while rest.len() >= 3 {
            let from_client = rest[0] & 1 == 0;
            let len = u16::from_be_bytes([rest[1], rest[2]]) as usize;
            rest = &rest[3..];
            let chunk = &rest[..len.min(rest.len())];
            rest = &rest[chunk.len()..];
            if from_client {
                client.extend_from_slice(chunk);
            } else {
                server.extend_from_slice(chunk);
                let Ok(r) = s.down(&server, &mut to_client) else {
                    return;
                };
                assert!(r.consumed <= server.len());
                if r.consumed == 0 && !server.is_empty() {
                    assert!(
                        r.want > server.len(),
                        "server bytes stall: want {} of {}",
                        r.want,
                        server.len()
                    );
                }
                server.drain(..r.consumed);
                s.server.tx_status = s.tracker.status();
                to_client.clear();
                // pgsilo's settings read-back (session/settings.rs) finds nothing to correct.
                if s.hold != Hold::No {
                    s.hold = Hold::No;
                    s.settings_changed = false;
                }
            }
            if blocked && s.queue.is_empty() {
                blocked = false;
            }
            if s.retry.busy() {
                if s.queue.is_empty() {
                    if let Some(bytes) = s.retry.take_replay() {
                        let mut out = Vec::new();
                        if s.up(&bytes, &mut out).is_err() {
                            return;
                        }
                        s.retry.recycle(bytes);
                    }
                }
                continue;
            }
            while !blocked && !client.is_empty() {
                let mut out = Vec::new();
                let Ok(r) = s.up(&client, &mut out) else {
                    return;
                };
                assert!(r.consumed <= client.len());
                if r.terminate {
                    return;
                }
                client.drain(..r.consumed);
                s.synth.clear();
                s.queue.flush_synth(&mut s.synth);
                if r.blocked {
                    blocked = true;
                } else if r.consumed == 0 {
                    assert!(
                        r.want > client.len(),
                        "client bytes stall: want {} of {}",
                        r.want,
                        client.len()
                    );
                    break;
                }
            }
        }
    });
}
