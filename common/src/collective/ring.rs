//! Ring collectives over QUIC.
//!
//! Rank `r` holds one connection it opened to its successor `(r+1) % W` (it only sends on
//! it) and one connection its predecessor opened to it (it only receives on it). With W = 2
//! both links go to the same peer; keeping one connection per direction keeps the code
//! uniform and lets the two QUIC connection drivers run on different threads.
//!
//! Each collective call opens ONE unidirectional stream to the successor and accepts one
//! from the predecessor. The stream starts with a [`StreamHeader`] (checked against what this
//! rank is running) and continues with raw little-endian f32 pieces. Transfer and reduction
//! are pipelined: a sender task drains a bounded queue of pieces into the stream while the
//! call's own loop reduces incoming bytes into the buffer as they arrive and queues the
//! pieces the next phase forwards as soon as they are complete.
//!
//! All-reduce, reduce-scatter and all-gather are phase ranges of one schedule (`schedule`),
//! numbered so that rank `r` owns chunk `r` (NCCL's in-place convention). The header names
//! the operation, so ranks running different ones for the same tag fail with a protocol
//! error naming both instead of silently combining the wrong phases.
//!
//! Why pieces are produced lazily (only when the queue has room) instead of queued eagerly:
//! the receiving loop must never block on a full queue, or every rank could wait on its
//! successor's full window in a cycle; and eager queueing would copy up to the whole buffer.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use quinn::{ConnectionError, ReadError, VarInt, WriteError};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;

use super::schedule::{encode_f32s, phase_name, Incoming, Schedule};
use super::wire::{HelloReply, Op, PeerHello, StreamHeader, HEADER_LEN, MAX_HELLO_FRAME};
use super::{check_chunked_len, Collective, CollectiveError, CollectiveTag};
use crate::net::close::{self, describe_close_code, describe_connection_error, describe_read_error, reason_bytes};
use crate::net::{join_proof, read_frame, verify_peer_join_proof, write_frame, NetError, TLS_SERVER_NAME};
use troupe_core::proto::PROTOCOL_VERSION;

/// Default size of a pipelined piece. Small enough that a 1 MB all-reduce still pipelines
/// over a few pieces per phase, large enough that per-piece overhead is negligible.
pub const DEFAULT_PIECE_BYTES: usize = 256 << 10;

/// Pieces queued for the sender task beyond what quinn already buffers (its send window).
const SEND_QUEUE_PIECES: usize = 8;

/// Segments taken from quinn per wakeup of the receiving loop.
const READ_BATCH: usize = 32;

/// Longest refusal reason sent in a hello reply (the frame limit is `MAX_HELLO_FRAME`).
const MAX_REFUSAL_REASON: usize = 768;

/// How long a refusing rank waits for the refused peer to read the refusal and close.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// Pause between connection attempts to a successor that is not up yet.
const CONNECT_RETRY: Duration = Duration::from_millis(100);

struct Links {
    /// Kept so the endpoint (and its driver) lives as long as the ring.
    _endpoint: quinn::Endpoint,
    succ: quinn::Connection,
    pred: quinn::Connection,
    succ_desc: String,
    pred_desc: String,
}

/// Ring all-reduce, reduce-scatter and all-gather over QUIC; see the module docs. Build it
/// with [`form_ring`].
pub struct RingCollective {
    rank: u32,
    world: u32,
    generation: u64,
    /// `None` when W = 1: every collective is a no-op.
    links: Option<Links>,
    call_timeout: Duration,
    piece_elems: usize,
    /// The stream of the last call, finished but possibly not yet acknowledged; `shutdown`
    /// waits on it so closing the connection cannot discard data the successor still needs.
    last_stream: Option<quinn::SendStream>,
}

impl std::fmt::Debug for RingCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingCollective")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("generation", &self.generation)
            .field("successor", &self.links.as_ref().map(|l| &l.succ_desc))
            .field("predecessor", &self.links.as_ref().map(|l| &l.pred_desc))
            .finish()
    }
}

fn peer_desc(role: &str, rank: u32, addr: SocketAddr) -> String {
    format!("{role} rank {rank} ({addr})")
}

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
fn conn_err(peer: &str, ce: &ConnectionError) -> CollectiveError {
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
    let (tx, mut rx) = mpsc::channel::<Result<quinn::Connection, String>>(4);
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
                Ok(conn) => return Ok(conn),
                Err(note) => {
                    if let Ok(mut v) = refusals.lock() {
                        v.push(note);
                    }
                }
            },
        }
    }
}

