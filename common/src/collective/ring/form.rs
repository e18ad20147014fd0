//! Forming the ring: connect to the successor and accept the predecessor, each link
//! authenticated with the join-token proof and checked for protocol version, generation and
//! rank (see [`form_ring`]).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::{ConnectionError, ReadError, VarInt, WriteError};
use tokio::sync::mpsc;
use tracing::Instrument;

use super::{peer_desc, Links, RingCollective, CONNECT_RETRY, MAX_REFUSAL_REASON, REFUSAL_LINGER};
use crate::collective::wire::{HelloReply, PeerHello, MAX_HELLO_FRAME};
use crate::collective::{CollectiveError, DEFAULT_PIECE_BYTES};
use crate::net::close::{self, describe_close_code, describe_connection_error, reason_bytes};
use crate::net::{join_proof, read_frame, verify_peer_join_proof, write_frame, NetError, TLS_SERVER_NAME};
use troupe_core::proto::PROTOCOL_VERSION;

/// Form this rank's part of the ring: connect to the successor and, concurrently, accept the
/// predecessor's connection (the endpoint must receive no other connections). Both links are
/// authenticated with the join-token proof and checked for protocol version, generation and
/// rank; a mismatching peer gets a refusal naming the close code (`net::close`) and what did
/// not match, and the connection is closed with that code.
///
/// Connections that fail the checks are refused and the wait for the right predecessor goes
/// on, so a stale process of an older generation cannot break the formation of a new ring;
/// if the right one never comes, the error lists what was refused. `timeout` bounds the whole
/// formation and is also the default bound of each collective call.
pub async fn form_ring(
    endpoint: &quinn::Endpoint,
    rank: u32,
    world: u32,
    generation: u64,
    successor_addr: SocketAddr,
    token: &str,
    timeout: Duration,
) -> Result<RingCollective, CollectiveError> {
    if world == 0 || rank >= world {
        return Err(CollectiveError::InvalidArgument(format!("rank {rank} is not in a ring of {world} ranks")));
    }
    let mut ring = RingCollective {
        rank,
        world,
        generation,
        links: None,
        call_timeout: timeout,
        piece_elems: DEFAULT_PIECE_BYTES / 4,
        last_stream: None,
    };
    if world == 1 {
        return Ok(ring);
    }
    let me = Arc::new(Me {
        rank,
        world,
        generation,
        token: token.to_string(),
        abandoned: Mutex::new(None),
        successor_refusal: Mutex::new(None),
    });
    let succ_rank = (rank + 1) % world;
    let pred_rank = (rank + world - 1) % world;
    let refusals = Mutex::new(Vec::<String>::new());
    // Each side's connection, kept outside the timed future so that on failure a link that
    // was already established can be closed with a reason instead of just dropped.
    let mut succ: Option<quinn::Connection> = None;
    let mut pred: Option<quinn::Connection> = None;

    let both = async {
        let connect = connect_successor(endpoint, &me, succ_rank, successor_addr);
        let accept = accept_predecessor(endpoint, &me, pred_rank, &refusals, timeout);
        tokio::pin!(connect, accept);
        while succ.is_none() || pred.is_none() {
            tokio::select! {
                r = &mut connect, if succ.is_none() => succ = Some(r?),
                r = &mut accept, if pred.is_none() => pred = Some(r?),
            }
        }
        Ok::<(), CollectiveError>(())
    }
    .instrument(tracing::debug_span!("form_ring", rank, world, generation));

    let formed = match tokio::time::timeout(timeout, both).await {
        Ok(r) => r,
        Err(_) => {
            let refused = refusals.lock().map(|v| v.join("; ")).unwrap_or_default();
            let pred_name = format!("predecessor rank {pred_rank}");
            let succ_refusal = me.successor_refusal.lock().ok().and_then(|r| r.clone());
            if pred.is_none() && !refused.is_empty() {
                Err(CollectiveError::Refused {
                    peer: pred_name,
                    reason: format!("no acceptable connection within {timeout:?}; refused: {refused}"),
                })
            } else if let (None, Some(reason)) = (&succ, succ_refusal) {
                Err(CollectiveError::Refused {
                    peer: peer_desc("successor", succ_rank, successor_addr),
                    reason: format!("still refusing after {timeout:?}: {reason}"),
                })
            } else {
                let mut waiting = Vec::new();
                if succ.is_none() {
                    waiting.push(format!("no authenticated link to successor rank {succ_rank} at {successor_addr}"));
                }
                if pred.is_none() {
                    waiting.push(format!("no connection from {pred_name}"));
                }
                Err(CollectiveError::FormationTimeout { rank, waiting_for: waiting.join(" and "), after: timeout })
            }
        }
    };
    let (succ, pred) = match (formed, succ, pred) {
        (Ok(()), Some(succ), Some(pred)) => (succ, pred),
        (formed, succ, pred) => {
            let e = formed.err().unwrap_or_else(|| CollectiveError::Protocol("ring formation ended without both links".into()));
            // Checks still running in their tasks now refuse with this reason, so a peer whose
            // hello arrives late learns at once why the ring did not form here.
            if let Ok(mut a) = me.abandoned.lock() {
                *a = Some(e.to_string());
            }
            // A link already welcomed on either side is closed with the reason, after the
            // exchange settles: dropping it at once would discard the welcome still in flight
            // (and, quinn#2785, maybe the close), leaving the peer only a bare reset.
            let why = format!("rank {rank} gave up forming the ring: {e}");
            for conn in [succ, pred].into_iter().flatten() {
                let why = why.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(REFUSAL_LINGER, conn.closed()).await;
                    refuse(&conn, close::ABORTED, &why);
                });
            }
            return Err(e);
        }
    };
    let succ_desc = peer_desc("successor", succ_rank, succ.remote_address());
    let pred_desc = peer_desc("predecessor", pred_rank, pred.remote_address());
    tracing::info!(rank, world, generation, successor = %succ_desc, predecessor = %pred_desc, "ring formed");
    ring.links = Some(Links { _endpoint: endpoint.clone(), succ, pred, succ_desc, pred_desc });
    Ok(ring)
}

