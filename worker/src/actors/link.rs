//! The sending half of a worker's control stream, shared by the training worker and the eval
//! worker: a task that writes what is queued, and one that queues a heartbeat every period.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use troupe_common::net;
use troupe_core::proto::ToCoordinator;

/// Starts the writer of `send`; messages queued on the returned sender are written in order.
/// When every sender is dropped it finishes the stream and waits (briefly) until the
/// coordinator has read the last message: closing the connection would discard unsent data.
pub(crate) fn spawn_writer(mut send: quinn::SendStream) -> (mpsc::UnboundedSender<ToCoordinator>, JoinHandle<()>) {
    let (outbox, mut queued) = mpsc::unbounded_channel::<ToCoordinator>();
    let writer = tokio::spawn(async move {
        while let Some(msg) = queued.recv().await {
            if net::write_frame(&mut send, &msg).await.is_err() {
                break;
            }
        }
        if send.finish().is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
        }
    });
    (outbox, writer)
}

/// Queues a heartbeat on `outbox` every `period`, until the writer is gone.
pub(crate) fn spawn_heartbeats(outbox: mpsc::UnboundedSender<ToCoordinator>, period: Duration) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            if outbox.send(ToCoordinator::Heartbeat).is_err() {
                break;
            }
        }
    })
}