async fn check_incoming_task(
    incoming: quinn::Incoming,
    me: Arc<Me>,
    pred_rank: u32,
    timeout: Duration,
    tx: mpsc::Sender<Result<quinn::Connection, String>>,
) {
    let remote = incoming.remote_address();
    let conn = match tokio::time::timeout(timeout, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            let why = describe_connection_error(&e);
            tracing::warn!(%remote, %why, "incoming ring connection failed during handshake");
            let _ = tx.send(Err(format!("{remote}: handshake failed: {why}"))).await;
            return;
        }
        Err(_) => {
            let _ = tx.send(Err(format!("{remote}: handshake did not complete"))).await;
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
            if tx.send(Ok(conn.clone())).await.is_err() {
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
            let _ = tx.send(Err(format!("{remote}: {} {reason}", close::close_code_name(code)))).await;
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

impl RingCollective {
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Bound of each collective call (defaults to the formation timeout).
    pub fn set_call_timeout(&mut self, timeout: Duration) {
        self.call_timeout = timeout;
    }

    /// Size of pipelined pieces (rounded down to whole f32, at least one element). All ranks
    /// need not agree: piece boundaries are local to each side.
    pub fn set_piece_bytes(&mut self, bytes: usize) {
        self.piece_elems = (bytes / 4).max(1);
    }

    /// QUIC statistics of the link to the successor (what we send: bytes, losses, congestion,
    /// MTU) and of the link from the predecessor, if W > 1. For metrics and benchmarks.
    pub fn link_stats(&self) -> Option<(quinn::ConnectionStats, quinn::ConnectionStats)> {
        self.links.as_ref().map(|l| (l.succ.stats(), l.pred.stats()))
    }

    /// Address of the successor, if W > 1.
    pub fn successor_addr(&self) -> Option<SocketAddr> {
        self.links.as_ref().map(|l| l.succ.remote_address())
    }

    /// Close the ring after the successor has acknowledged the data of the last call (bounded
    /// by `grace`), so it can finish that call even though we are leaving.
    pub async fn shutdown(mut self, grace: Duration) {
        if let Some(s) = self.last_stream.take() {
            let _ = tokio::time::timeout(grace, s.stopped()).await;
        }
        // Drop closes the connections.
    }

    /// Run `phases` of the ring schedule (see `schedule`) on `data`: all-reduce `0..2(W-1)`,
    /// reduce-scatter `0..W-1`, all-gather `W-1..2(W-1)`.
    async fn run_phases(
        &mut self,
        op: Op,
        data: &mut [f32],
        tag: CollectiveTag,
        phases: std::ops::Range<u32>,
    ) -> Result<(), CollectiveError> {
        if self.links.is_none() {
            return Ok(()); // W = 1
        }
        let sched = Schedule::new(data.len(), self.world, self.rank, self.piece_elems, phases);
        self.run(op, data, tag, sched).await
    }

    /// Run the phases of `sched` (see `schedule`) on `data`. Every collective goes through
    /// here. A schedule that does not start at phase 0 (the all-gather) works the same way:
    /// its first phase sends from the local buffer (`Schedule::first_sends`), and whether a
    /// received value is added or overwrites depends on the phase, not on the operation.
    async fn run(&mut self, op: Op, data: &mut [f32], tag: CollectiveTag, sched: Schedule) -> Result<(), CollectiveError> {
        let Some(links) = &self.links else {
            return Ok(());
        };
        let deadline = Instant::now() + self.call_timeout;
        let ctx = CallCtx { rank: self.rank, world: self.world, tag, after: self.call_timeout, links };
        let count = data.len() as u64;
        let ours = StreamHeader { version: PROTOCOL_VERSION, op: op as u32, from_rank: self.rank, generation: self.generation, tag, count };
        let expected = StreamHeader { from_rank: (self.rank + self.world - 1) % self.world, ..ours };

        // Open our stream and start the sender; it writes the header at once.
        let send = match tokio::time::timeout_at(deadline, links.succ.open_uni()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(conn_err(&links.succ_desc, &e)),
            Err(_) => return Err(ctx.timeout("opening the stream", &links.succ_desc)),
        };
        let (tx, rx) = mpsc::channel::<Bytes>(SEND_QUEUE_PIECES);
        let written = Arc::new(AtomicUsize::new(0));
        // Code our stream is reset with if this call fails: the successor learns whether we
        // gave up (ABORTED) or saw a protocol violation (PROTOCOL_ERROR).
        let abort_code = Arc::new(AtomicU64::new(close::ABORTED.into_inner()));
        let mut sender = AbortOnDrop(tokio::spawn(send_pieces(
            ResetOnDrop { stream: Some(send), code: abort_code.clone() },
            ours.encode(),
            rx,
            written.clone(),
        )));
        let mut tx = Some(tx);
        let mut next_send = 0usize;
        let mut sender_result: Option<Result<quinn::SendStream, SendFailure>> = None;

        // Queue what we can before waiting for the predecessor, so data flows at once.
        let mut cursor = Incoming::new(&sched);
        produce(&sched, data, &cursor, &mut next_send, &tx);

        // The predecessor's stream and its header.
        let recv = match tokio::time::timeout_at(deadline, links.pred.accept_uni()).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(conn_err(&links.pred_desc, &e)),
            Err(_) => {
                let phase = format!("{} (waiting for the predecessor's stream)", phase_name(sched.phases.start, self.world));
                return Err(ctx.timeout(&phase, &links.pred_desc));
            }
        };
        let mut recv = StopOnDrop { stream: recv, code: Some(close::ABORTED) };
        let mut hdr = [0u8; HEADER_LEN];
        match tokio::time::timeout_at(deadline, recv.stream.read_exact(&mut hdr)).await {
            Ok(Ok(())) => {}
            Ok(Err(quinn::ReadExactError::FinishedEarly(got))) => {
                protocol_failure(&mut recv, &abort_code);
                return Err(CollectiveError::Protocol(format!(
                    "{} ended its {tag} stream after {got} of {HEADER_LEN} header bytes",
                    links.pred_desc
                )));
            }
            Ok(Err(quinn::ReadExactError::ReadError(e))) => return Err(ctx.read_err(&links.pred_desc, e)),
            Err(_) => {
                let phase = format!("{} (waiting for the stream header)", phase_name(sched.phases.start, self.world));
                return Err(ctx.timeout(&phase, &links.pred_desc));
            }
        }
        let got = StreamHeader::decode(&hdr);
        let mismatch = match &got {
            None => Some("a stream that is not a troupe collective stream (bad magic)".to_string()),
            Some(h) => expected.mismatch(h),
        };
        if let Some(what) = mismatch {
            protocol_failure(&mut recv, &abort_code);
            return Err(CollectiveError::Protocol(format!("rank {} running {tag} received from {}: {what}", self.rank, links.pred_desc)));
        }

        let mut bufs: [Bytes; READ_BATCH] = std::array::from_fn(|_| Bytes::new());
        let sleep = tokio::time::sleep_until(deadline);
        tokio::pin!(sleep);
        loop {
            produce(&sched, data, &cursor, &mut next_send, &tx);
            if next_send == sched.sends.len() {
                // Closing the queue tells the sender to finish the stream after the last piece.
                tx = None;
            }
            let receiving = !cursor.is_complete(&sched);
            if !receiving && tx.is_none() {
                break;
            }
            let queue_full = tx.is_some() && sched.send_ready(next_send, cursor.items_done());
            tokio::select! {
                r = recv.stream.read_chunks(&mut bufs), if receiving => match r {
                    Ok(Some(k)) => {
                        for b in bufs.iter_mut().take(k) {
                            if let Err(excess) = cursor.feed(&sched, data, b) {
                                protocol_failure(&mut recv, &abort_code);
                                return Err(CollectiveError::Protocol(format!(
                                    "{} sent {} bytes more than the {count} elements announced for {tag}",
                                    links.pred_desc, excess.0
                                )));
                            }
                            *b = Bytes::new();
                        }
                    }
                    Ok(None) => {
                        protocol_failure(&mut recv, &abort_code);
                        let (item, got) = cursor.current(&sched).map(|(i, g)| (i.range.len(), g)).unwrap_or((0, 0));
                        return Err(CollectiveError::Protocol(format!(
                            "{} ended its {tag} stream early, in {} ({got} of {item} elements of a piece)",
                            links.pred_desc,
                            ctx.recv_phase(&sched, &cursor)
                        )));
                    }
                    Err(e) => return Err(ctx.read_err(&links.pred_desc, e)),
                },
                permit = reserve_slot(&tx), if queue_full => match permit {
                    Some(p) => {
                        p.send(encode_f32s(&data[sched.sends[next_send].range.clone()]));
                        next_send += 1;
                    }
                    // The queue closed: the sender task ended, and its result says why.
                    None => {
                        let r = match sender_result.take() {
                            Some(r) => r,
                            None => flatten_join((&mut sender.0).await),
                        };
                        let e = r.err().unwrap_or(SendFailure::Closed);
                        return Err(ctx.send_err(&sched, &written, &e));
                    }
                },
                r = &mut sender.0, if sender_result.is_none() => {
                    let r = flatten_join(r);
                    if let Err(e) = &r {
                        return Err(ctx.send_err(&sched, &written, e));
                    }
                    sender_result = Some(r);
                },
                _ = &mut sleep => {
                    return Err(if receiving {
                        ctx.timeout(&ctx.recv_phase(&sched, &cursor), &links.pred_desc)
                    } else {
                        ctx.timeout(&ctx.send_phase(&sched, &written), &links.succ_desc)
                    });
                }
            }
        }

        // Everything received; the predecessor must end its stream here, not send more.
        let mut extra = [0u8; 1];
        match tokio::time::timeout_at(deadline, recv.stream.read(&mut extra)).await {
            Ok(Ok(None)) => recv.code = None, // fully read; nothing to stop
            Ok(Ok(Some(_))) => {
                protocol_failure(&mut recv, &abort_code);
                return Err(CollectiveError::Protocol(format!(
                    "{} sent more than the {count} elements announced for {tag}",
                    links.pred_desc
                )));
            }
            Ok(Err(e)) => return Err(ctx.read_err(&links.pred_desc, e)),
            Err(_) => return Err(ctx.timeout("waiting for the end of the predecessor's stream", &links.pred_desc)),
        }

        // Wait until the sender has handed everything to quinn and finished the stream.
        let stream = match sender_result {
            Some(r) => r,
            None => match tokio::time::timeout_at(deadline, &mut sender.0).await {
                Ok(r) => flatten_join(r),
                Err(_) => return Err(ctx.timeout(&ctx.send_phase(&sched, &written), &links.succ_desc)),
            },
        }
        .map_err(|e| ctx.send_err(&sched, &written, &e))?;
        self.last_stream = Some(stream);
        Ok(())
    }
}

/// Queue every ready piece the queue has room for, without waiting.
fn produce(sched: &Schedule, data: &[f32], cursor: &Incoming, next: &mut usize, tx: &Option<mpsc::Sender<Bytes>>) {
    let Some(tx) = tx else { return };
    while *next < sched.sends.len() && sched.send_ready(*next, cursor.items_done()) {
        match tx.try_reserve() {
            Ok(permit) => {
                permit.send(encode_f32s(&data[sched.sends[*next].range.clone()]));
                *next += 1;
            }
            // Full: the select waits for room. Closed: the sender failed; its result says why.
            Err(_) => break,
        }
    }
}

/// Wait for room in the send queue; `None` if the sender task is gone.
async fn reserve_slot(tx: &Option<mpsc::Sender<Bytes>>) -> Option<mpsc::Permit<'_, Bytes>> {
    match tx {
        Some(t) => t.reserve().await.ok(),
        None => std::future::pending().await,
    }
}

/// Per-call context for error messages.
struct CallCtx<'a> {
    rank: u32,
    world: u32,
    tag: CollectiveTag,
    after: Duration,
    links: &'a Links,
}