/// This rank's identity during formation.
struct Me {
    rank: u32,
    world: u32,
    generation: u64,
    token: String,
    /// Set when this rank's formation failed: why.
    abandoned: Mutex<Option<String>>,
    /// The successor's last refusal worth retrying (it was in another generation).
    successor_refusal: Mutex<Option<String>>,
}

impl Me {
    fn hello(&self, conn: &quinn::Connection, peer: &str) -> Result<PeerHello, CollectiveError> {
        Ok(PeerHello {
            protocol_version: PROTOCOL_VERSION,
            generation: self.generation,
            from_rank: self.rank,
            world_size: self.world,
            proof: join_proof(conn, &self.token).map_err(|e| io_err(peer, e))?,
        })
    }

    /// Check a peer's hello; on failure, the close code to send and the reason.
    fn check(&self, conn: &quinn::Connection, h: &PeerHello, expect_rank: u32) -> Result<(), (VarInt, String)> {
        // Version first: a peer of another version may compute its proof differently.
        if h.protocol_version != PROTOCOL_VERSION {
            return Err((
                close::VERSION_MISMATCH,
                format!(
                    "protocol version {} but this rank speaks {PROTOCOL_VERSION}; run the same troupe build everywhere",
                    h.protocol_version
                ),
            ));
        }
        match verify_peer_join_proof(conn, &self.token, &h.proof) {
            Ok(true) => {}
            Ok(false) => return Err((close::AUTH_FAILED, "join proof did not match: wrong cluster token".into())),
            Err(e) => return Err((close::AUTH_FAILED, format!("cannot check join proof: {e}"))),
        }
        if h.generation != self.generation {
            return Err((
                close::GENERATION_MISMATCH,
                format!("ring generation {} but this ring is generation {}", h.generation, self.generation),
            ));
        }
        if h.world_size != self.world || h.from_rank != expect_rank {
            return Err((
                close::WRONG_RANK,
                format!("rank {} of {} but expected rank {expect_rank} of {}", h.from_rank, h.world_size, self.world),
            ));
        }
        Ok(())
    }
}

fn io_err(peer: &str, e: NetError) -> CollectiveError {
    match e {
        NetError::Read(ReadError::ConnectionLost(ce)) | NetError::Write(WriteError::ConnectionLost(ce)) => conn_err(peer, &ce),
        other => CollectiveError::Io { peer: peer.to_string(), source: other },
    }
}

/// A refusal code from the peer becomes `Refused`, anything else `PeerClosed`.
pub(super) fn conn_err(peer: &str, ce: &ConnectionError) -> CollectiveError {
    let reason = describe_connection_error(ce);
    match ce {
        ConnectionError::ApplicationClosed(c)
            if [close::AUTH_FAILED, close::VERSION_MISMATCH, close::GENERATION_MISMATCH, close::WRONG_RANK].contains(&c.error_code) =>
        {
            CollectiveError::Refused { peer: peer.to_string(), reason }
        }
        _ => CollectiveError::PeerClosed { peer: peer.to_string(), reason },
    }
}

fn refuse(conn: &quinn::Connection, code: VarInt, reason: &str) {
    conn.close(code, &reason_bytes(reason));
}

