//! The collectives of a world of one: nothing to combine (the trainer never calls them then,
//! and a world of one needs no link).

use super::{Comm, CommError};
use troupe_common::collective::{CollectiveOp, CollectiveTag};

pub struct Alone;

impl Comm for Alone {
    fn run(&mut self, _: CollectiveOp, data: Vec<f32>, _: CollectiveTag) -> Result<Vec<f32>, CommError> {
        Ok(data)
    }
}