impl CallCtx<'_> {
    fn timeout(&self, phase: &str, peer: &str) -> CollectiveError {
        CollectiveError::Timeout { rank: self.rank, tag: self.tag, phase: phase.to_string(), peer: peer.to_string(), after: self.after }
    }

    fn recv_phase(&self, sched: &Schedule, cursor: &Incoming) -> String {
        match cursor.current(sched) {
            Some((item, got)) => format!(
                "{} (receiving chunk {}: {} of {} elements of piece {}..{})",
                phase_name(item.phase, self.world),
                item.chunk,
                got,
                item.range.len(),
                item.range.start,
                item.range.end
            ),
            None => "receiving (complete)".into(),
        }
    }

    fn send_phase(&self, sched: &Schedule, written: &AtomicUsize) -> String {
        let done = written.load(Ordering::Relaxed);
        match sched.sends.get(done) {
            Some(item) => format!(
                "{} (sending chunk {}: {done} of {} pieces written)",
                phase_name(item.phase, self.world),
                item.chunk,
                sched.sends.len()
            ),
            None => "finishing the stream to the successor".into(),
        }
    }

    fn read_err(&self, peer: &str, e: ReadError) -> CollectiveError {
        match e {
            ReadError::ConnectionLost(ce) => conn_err(peer, &ce),
            ReadError::Reset(code) if code == close::PROTOCOL_ERROR => CollectiveError::Protocol(format!(
                "{peer} aborted its stream for {} with PROTOCOL_ERROR: it saw a mismatch (its own error names it)",
                self.tag
            )),
            other => CollectiveError::PeerClosed {
                peer: peer.to_string(),
                reason: format!("during {}: {}", self.tag, describe_read_error(&other)),
            },
        }
    }

    fn send_err(&self, sched: &Schedule, written: &AtomicUsize, e: &SendFailure) -> CollectiveError {
        let peer = &self.links.succ_desc;
        let phase = self.send_phase(sched, written);
        match e {
            SendFailure::Write(WriteError::ConnectionLost(ce)) => conn_err(peer, ce),
            SendFailure::Write(WriteError::Stopped(code)) if *code == close::PROTOCOL_ERROR => CollectiveError::Protocol(format!(
                "{peer} rejected our stream for {} during {phase} (see its log for the mismatch)",
                self.tag
            )),
            SendFailure::Write(w) => CollectiveError::PeerClosed {
                peer: peer.clone(),
                reason: format!("during {phase} of {}: {}", self.tag, close::describe_write_error(w)),
            },
            SendFailure::Closed => {
                CollectiveError::PeerClosed { peer: peer.clone(), reason: format!("stream closed during {phase} of {}", self.tag) }
            }
            SendFailure::Panicked(msg) => CollectiveError::Protocol(format!("sender task failed: {msg}")),
        }
    }
}