/// Connects to the successor, retrying while it refuses because it is still in another
/// generation or world size: after a membership change ranks start forming the new ring at
/// slightly different times, and the successor will come around (or the coordinator gives up
/// on this generation, which cancels this formation).
async fn connect_successor(
    endpoint: &quinn::Endpoint,
    me: &Me,
    succ_rank: u32,
    addr: SocketAddr,
) -> Result<quinn::Connection, CollectiveError> {
    loop {
        match connect_successor_once(endpoint, me, succ_rank, addr).await? {
            Attempt::Linked(conn) => return Ok(conn),
            Attempt::NotYet(reason) => {
                tracing::debug!(succ_rank, %addr, %reason, "successor is not in this generation yet; retrying");
                tokio::time::sleep(CONNECT_RETRY).await;
            }
        }
    }
}

enum Attempt {
    Linked(quinn::Connection),
    /// Refused for a generation or rank mismatch: worth another try.
    NotYet(String),
}

async fn connect_successor_once(endpoint: &quinn::Endpoint, me: &Me, succ_rank: u32, addr: SocketAddr) -> Result<Attempt, CollectiveError> {
    let peer = peer_desc("successor", succ_rank, addr);
    let conn = loop {
        let connecting = endpoint
            .connect(addr, TLS_SERVER_NAME)
            .map_err(|e| CollectiveError::PeerClosed { peer: peer.clone(), reason: format!("cannot start connection: {e}") })?;
        match connecting.await {
            Ok(c) => break c,
            // The successor may not be listening yet; the caller's timeout bounds the retries.
            Err(e @ (ConnectionError::TimedOut | ConnectionError::Reset)) => {
                tracing::debug!(%peer, error = %describe_connection_error(&e), "successor not reachable yet; retrying");
                tokio::time::sleep(CONNECT_RETRY).await;
            }
            Err(e) => return Err(conn_err(&peer, &e)),
        }
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| conn_err(&peer, &e))?;
    write_frame(&mut send, &me.hello(&conn, &peer)?).await.map_err(|e| io_err(&peer, e))?;
    let reply: HelloReply = match read_frame(&mut recv, MAX_HELLO_FRAME).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            refuse(&conn, close::PROTOCOL_ERROR, "hello stream closed without a reply");
            return Err(CollectiveError::Protocol(format!("{peer} closed the hello stream without replying")));
        }
        Err(e) => {
            if matches!(e, NetError::Decode { .. } | NetError::FrameTooLarge { .. } | NetError::Truncated { .. }) {
                refuse(&conn, close::PROTOCOL_ERROR, "malformed hello reply");
            }
            return Err(io_err(&peer, e));
        }
    };
    let welcome = match reply {
        HelloReply::Welcome(h) => h,
        HelloReply::Refused { code, reason } => {
            let code = VarInt::from_u64(code).unwrap_or(close::PROTOCOL_ERROR);
            // Closing is our job: the refusing side only lingers until we do.
            refuse(&conn, code, &reason);
            if code == close::GENERATION_MISMATCH || code == close::WRONG_RANK {
                let reason = format!("{}: {reason}", describe_close_code(code));
                if let Ok(mut last) = me.successor_refusal.lock() {
                    *last = Some(reason.clone());
                }
                return Ok(Attempt::NotYet(reason));
            }
            return Err(CollectiveError::Refused { peer, reason: format!("{}: {reason}", describe_close_code(code)) });
        }
    };
    if let Err((code, reason)) = me.check(&conn, &welcome, succ_rank) {
        tracing::warn!(%peer, code = %describe_close_code(code), %reason, "refusing successor");
        refuse(&conn, code, &reason);
        return Err(CollectiveError::Refused { peer, reason: format!("{}: {reason}", describe_close_code(code)) });
    }
    // The hello stream has done its job; finishing it is best effort.
    let _ = send.finish();
    Ok(Attempt::Linked(conn))
}

/// What checking one incoming connection found: the predecessor, or a refusal, whose note
/// (address and reason) goes into the error if the right predecessor never comes.
enum Checked {
    Accepted(quinn::Connection),
    Refused(String),
}

async fn accept_predecessor(
    endpoint: &quinn::Endpoint,
    me: &Arc<Me>,
    pred_rank: u32,
    refusals: &Mutex<Vec<String>>,
    timeout: Duration,
) -> Result<quinn::Connection, CollectiveError> {
    // Each incoming connection is checked in its own task: a slow or silent peer cannot hold
    // up the right one, and a check in progress still ends with a clear refusal even if this
    // formation gives up meanwhile.
    let (tx, mut rx) = mpsc::channel::<Checked>(4);
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let incoming = incoming.ok_or_else(|| CollectiveError::PeerClosed {
                    peer: format!("predecessor rank {pred_rank}"),
                    reason: "local endpoint closed while waiting for it".into(),
                })?;
                tokio::spawn(check_incoming_task(incoming, me.clone(), pred_rank, timeout, tx.clone()));
            }
            Some(checked) = rx.recv() => match checked {
                Checked::Accepted(conn) => return Ok(conn),
                Checked::Refused(note) => {
                    if let Ok(mut v) = refusals.lock() {
                        v.push(note);
                    }
                }
            },
        }
    }
}

