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
use std::time::Duration;

use tracing::Instrument;

use super::{CollectiveError, CollectiveOp, CollectiveTag};
use crate::net::close;

mod call;
mod form;
#[cfg(test)]
mod tests;

pub use form::form_ring;

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

impl RingCollective {
    /// This rank, `0..world_size()`.
    pub fn rank(&self) -> u32 {
        self.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> u32 {
        self.world
    }

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

    /// Runs `op` on `data` with every other rank (see [`CollectiveOp`] for what each computes;
    /// all ranks call with the same op, tag and length). Chunked ops whose length the world
    /// does not divide, and a broadcast root outside the ring, are refused on every rank
    /// before any traffic. With one rank nothing moves.
    ///
    /// The ring has no broadcast of its own: it sums the root's values with zeros from every
    /// other rank, exact in IEEE arithmetic (`x + 0.0 == x`; only a negative zero turns
    /// positive, on every rank alike), at twice the traffic of a dedicated broadcast. It hands
    /// the training state to ranks that join or fell behind, which is rare.
    pub async fn run(&mut self, op: CollectiveOp, data: &mut [f32], tag: CollectiveTag) -> Result<(), CollectiveError> {
        op.check(data.len(), self.world)?;
        let steps = self.world - 1;
        let phases = match op {
            CollectiveOp::AllReduce => 0..2 * steps,
            CollectiveOp::Broadcast { root } => {
                if self.rank != root {
                    data.fill(0.0);
                }
                0..2 * steps
            }
            CollectiveOp::ReduceScatter => 0..steps,
            CollectiveOp::AllGather => steps..2 * steps,
        };
        let span = tracing::debug_span!("collective", op = op.name(), rank = self.rank, step = tag.step, seq = tag.seq, len = data.len());
        self.run_phases(op, data, tag, phases).instrument(span).await
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