#[derive(Debug)]
enum SendFailure {
    Write(WriteError),
    Closed,
    Panicked(String),
}

fn flatten_join(r: Result<Result<quinn::SendStream, SendFailure>, tokio::task::JoinError>) -> Result<quinn::SendStream, SendFailure> {
    r.unwrap_or_else(|e| Err(SendFailure::Panicked(e.to_string())))
}

/// The sender task: header, then queued pieces in order, then finish. Returns the stream so
/// the ring can wait for its acknowledgement at shutdown.
async fn send_pieces(
    mut guard: ResetOnDrop,
    header: [u8; HEADER_LEN],
    mut rx: mpsc::Receiver<Bytes>,
    written: Arc<AtomicUsize>,
) -> Result<quinn::SendStream, SendFailure> {
    let Some(s) = guard.stream.as_mut() else {
        return Err(SendFailure::Closed);
    };
    s.write_all(&header).await.map_err(SendFailure::Write)?;
    while let Some(piece) = rx.recv().await {
        s.write_chunk(piece).await.map_err(SendFailure::Write)?;
        written.fetch_add(1, Ordering::Relaxed);
    }
    s.finish().map_err(|_| SendFailure::Closed)?;
    guard.stream.take().ok_or(SendFailure::Closed)
}

/// A send stream abandoned mid-call (error, timeout, cancelled call) is reset with ABORTED,
/// so the successor sees "aborted" instead of a stream that looks cleanly finished but short
/// (quinn finishes streams on drop).
struct ResetOnDrop {
    stream: Option<quinn::SendStream>,
    code: Arc<AtomicU64>,
}

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if let Some(s) = &mut self.stream {
            let code = VarInt::from_u64(self.code.load(Ordering::Relaxed)).unwrap_or(close::ABORTED);
            let _ = s.reset(code);
        }
    }
}

/// A protocol violation by the predecessor: stop its stream and reset ours with
/// PROTOCOL_ERROR, so both neighbours learn why the call failed.
fn protocol_failure(recv: &mut StopOnDrop, abort_code: &AtomicU64) {
    recv.code = Some(close::PROTOCOL_ERROR);
    abort_code.store(close::PROTOCOL_ERROR.into_inner(), Ordering::Relaxed);
}

/// Stops an incompletely read receive stream with a meaningful code (quinn would use 0).
struct StopOnDrop {
    stream: quinn::RecvStream,
    /// `None` once the stream has been read to its end.
    code: Option<VarInt>,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(code) = self.code {
            let _ = self.stream.stop(code);
        }
    }
}

