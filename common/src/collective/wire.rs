//! What ring peers put on the wire: the hello that forms a link, and the fixed header that
//! starts every collective stream. Bulk data after the header is raw little-endian f32.

use serde::{Deserialize, Serialize};

use super::{CollectiveOp, CollectiveTag};

/// First frame on a new ring link, in both directions: the connecting rank sends its hello,
/// the accepting rank checks it and answers with its own. `proof` is `net::join_proof` with
/// the cluster token, so the token itself never travels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerHello {
    pub protocol_version: u32,
    pub generation: u64,
    pub from_rank: u32,
    pub world_size: u32,
    pub proof: [u8; 32],
}

/// The accepting rank's answer to a [`PeerHello`]. A refusal travels as a frame (and the
/// refused side closes the connection) so the reason reliably reaches the peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    Welcome(PeerHello),
    /// `code` is one of `net::close`'s codes; `reason` says what did not match.
    Refused {
        code: u64,
        reason: String,
    },
}

/// A hello is ~60 bytes; anything much larger is not a hello.
pub(crate) const MAX_HELLO_FRAME: usize = 1024;

/// Identifies a troupe collective stream ("TRC1"); catches a peer that is not one.
const MAGIC: [u8; 4] = *b"TRC1";

/// The operation code in the stream header, so a peer running another collective is caught.
/// A broadcast travels as the all-reduce it is made of (see `RingCollective::run`).
pub(crate) fn op_code(op: CollectiveOp) -> u32 {
    match op {
        CollectiveOp::AllReduce | CollectiveOp::Broadcast { .. } => 1,
        CollectiveOp::ReduceScatter => 2,
        CollectiveOp::AllGather => 3,
    }
}

/// The name of an operation code, for errors.
fn op_name(code: u32) -> String {
    match code {
        1 => CollectiveOp::AllReduce.name().into(),
        2 => CollectiveOp::ReduceScatter.name().into(),
        3 => CollectiveOp::AllGather.name().into(),
        other => format!("unknown collective {other}"),
    }
}

/// magic 4 | version u32 | op u32 | from_rank u32 | generation u64 | step u64 | seq u64 |
/// element count u64, all little-endian.
pub(crate) const HEADER_LEN: usize = 48;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StreamHeader {
    pub version: u32,
    pub op: u32,
    pub from_rank: u32,
    pub generation: u64,
    pub tag: CollectiveTag,
    pub count: u64,
}

impl StreamHeader {
    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.op.to_le_bytes());
        b[12..16].copy_from_slice(&self.from_rank.to_le_bytes());
        b[16..24].copy_from_slice(&self.generation.to_le_bytes());
        b[24..32].copy_from_slice(&self.tag.step.to_le_bytes());
        b[32..40].copy_from_slice(&self.tag.seq.to_le_bytes());
        b[40..48].copy_from_slice(&self.count.to_le_bytes());
        b
    }

    /// Parse a header; `None` if the magic is wrong (not a troupe collective stream).
    pub(crate) fn decode(b: &[u8; HEADER_LEN]) -> Option<Self> {
        if b[0..4] != MAGIC {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(x)
        };
        Some(StreamHeader {
            version: u32_at(4),
            op: u32_at(8),
            from_rank: u32_at(12),
            generation: u64_at(16),
            tag: CollectiveTag { step: u64_at(24), seq: u64_at(32) },
            count: u64_at(40),
        })
    }

    /// `None` if `got` is the stream `self` expects; otherwise what differs, naming both sides.
    pub(crate) fn mismatch(&self, got: &StreamHeader) -> Option<String> {
        if got.version != self.version {
            return Some(format!("protocol version {} but this rank speaks {}", got.version, self.version));
        }
        if got.generation != self.generation {
            return Some(format!("ring generation {} but this rank is in generation {}", got.generation, self.generation));
        }
        if got.from_rank != self.from_rank {
            return Some(format!("from rank {} but expected rank {}", got.from_rank, self.from_rank));
        }
        if got.op != self.op || got.tag != self.tag || got.count != self.count {
            return Some(format!(
                "{} for {} with {} elements, but this rank is running {} for {} with {} elements",
                op_name(got.op),
                got.tag,
                got.count,
                op_name(self.op),
                self.tag,
                self.count
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_mismatch() {
        let h = StreamHeader {
            version: 1,
            op: op_code(CollectiveOp::AllReduce),
            from_rank: 2,
            generation: 9,
            tag: CollectiveTag { step: 5, seq: 6 },
            count: 1234,
        };
        let b = h.encode();
        assert_eq!(StreamHeader::decode(&b), Some(h));
        assert!(h.mismatch(&h).is_none());
        let other = StreamHeader { tag: CollectiveTag { step: 5, seq: 7 }, ..h };
        let msg = h.mismatch(&other).unwrap();
        assert!(msg.contains("step 5 seq 7") && msg.contains("step 5 seq 6"), "{msg}");
        let gather = StreamHeader { op: op_code(CollectiveOp::AllGather), ..h };
        let msg = gather.mismatch(&StreamHeader { op: op_code(CollectiveOp::ReduceScatter), ..h }).unwrap();
        assert!(msg.contains("reduce_scatter_sum for") && msg.contains("running all_gather for"), "{msg}");
        let mut bad = b;
        bad[0] = b'X';
        assert_eq!(StreamHeader::decode(&bad), None);
    }

    #[test]
    fn hello_fits_its_limit() {
        let h =
            PeerHello { protocol_version: u32::MAX, generation: u64::MAX, from_rank: u32::MAX, world_size: u32::MAX, proof: [0xff; 32] };
        let f = crate::net::encode_frame(&HelloReply::Welcome(h)).unwrap();
        assert!(f.len() < MAX_HELLO_FRAME);
        let r = HelloReply::Refused { code: 2, reason: "x".repeat(768) }; // ring::MAX_REFUSAL_REASON
        assert!(crate::net::encode_frame(&r).unwrap().len() < MAX_HELLO_FRAME);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 2000, ..Default::default() })]

        /// A ring peer's hello and reply decode arbitrary bytes to a value or an error, never a
        /// panic; so does a stream header.
        #[test]
        fn arbitrary_bytes_never_panic_a_ring_decoder(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1024)) {
            let _ = postcard::from_bytes::<PeerHello>(&bytes);
            let _ = postcard::from_bytes::<HelloReply>(&bytes);
            if let Ok(header) = <[u8; HEADER_LEN]>::try_from(&bytes[..bytes.len().min(HEADER_LEN)]) {
                let _ = StreamHeader::decode(&header);
            }
        }
    }
}
