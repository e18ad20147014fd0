//! One collective call on the ring's two links: a stream to the successor fed by a sender
//! task, the predecessor's stream reduced into the buffer as it arrives (see the module docs
//! of `ring` for the pipelining, and `schedule` for the phases).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::{ReadError, VarInt, WriteError};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::form::conn_err;
use super::{Links, RingCollective, READ_BATCH, SEND_QUEUE_PIECES};
use crate::collective::schedule::{encode_f32s, phase_name, Incoming, Schedule};
use crate::collective::wire::{self, StreamHeader, HEADER_LEN};
use crate::collective::{CollectiveError, CollectiveOp, CollectiveTag};
use crate::net::close::{self, describe_read_error};
use troupe_core::proto::PROTOCOL_VERSION;

impl RingCollective {
    /// Run `phases` of the ring schedule (see `schedule`) on `data`: all-reduce `0..2(W-1)`,
    /// reduce-scatter `0..W-1`, all-gather `W-1..2(W-1)`.
    pub(super) async fn run_phases(
        &mut self,
        op: CollectiveOp,
        data: &mut [f32],
        tag: CollectiveTag,
        phases: std::ops::Range<u32>,
    ) -> Result<(), CollectiveError> {
        if self.links.is_none() {
            return Ok(()); // W = 1
        }
        let sched = Schedule::new(data.len(), self.world, self.rank, self.piece_elems, phases);
        self.run_schedule(op, data, tag, sched).await
    }

    /// Run the phases of `sched` (see `schedule`) on `data`. Every collective goes through
    /// here. A schedule that does not start at phase 0 (the all-gather) works the same way:
    /// its first phase sends from the local buffer (`Schedule::first_sends`), and whether a
    /// received value is added or overwrites depends on the phase, not on the operation.
    async fn run_schedule(
        &mut self,
        op: CollectiveOp,
        data: &mut [f32],
        tag: CollectiveTag,
        sched: Schedule,
    ) -> Result<(), CollectiveError> {
        let Some(links) = &self.links else {
            return Ok(());
        };
        let deadline = Instant::now() + self.call_timeout;
        let ctx = CallCtx { rank: self.rank, world: self.world, tag, after: self.call_timeout, links };
        let count = data.len() as u64;
        let ours = StreamHeader {
            version: PROTOCOL_VERSION,
            op: wire::op_code(op),
            from_rank: self.rank,
            generation: self.generation,
            tag,
            count,
        };
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