/// Aborts the sender task if the call ends early, including when the caller drops the call.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Dropping closes both links at once: data of the last call the successor has not yet
/// received is lost (use [`RingCollective::shutdown`] to wait for it), and the close itself
/// may not reach a peer whose congestion window is full (quinn#2785), which then sees a
/// reset instead of SHUTDOWN.
impl Drop for RingCollective {
    fn drop(&mut self) {
        if let Some(l) = &self.links {
            l.succ.close(close::SHUTDOWN, b"ring closed");
            l.pred.close(close::SHUTDOWN, b"ring closed");
        }
    }
}

impl Collective for RingCollective {
    fn rank(&self) -> u32 {
        self.rank
    }

    fn world_size(&self) -> u32 {
        self.world
    }

    async fn all_reduce_sum(&mut self, data: &mut [f32], tag: CollectiveTag) -> Result<(), CollectiveError> {
        let steps = self.world - 1;
        let span = tracing::debug_span!("all_reduce_sum", rank = self.rank, step = tag.step, seq = tag.seq, len = data.len());
        self.run_phases(Op::AllReduceSum, data, tag, 0..2 * steps).instrument(span).await
    }

    async fn reduce_scatter_sum(&mut self, data: &mut [f32], tag: CollectiveTag) -> Result<(), CollectiveError> {
        check_chunked_len("reduce_scatter_sum", data.len(), self.world)?;
        let steps = self.world - 1;
        let span = tracing::debug_span!("reduce_scatter_sum", rank = self.rank, step = tag.step, seq = tag.seq, len = data.len());
        self.run_phases(Op::ReduceScatterSum, data, tag, 0..steps).instrument(span).await
    }

