//! The trainer's side of the QUIC ring: blocking calls into the generation's collective actor
//! (`actors::collective`), which owns the ring's connections and runs the calls one at a time
//! in mailbox order.

use std::sync::mpsc;

use ractor::ActorRef;
use troupe_common::collective::{CollectiveOp, CollectiveTag};

use super::{Comm, CommError};
use crate::actors::collective::CollectiveMsg;

pub struct RingHandle {
    pub actor: ActorRef<CollectiveMsg>,
}

impl Comm for RingHandle {
    fn run(&mut self, op: CollectiveOp, data: Vec<f32>, tag: CollectiveTag) -> Result<Vec<f32>, CommError> {
        let (reply, result) = mpsc::sync_channel(1);
        self.actor
            .cast(CollectiveMsg::Run { op, data, tag, reply })
            .map_err(|_| CommError::RingClosed { when: "before the collective" })?;
        result.recv().map_err(|_| CommError::RingClosed { when: "during the collective" })?
    }
}