async fn check_incoming_task(incoming: quinn::Incoming, me: Arc<Me>, pred_rank: u32, timeout: Duration, tx: mpsc::Sender<Checked>) {
    let remote = incoming.remote_address();
    let conn = match tokio::time::timeout(timeout, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            let why = describe_connection_error(&e);
            tracing::warn!(%remote, %why, "incoming ring connection failed during handshake");
            let _ = tx.send(Checked::Refused(format!("{remote}: handshake failed: {why}"))).await;
            return;
        }
        Err(_) => {
            let _ = tx.send(Checked::Refused(format!("{remote}: handshake did not complete"))).await;
            return;
        }
    };
    let peer = peer_desc("predecessor", pred_rank, remote);
    let checked = match tokio::time::timeout(timeout, check_incoming(&conn, &me, pred_rank, &peer)).await {
        Ok(r) => r,
        Err(_) => Err((close::PROTOCOL_ERROR, format!("no hello within {timeout:?}"))),
    };
    match checked {
        Ok(()) => {
            if tx.send(Checked::Accepted(conn.clone())).await.is_err() {
                // This rank gave up after the peer was welcomed. Closing at once would discard
                // the welcome still in flight (and, quinn#2785, maybe the close too); the peer
                // would see a bare reset. Let the exchange settle, then close saying why.
                let why = me.abandoned.lock().ok().and_then(|a| a.clone()).unwrap_or_default();
                let _ = tokio::time::timeout(REFUSAL_LINGER.min(timeout), conn.closed()).await;
                refuse(&conn, close::ABORTED, &format!("rank {} gave up forming the ring: {why}", me.rank));
            }
        }
        Err((code, reason)) => {
            tracing::warn!(%remote, code = %describe_close_code(code), %reason, "refusing ring connection");
            let _ = tx.send(Checked::Refused(format!("{remote}: {} {reason}", close::close_code_name(code)))).await;
            drop(tx);
            // The refusal went out as a reply frame; give the peer time to read it and close.
            // Closing first could lose it: quinn 0.11 does not send CONNECTION_CLOSE while the
            // congestion window is full (quinn#2785), which it is right after the handshake
            // because of the large MTU probes, and the peer would only see a stateless reset.
            let _ = tokio::time::timeout(REFUSAL_LINGER.min(timeout), conn.closed()).await;
            refuse(&conn, code, &reason);
        }
    }
}

/// Read and check the predecessor's hello, then answer with ours or with a refusal.
async fn check_incoming(conn: &quinn::Connection, me: &Me, pred_rank: u32, peer: &str) -> Result<(), (VarInt, String)> {
    let (mut send, mut recv) =
        conn.accept_bi().await.map_err(|e| (close::PROTOCOL_ERROR, format!("no hello stream: {}", describe_connection_error(&e))))?;
    let verdict = match read_frame::<PeerHello>(&mut recv, MAX_HELLO_FRAME).await {
        Ok(Some(h)) => me.check(conn, &h, pred_rank).and_then(|()| {
            // A valid peer, but this rank has given up: say so rather than welcome it into a
            // ring that will not exist.
            match me.abandoned.lock().ok().and_then(|a| a.clone()) {
                Some(why) => Err((close::ABORTED, format!("rank {} gave up forming the ring: {why}", me.rank))),
                None => Ok(()),
            }
        }),
        Ok(None) => Err((close::PROTOCOL_ERROR, "hello stream closed before a hello".into())),
        Err(NetError::FrameTooLarge { len, max }) => Err((close::FRAME_TOO_LARGE, format!("hello of {len} bytes exceeds {max}"))),
        Err(e) => Err((close::PROTOCOL_ERROR, format!("bad hello: {e}"))),
    };
    let reply = match &verdict {
        Ok(()) => HelloReply::Welcome(me.hello(conn, peer).map_err(|e| (close::PROTOCOL_ERROR, e.to_string()))?),
        Err((code, reason)) => {
            // Bounded so the reply always fits the peer's hello frame limit.
            let mut end = reason.len().min(MAX_REFUSAL_REASON);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            HelloReply::Refused { code: code.into_inner(), reason: reason[..end].to_string() }
        }
    };
    // Best effort for refusals (the peer may be gone); required for a welcome.
    let sent = write_frame(&mut send, &reply).await;
    let _ = send.finish();
    verdict?;
    sent.map_err(|e| (close::PROTOCOL_ERROR, format!("cannot send hello reply: {e}")))
}