    async fn all_gather(&mut self, data: &mut [f32], tag: CollectiveTag) -> Result<(), CollectiveError> {
        check_chunked_len("all_gather", data.len(), self.world)?;
        let steps = self.world - 1;
        let span = tracing::debug_span!("all_gather", rank = self.rank, step = tag.step, seq = tag.seq, len = data.len());
        self.run_phases(Op::AllGather, data, tag, steps..2 * steps).instrument(span).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::test_util::endpoint;

    const T: Duration = Duration::from_secs(20);

    async fn form(w: u32, tokens: &[&str], gens: &[u64], timeout: Duration) -> Vec<Result<RingCollective, CollectiveError>> {
        let eps: Vec<_> = (0..w).map(|_| endpoint()).collect();
        let addrs: Vec<_> = eps.iter().map(|e| e.local_addr().unwrap()).collect();
        let mut handles = Vec::new();
        for r in 0..w {
            let ep = eps[r as usize].clone();
            let succ = addrs[((r + 1) % w) as usize];
            let tok = tokens[r as usize].to_string();
            let g = gens[r as usize];
            handles.push(tokio::spawn(async move { form_ring(&ep, r, w, g, succ, &tok, timeout).await }));
        }
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap());
        }
        out
    }

    async fn ring(w: u32) -> Vec<RingCollective> {
        let toks = vec!["tok"; w as usize];
        let gens = vec![7; w as usize];
        form(w, &toks, &gens, T).await.into_iter().map(|r| r.unwrap()).collect()
    }

    /// Which collective a rank runs in `call_all`.
    #[derive(Debug, Clone, Copy)]
    enum Call {
        AllReduce,
        ReduceScatter,
        AllGather,
    }

    /// Run one collective on every rank concurrently, each with its own call and tag.
    async fn call_all(
        rings: Vec<RingCollective>,
        inputs: Vec<Vec<f32>>,
        calls: Vec<Call>,
        tags: Vec<CollectiveTag>,
    ) -> Vec<(RingCollective, Vec<f32>, Result<(), CollectiveError>)> {
        let mut hs = Vec::new();
        for (((mut ring, mut data), call), tag) in rings.into_iter().zip(inputs).zip(calls).zip(tags) {
            hs.push(tokio::spawn(async move {
                let r = match call {
                    Call::AllReduce => ring.all_reduce_sum(&mut data, tag).await,
                    Call::ReduceScatter => ring.reduce_scatter_sum(&mut data, tag).await,
                    Call::AllGather => ring.all_gather(&mut data, tag).await,
                };
                (ring, data, r)
            }));
        }
        let mut out = Vec::new();
        for h in hs {
            out.push(h.await.unwrap());
        }
        out
    }

    /// Run one all-reduce on every rank concurrently, each with its own tag.
    async fn all_reduce(
        rings: Vec<RingCollective>,
        inputs: Vec<Vec<f32>>,
        tags: Vec<CollectiveTag>,
    ) -> Vec<(RingCollective, Vec<f32>, Result<(), CollectiveError>)> {
        let calls = vec![Call::AllReduce; rings.len()];
        call_all(rings, inputs, calls, tags).await
    }

    /// The same call with the same tag on every rank; panics (naming `what`) if any fails.
    async fn call_ok(
        rings: Vec<RingCollective>,
        inputs: Vec<Vec<f32>>,
        call: Call,
        tag: CollectiveTag,
        what: &str,
    ) -> (Vec<RingCollective>, Vec<Vec<f32>>) {
        let w = rings.len();
        let mut kept = Vec::new();
        let mut outs = Vec::new();
        for (rank, (ring, data, r)) in call_all(rings, inputs, vec![call; w], vec![tag; w]).await.into_iter().enumerate() {
            r.unwrap_or_else(|e| panic!("{what} ({call:?}) rank {rank}: {e}"));
            kept.push(ring);
            outs.push(data);
        }
        (kept, outs)
    }

    fn input(n: usize, rank: u32, salt: u64) -> Vec<f32> {
        // Integer values: every partial sum is exact in f32, so any order of addition agrees.
        (0..n).map(|i| ((i as u64 * 31 + rank as u64 * 17 + salt * 13) % 1000) as f32).collect()
    }

    /// Small deterministic generator for test lengths.
    fn lengths(seed: u64, k: usize, max: u64) -> Vec<usize> {
        let mut x = seed;
        (0..k)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((x >> 33) % max) as usize
            })
            .collect()
    }

    async fn check_sums(w: u32, lens: &[usize], piece_bytes: &[usize]) {
        let mut rings = ring(w).await;
        for (r, pb) in rings.iter_mut().zip(piece_bytes.iter().cycle()) {
            r.set_piece_bytes(*pb);
        }
        for (seq, &n) in lens.iter().enumerate() {
            let tag = CollectiveTag { step: seq as u64 / 3, seq: seq as u64 };
            let inputs: Vec<_> = (0..w).map(|r| input(n, r, seq as u64)).collect();
            let expect: Vec<f32> = (0..n).map(|i| inputs.iter().map(|v| v[i]).sum()).collect();
            let res = all_reduce(rings, inputs, vec![tag; w as usize]).await;
            rings = Vec::new();
            for (rank, (ring, data, r)) in res.into_iter().enumerate() {
                r.unwrap_or_else(|e| panic!("W={w} n={n} rank {rank}: {e}"));
                assert!(data == expect, "W={w} n={n} rank {rank}: wrong sum");
                rings.push(ring);
            }
        }
        for r in rings {
            r.shutdown(Duration::from_secs(1)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn w1_is_a_noop() {
        let mut r = ring(1).await;
        let mut d = vec![1.0, 2.0];
        r[0].all_reduce_sum(&mut d, CollectiveTag { step: 0, seq: 0 }).await.unwrap();
        assert_eq!(d, vec![1.0, 2.0]);
        assert_eq!((r[0].rank(), r[0].world_size()), (0, 1));
        let ep = endpoint();
        let bad = form_ring(&ep, 3, 3, 0, ep.local_addr().unwrap(), "t", T).await;
        assert!(matches!(bad, Err(CollectiveError::InvalidArgument(_))));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn w2_sums() {
        let mut lens = vec![0, 1, 2, 3, 1_000_003];
        lens.extend(lengths(1, 6, 200_000));
        // Mixed piece sizes across ranks: boundaries are local, streams still line up.
        check_sums(2, &lens, &[DEFAULT_PIECE_BYTES, 4096 + 4]).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn w3_sums() {
        let mut lens = vec![0, 1, 2, 4, 5, 1_000_001];
        lens.extend(lengths(2, 6, 200_000));
        check_sums(3, &lens, &[DEFAULT_PIECE_BYTES, 1000, 64 << 10]).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn many_sequential_calls() {
        let lens = lengths(3, 60, 5000);
        check_sums(3, &lens, &[4096]).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn tag_mismatch_is_a_protocol_error_naming_both_tags() {
        let rings = ring(2).await;
        let tags = vec![CollectiveTag { step: 4, seq: 10 }, CollectiveTag { step: 4, seq: 11 }];
        let res = all_reduce(rings, vec![input(1000, 0, 0), input(1000, 1, 0)], tags).await;
        let mut named_both = false;
        for (_, _, r) in &res {
            let e = r.as_ref().expect_err("mismatched tags must fail");
            assert!(matches!(e, CollectiveError::Protocol(_)), "{e}");
            let m = e.to_string();
            named_both |= m.contains("step 4 seq 10") && m.contains("step 4 seq 11");
        }
        assert!(named_both, "{:?}", res.iter().map(|r| r.2.as_ref().err().map(|e| e.to_string())).collect::<Vec<_>>());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn silent_peer_times_out_naming_phase_and_peer() {
        let mut rings = ring(2).await;
        let timeout = Duration::from_millis(800);
        rings[0].set_call_timeout(timeout);
        let mut d = input(10_000, 0, 0);
        let t0 = std::time::Instant::now();
        let e = rings[0].all_reduce_sum(&mut d, CollectiveTag { step: 1, seq: 1 }).await.unwrap_err();
        let took = t0.elapsed();
        assert!(took >= timeout && took < timeout + Duration::from_secs(1), "{took:?}");
        match &e {
            CollectiveError::Timeout { phase, peer, tag, .. } => {
                assert!(phase.contains("reduce-scatter step 1/1"), "{e}");
                assert!(peer.contains("predecessor rank 1"), "{e}");
                assert_eq!(*tag, CollectiveTag { step: 1, seq: 1 });
            }
            other => panic!("expected Timeout, got {other}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn stalled_stream_times_out_mid_phase() {
        let mut rings = ring(2).await;
        let timeout = Duration::from_millis(800);
        rings[0].set_call_timeout(timeout);
        let tag = CollectiveTag { step: 2, seq: 5 };
        let n = 10_000;
        // Rank 1 sends a valid header and a few elements, then stalls.
        let links = rings[1].links.as_ref().unwrap();
        let mut s = links.succ.open_uni().await.unwrap();
        let h = StreamHeader { version: PROTOCOL_VERSION, op: Op::AllReduceSum as u32, from_rank: 1, generation: 7, tag, count: n as u64 };
        s.write_all(&h.encode()).await.unwrap();
        s.write_all(&[0u8; 4 * 100 + 2]).await.unwrap();
        let mut d = input(n, 0, 0);
        let t0 = std::time::Instant::now();
        let e = rings[0].all_reduce_sum(&mut d, tag).await.unwrap_err();
        assert!(t0.elapsed() < timeout + Duration::from_secs(1));
        let m = e.to_string();
        assert!(matches!(e, CollectiveError::Timeout { .. }), "{m}");
        assert!(m.contains("reduce-scatter step 1/1") && m.contains("100 of") && m.contains("predecessor rank 1"), "{m}");
    }

    /// Every rank fails; a rank whose hello was checked gets a clear refusal. A rank whose
    /// successor gave up before even accepting its connection can only time out: that is
    /// inherent (nobody serves the successor's endpoint any more), so it is allowed here.
    fn assert_refused(res: &[Result<RingCollective, CollectiveError>], code: &str) {
        let mut refused = 0;
        for (rank, r) in res.iter().enumerate() {
            match r {
                Err(e @ CollectiveError::Refused { .. }) => {
                    assert!(e.to_string().contains(code), "rank {rank}: {e}");
                    refused += 1;
                }
                Err(e @ CollectiveError::FormationTimeout { .. }) => {
                    assert!(e.to_string().contains("successor"), "rank {rank}: {e}")
                }
                Err(e) => panic!("rank {rank}: unexpected error {e}"),
                Ok(_) => panic!("rank {rank} formed a ring despite the mismatch"),
            }
        }
        assert!(refused >= 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn wrong_token_is_refused() {
        let res = form(2, &["right", "wrong"], &[1, 1], Duration::from_secs(2)).await;
        assert_refused(&res, "AUTH_FAILED");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn wrong_generation_is_refused() {
        let res = form(3, &["t", "t", "t"], &[5, 5, 4], Duration::from_secs(2)).await;
        assert_refused(&res, "GENERATION_MISMATCH");
        // Rank 2 (stale) is refused by rank 0, which keeps waiting and then says what it refused.
        for rank in [0, 2] {
            let e = res[rank].as_ref().err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains("GENERATION_MISMATCH"), "rank {rank}: {e}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn broadcast_gives_every_rank_the_roots_bits() {
        let rings = ring(3).await;
        let n = 5000;
        let root_data: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin() * 1e-3 + if i % 7 == 0 { 1e-40 } else { 0.0 }).collect();
        let mut hs = Vec::new();
        for (r, mut ring) in rings.into_iter().enumerate() {
            let mut d = if r == 1 { root_data.clone() } else { vec![99.0 + r as f32; n] };
            hs.push(tokio::spawn(async move {
                ring.broadcast(&mut d, 1, CollectiveTag { step: 3, seq: 1 }).await.unwrap();
                (ring, d) // the ring stays open until every rank is done
            }));
        }
        let mut kept = Vec::new();
        for h in hs {
            let (ring, got) = h.await.unwrap();
            kept.push(ring);
            assert!(got.iter().zip(&root_data).all(|(a, b)| a.to_bits() == b.to_bits()), "every rank holds the root's exact values");
        }
    }

    /// Values of many magnitudes, so the order of additions shows in the bits, plus values a
    /// copy must keep exactly: negative zero, subnormals and a NaN with a payload.
    fn odd_input(n: usize, rank: u32, salt: u64) -> Vec<f32> {
        (0..n)
            .map(|i| match (i + rank as usize) % 23 {
                5 => -0.0,
                11 => 1e-40 * (rank + 1) as f32,
                17 => f32::from_bits(0x7fc0_1234 + rank),
                _ => {
                    let x = (i as u64 * 31 + rank as u64 * 17 + salt * 13) as f32;
                    (x * 0.37).sin() * 10f32.powi((i % 9) as i32 - 4)
                }
            })
            .collect()
    }

    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    /// For every length (each a multiple of W): reduce-scatter leaves the exact sum of chunk r
    /// on rank r; all-gather gives every rank the owners' chunks bit for bit; reduce-scatter
    /// then all-gather is bitwise the all-reduce.
    async fn check_chunked(w: u32, lens: &[usize], piece_bytes: &[usize]) {
        let mut rings = ring(w).await;
        for (r, pb) in rings.iter_mut().zip(piece_bytes.iter().cycle()) {
            r.set_piece_bytes(*pb);
        }
        let mut seq = 0u64;
        let mut tag = || {
            seq += 1;
            CollectiveTag { step: seq / 4, seq }
        };
        for &n in lens {
            assert_eq!(n % w as usize, 0, "test lengths are multiples of W");
            let k = n / w as usize;
            let chunk = |r: usize| r * k..(r + 1) * k;

            // Reduce-scatter of integer values: every order of addition gives the exact sum.
            let salt = tag().seq;
            let inputs: Vec<_> = (0..w).map(|r| input(n, r, salt)).collect();
            let expect: Vec<f32> = (0..n).map(|i| inputs.iter().map(|v| v[i]).sum()).collect();
            let what = format!("W={w} n={n} reduce_scatter");
            let (rs, outs) = call_ok(rings, inputs, Call::ReduceScatter, tag(), &what).await;
            rings = rs;
            for (r, d) in outs.iter().enumerate() {
                assert!(d[chunk(r)] == expect[chunk(r)], "{what}: rank {r} does not hold the sum of chunk {r}");
            }

            // All-gather: rank r contributes chunk r; the rest of its buffer is garbage.
            let owned: Vec<_> = (0..w).map(|r| odd_input(n, r, salt)).collect();
            let gather_in: Vec<Vec<f32>> = (0..w as usize)
                .map(|r| {
                    let mut d = vec![f32::from_bits(0xdead_0000 + r as u32); n];
                    d[chunk(r)].copy_from_slice(&owned[r][chunk(r)]);
                    d
                })
                .collect();
            let concat: Vec<f32> = (0..w as usize).flat_map(|r| owned[r][chunk(r)].to_vec()).collect();
            let what = format!("W={w} n={n} all_gather");
            let (rs, outs) = call_ok(rings, gather_in, Call::AllGather, tag(), &what).await;
            rings = rs;
            for (r, d) in outs.iter().enumerate() {
                assert!(same_bits(d, &concat), "{what}: rank {r} does not hold the concatenation");
            }

            // Reduce-scatter then all-gather == all-reduce, bit for bit (fractional values).
            let frac: Vec<Vec<f32>> =
                (0..w).map(|r| odd_input(n, r, salt + 1).into_iter().map(|x| if x.is_nan() { 0.5 } else { x }).collect()).collect();
            let what = format!("W={w} n={n} all_reduce vs reduce_scatter + all_gather");
            let (rs, reduced) = call_ok(rings, frac.clone(), Call::AllReduce, tag(), &what).await;
            let (rs, scattered) = call_ok(rs, frac, Call::ReduceScatter, tag(), &what).await;
            let (rs, gathered) = call_ok(rs, scattered, Call::AllGather, tag(), &what).await;
            rings = rs;
            for r in 0..w as usize {
                assert!(same_bits(&reduced[r], &reduced[0]), "{what}: all-reduce differs between ranks 0 and {r}");
                assert!(same_bits(&gathered[r], &reduced[r]), "{what}: rank {r} differs");
            }
        }
        for r in rings {
            r.shutdown(Duration::from_secs(1)).await;
        }
    }

    /// Multiples of W: 0, W itself, small ones, and ones spanning many pieces.
    fn chunked_lengths(w: u32, seed: u64) -> Vec<usize> {
        let w = w as usize;
        let mut lens = vec![0, w, 2 * w, 7 * w, 1000 * w, 75_013 * w];
        lens.extend(lengths(seed, 3, 100_000).into_iter().map(|n| n / w * w));
        lens
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn w2_reduce_scatter_and_all_gather() {
        check_chunked(2, &chunked_lengths(2, 11), &[DEFAULT_PIECE_BYTES, 4096 + 4]).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn w3_reduce_scatter_and_all_gather() {
        check_chunked(3, &chunked_lengths(3, 12), &[1000, 64 << 10, 4096]).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn w4_reduce_scatter_and_all_gather() {
        check_chunked(4, &chunked_lengths(4, 13), &[4096 + 4, 1000, DEFAULT_PIECE_BYTES, 512]).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn w1_reduce_scatter_and_all_gather_are_noops() {
        let mut r = ring(1).await;
        let mut d = vec![1.0, 2.0, 3.0];
        r[0].reduce_scatter_sum(&mut d, CollectiveTag { step: 0, seq: 0 }).await.unwrap();
        r[0].all_gather(&mut d, CollectiveTag { step: 0, seq: 1 }).await.unwrap();
        assert_eq!(d, vec![1.0, 2.0, 3.0]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn length_not_a_multiple_of_w_is_refused_before_any_traffic() {
        let w = 3;
        let mut rings = ring(w).await;
        let tag = |seq| CollectiveTag { step: 0, seq };
        for (seq, call, n) in [(1, Call::ReduceScatter, 7), (2, Call::AllGather, 4), (3, Call::ReduceScatter, 1)] {
            let inputs = (0..w).map(|r| input(n, r, 0)).collect();
            let res = call_all(rings, inputs, vec![call; w as usize], vec![tag(seq); w as usize]).await;
            rings = Vec::new();
            for (rank, (ring, _, r)) in res.into_iter().enumerate() {
                match r {
                    Err(e @ CollectiveError::InvalidArgument(_)) => {
                        let m = e.to_string();
                        assert!(m.contains(&format!("{n} elements over 3 ranks")) && m.contains("multiple"), "{m}");
                    }
                    other => panic!("{call:?} of {n} elements on rank {rank}: expected InvalidArgument, got {other:?}"),
                }
                rings.push(ring);
            }
        }
        // Nothing went on the wire: the next call (with the next tag) works.
        let inputs: Vec<_> = (0..w).map(|r| input(6, r, 0)).collect();
        let expect: Vec<f32> = (0..6).map(|i| inputs.iter().map(|v| v[i]).sum()).collect();
        let (rings, outs) = call_ok(rings, inputs, Call::AllReduce, tag(4), "after the refusals").await;
        assert!(outs.iter().all(|d| *d == expect));
        for r in rings {
            r.shutdown(Duration::from_secs(1)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn op_mismatch_is_a_protocol_error_naming_both_ops() {
        let rings = ring(2).await;
        let tag = CollectiveTag { step: 6, seq: 2 };
        let inputs = vec![input(1000, 0, 0), input(1000, 1, 0)];
        let res = call_all(rings, inputs, vec![Call::AllGather, Call::ReduceScatter], vec![tag; 2]).await;
        let mut named_both = false;
        for (_, _, r) in &res {
            let e = r.as_ref().expect_err("mismatched operations must fail");
            assert!(matches!(e, CollectiveError::Protocol(_)), "{e}");
            let m = e.to_string();
            named_both |= m.contains("all_gather") && m.contains("reduce_scatter_sum");
        }
        assert!(named_both, "{:?}", res.iter().map(|r| r.2.as_ref().err().map(|e| e.to_string())).collect::<Vec<_>>());
    }
}
