//! The trainer's side of the QUIC ring: calls into the generation's collective actor
//! (`actors::collective`), which owns the ring's connections and runs the calls one at a time
//! in mailbox order; blocking ([`Comm::run`]) or started in the background ([`Comm::start`]).

use std::sync::mpsc;

use ractor::ActorRef;
use troupe_common::collective::{CollectiveOp, CollectiveTag};

use super::{Comm, CommError, Pending};
use crate::actors::collective::CollectiveMsg;

pub struct RingHandle {
    pub actor: ActorRef<CollectiveMsg>,
}

impl Comm for RingHandle {
    fn run(&mut self, op: CollectiveOp, data: Vec<f32>, tag: CollectiveTag) -> Result<Vec<f32>, CommError> {
        self.start(op, data, tag).wait()
    }

    fn start(&mut self, op: CollectiveOp, data: Vec<f32>, tag: CollectiveTag) -> Pending {
        let (reply, result) = mpsc::sync_channel(1);
        match self.actor.cast(CollectiveMsg::Run { op, data, tag, reply }) {
            Ok(()) => Pending::Ring(result),
            Err(_) => Pending::Done(Err(CommError::RingClosed { when: "before the collective" })),
        }
    }
}
