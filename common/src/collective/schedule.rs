//! The ring schedule, without I/O: which element ranges a rank sends and receives in which
//! phase, and the streaming reducer that applies received bytes to the local buffer.
//!
//! Ring all-reduce over W ranks splits the buffer into W contiguous chunks (chunk `i` is
//! `chunk_range(n, W, i)`) and runs 2(W-1) phases. In phase `p` rank `r` sends chunk
//! `(r - p - 1) mod W` to its successor and receives chunk `(r - p - 2) mod W` from its
//! predecessor (which sends that same chunk: its rank is `r - 1`). Phases `0..W-1` are the
//! reduce-scatter (received values are added): the chunk received in phase `p` has then
//! been summed over `p + 2` ranks, so in the last one, `W-2`, rank `r` receives chunk
//! `(r - W) mod W = r` and ends holding its full sum. Phases `W-1..2(W-1)` are the
//! all-gather (received values overwrite): in phase `W-1` rank `r` sends its own chunk `r`,
//! and every chunk then travels once around the ring. What a rank receives in phase `p` is
//! exactly what it sends in phase `p + 1`, which is what makes pipelining possible: a piece
//! can be forwarded as soon as it has been reduced.
//!
//! The textbook numbering (send `(r - p) mod W`) leaves rank `r` owning chunk `(r + 1) mod W`
//! after the reduce-scatter. The extra `- 1` is that schedule run with every rank relabelled
//! `(r + W - 1) mod W`; the relabelling is the same on every rank and keeps the ring's
//! direction, so all-reduce is unchanged (same traffic, same order of additions for each
//! chunk, only which rank reduces which chunk moves), and it gives the ownership NCCL's
//! in-place reduce-scatter and all-gather use: rank `r` owns chunk `r`.
//!
//! A collective is a contiguous range of these phases: all-reduce `0..2(W-1)`, reduce-scatter
//! `0..W-1`, all-gather `W-1..2(W-1)`. Because they share the numbering, a reduce-scatter
//! followed by an all-gather performs exactly the additions of an all-reduce, in the same
//! order, and gives bitwise the same result.

use std::ops::Range;

/// One piece of one phase: a contiguous element range inside one chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Item {
    pub phase: u32,
    pub chunk: usize,
    pub range: Range<usize>,
}

/// Element range of chunk `i` when `n` elements are split into `w` near-equal contiguous
/// chunks (sizes differ by at most one; chunks are empty when `n < w`).
pub(crate) fn chunk_range(n: usize, w: usize, i: usize) -> Range<usize> {
    // u128 so `i * n` cannot overflow for any slice length.
    let at = |k: usize| ((k as u128 * n as u128) / w as u128) as usize;
    at(i)..at(i + 1)
}

/// Human name of a phase of the all-reduce phase numbering.
pub(crate) fn phase_name(phase: u32, world: u32) -> String {
    let steps = world.saturating_sub(1);
    if phase < steps {
        format!("reduce-scatter step {}/{}", phase + 1, steps)
    } else {
        format!("all-gather step {}/{}", phase - steps + 1, steps)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Schedule {
    pub n: usize,
    /// The phases this schedule runs (a sub-range of `0..2(W-1)`).
    pub phases: Range<u32>,
    /// Phases below this add received values; the others overwrite.
    pub reduce_phases: u32,
    /// Pieces to send, in stream order.
    pub sends: Vec<Item>,
    /// Pieces to receive, in stream order.
    pub recvs: Vec<Item>,
    /// Number of send pieces in the first phase: they come from the local buffer and are
    /// ready immediately. Send piece `j >= first_sends` forwards receive piece
    /// `j - first_sends`.
    pub first_sends: usize,
}

impl Schedule {
    /// The schedule of `phases` (a sub-range of `0..2(W-1)`) for `rank` over `n` elements,
    /// cut into pieces of at most `piece_elems` elements.
    pub(crate) fn new(n: usize, world: u32, rank: u32, piece_elems: usize, phases: Range<u32>) -> Self {
        let w = world.max(1) as usize;
        let r = rank as usize % w;
        let piece_elems = piece_elems.max(1);
        let pieces = |phase: u32, chunk: usize, out: &mut Vec<Item>| {
            let range = chunk_range(n, w, chunk);
            let mut start = range.start;
            while start < range.end {
                let end = range.end.min(start + piece_elems);
                out.push(Item { phase, chunk, range: start..end });
                start = end;
            }
        };
        // (r - p - extra) mod w without underflow (p mod w <= w - 1 and extra <= 2).
        let back = |p: u32, extra: usize| (r + w * 2 - (p as usize % w) - extra) % w;
        let mut sends = Vec::new();
        let mut recvs = Vec::new();
        let mut first_sends = 0;
        for p in phases.clone() {
            pieces(p, back(p, 1), &mut sends);
            if p == phases.start {
                first_sends = sends.len();
            }
            pieces(p, back(p, 2), &mut recvs);
        }
        Schedule { n, phases, reduce_phases: world.saturating_sub(1), sends, recvs, first_sends }
    }

    /// Whether send piece `j` has its data, given how many receive pieces are complete.
    pub(crate) fn send_ready(&self, j: usize, recvs_done: usize) -> bool {
        j < self.first_sends || recvs_done > j - self.first_sends
    }
}

/// Streaming receiver: applies bytes, in whatever pieces the network delivers them, to the
/// local buffer (add during reduce-scatter phases, overwrite during all-gather phases).
/// A value split across deliveries is held in a 4-byte carry.
#[derive(Debug)]
pub(crate) struct Incoming {
    item: usize,
    pos: usize,
    carry: [u8; 4],
    carry_len: usize,
}

/// The peer sent bytes beyond the last announced element.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ExcessBytes(pub usize);

impl Incoming {
    pub(crate) fn new(s: &Schedule) -> Self {
        Incoming { item: 0, pos: s.recvs.first().map_or(0, |i| i.range.start), carry: [0; 4], carry_len: 0 }
    }

    /// Receive pieces fully applied so far.
    pub(crate) fn items_done(&self) -> usize {
        self.item
    }

    pub(crate) fn is_complete(&self, s: &Schedule) -> bool {
        self.item >= s.recvs.len()
    }

    /// The piece being received and how many of its elements arrived.
    pub(crate) fn current(&self, s: &Schedule) -> Option<(Item, usize)> {
        s.recvs.get(self.item).map(|it| (it.clone(), self.pos - it.range.start))
    }

    /// Apply `bytes`. `data.len()` must be the schedule's `n`.
    pub(crate) fn feed(&mut self, s: &Schedule, data: &mut [f32], mut bytes: &[u8]) -> Result<(), ExcessBytes> {
        debug_assert_eq!(data.len(), s.n);
        while !bytes.is_empty() {
            let Some(item) = s.recvs.get(self.item) else {
                return Err(ExcessBytes(bytes.len()));
            };
            let add = item.phase < s.reduce_phases;
            if self.carry_len > 0 || bytes.len() < 4 {
                let take = (4 - self.carry_len).min(bytes.len());
                self.carry[self.carry_len..self.carry_len + take].copy_from_slice(&bytes[..take]);
                self.carry_len += take;
                bytes = &bytes[take..];
                if self.carry_len < 4 {
                    break;
                }
                self.carry_len = 0;
                apply(&mut data[self.pos..self.pos + 1], &self.carry, add);
                self.pos += 1;
            } else {
                let k = (item.range.end - self.pos).min(bytes.len() / 4);
                apply(&mut data[self.pos..self.pos + k], &bytes[..4 * k], add);
                self.pos += k;
                bytes = &bytes[4 * k..];
            }
            if self.pos == item.range.end {
                self.item += 1;
                if let Some(next) = s.recvs.get(self.item) {
                    self.pos = next.range.start;
                }
            }
        }
        Ok(())
    }
}

/// `dst[i] += le_f32(src[4i..])` or `dst[i] = ...`; written as a plain zip so it vectorises.
fn apply(dst: &mut [f32], src: &[u8], add: bool) {
    let vals = src.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    if add {
        for (d, v) in dst.iter_mut().zip(vals) {
            *d += v;
        }
    } else {
        for (d, v) in dst.iter_mut().zip(vals) {
            *d = v;
        }
    }
}

/// Little-endian bytes of `src`, ready to queue for sending: one copy, into memory that is
/// not zeroed first (the send path's largest cost after encryption and the kernel's copies).
pub(crate) fn encode_f32s(src: &[f32]) -> bytes::Bytes {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: an f32 slice is valid to read as its bytes (no padding, u8 has no invalid
        // values, alignment 1); on a little-endian machine those are the wire's bytes.
        let bytes = unsafe { std::slice::from_raw_parts(src.as_ptr().cast::<u8>(), std::mem::size_of_val(src)) };
        bytes::Bytes::copy_from_slice(bytes)
    }
    #[cfg(not(target_endian = "little"))]
    {
        let mut v = Vec::with_capacity(src.len() * 4);
        v.extend(src.iter().flat_map(|x| x.to_le_bytes()));
        bytes::Bytes::from(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn chunks_cover_exactly() {
        for n in 0..40 {
            for w in 1..7 {
                let mut next = 0;
                for i in 0..w {
                    let r = chunk_range(n, w, i);
                    assert_eq!(r.start, next);
                    assert!(r.len() <= n / w + 1);
                    next = r.end;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn forwarding_matches_receiving() {
        for w in 1..6u32 {
            for r in 0..w {
                for n in [0usize, 1, 2, 5, 17, 100] {
                    let s = Schedule::new(n, w, r, 3, 0..2 * (w - 1));
                    let forwarded = &s.sends[s.first_sends..];
                    let last = 2 * (w.max(1) - 1);
                    let received: Vec<_> = s.recvs.iter().filter(|i| i.phase + 1 < last).collect();
                    assert_eq!(forwarded.len(), received.len());
                    for (f, rc) in forwarded.iter().zip(received) {
                        assert_eq!(f.range, rc.range);
                        assert_eq!(f.phase, rc.phase + 1);
                    }
                }
            }
        }
    }

    fn sample(n: usize, w: u32) -> Vec<Vec<f32>> {
        (0..w).map(|r| (0..n).map(|i| ((i * 7 + r as usize * 3) % 11) as f32).collect()).collect()
    }

    /// Run `phases` of the whole ring in memory on `data` (one buffer per rank), with each
    /// rank's stream delivered in the given splits.
    fn simulate(mut data: Vec<Vec<f32>>, phases: Range<u32>, piece: usize, splits: &[usize]) -> Vec<Vec<f32>> {
        let w = data.len() as u32;
        let n = data[0].len();
        let scheds: Vec<_> = (0..w).map(|r| Schedule::new(n, w, r, piece, phases.clone())).collect();
        let mut inc: Vec<_> = scheds.iter().map(Incoming::new).collect();
        let mut sent = vec![0usize; w as usize];
        let mut split_i = 0;
        // Round-robin: each rank sends every ready piece; the successor takes it in splits.
        loop {
            let mut progress = false;
            for r in 0..w as usize {
                let s = &scheds[r];
                while sent[r] < s.sends.len() && s.send_ready(sent[r], inc[r].items_done()) {
                    let bytes = encode_f32s(&data[r][s.sends[sent[r]].range.clone()]);
                    sent[r] += 1;
                    let succ = (r + 1) % w as usize;
                    let mut rest: &[u8] = &bytes;
                    while !rest.is_empty() {
                        let k = splits[split_i % splits.len()].min(rest.len());
                        split_i += 1;
                        let (sched, d) = (&scheds[succ], &mut data[succ]);
                        inc[succ].feed(sched, d, &rest[..k]).unwrap();
                        rest = &rest[k..];
                    }
                    progress = true;
                }
            }
            if !progress {
                break;
            }
        }
        for r in 0..w as usize {
            assert!(inc[r].is_complete(&scheds[r]));
            assert_eq!(sent[r], scheds[r].sends.len());
        }
        data
    }

    #[test]
    fn rank_r_owns_chunk_r() {
        for w in 2..7u32 {
            for r in 0..w {
                let n = 5 * w as usize;
                // Reduce-scatter: the last phase receives (and completes the sum of) chunk r.
                let rs = Schedule::new(n, w, r, 1000, 0..w - 1);
                assert_eq!(rs.recvs.last().unwrap().chunk, r as usize, "W={w} rank {r}");
                assert!(rs.recvs.iter().all(|i| i.phase < rs.reduce_phases));
                // All-gather: the first sends are chunk r from the local buffer, and every other
                // chunk is received exactly once (overwriting).
                let ag = Schedule::new(n, w, r, 1000, w - 1..2 * (w - 1));
                assert_eq!(ag.first_sends, 1);
                assert_eq!(ag.sends[0].chunk, r as usize);
                assert_eq!(ag.sends[0].range, chunk_range(n, w as usize, r as usize));
                let mut got: Vec<_> = ag.recvs.iter().map(|i| i.chunk).collect();
                got.sort();
                let others: Vec<_> = (0..w as usize).filter(|&c| c != r as usize).collect();
                assert_eq!(got, others, "W={w} rank {r}");
                assert!(ag.recvs.iter().all(|i| i.phase >= ag.reduce_phases));
                // What rank r sends in a phase is what its successor receives in that phase.
                let succ = Schedule::new(n, w, (r + 1) % w, 1000, 0..2 * (w - 1));
                let all = Schedule::new(n, w, r, 1000, 0..2 * (w - 1));
                for (a, b) in all.sends.iter().zip(&succ.recvs) {
                    assert_eq!(a, b);
                }
            }
        }
    }

    #[test]
    fn sub_ranges_are_the_all_reduce_split() {
        for w in 1..6u32 {
            for r in 0..w {
                let all = Schedule::new(40, w, r, 3, 0..2 * (w - 1));
                let rs = Schedule::new(40, w, r, 3, 0..w.saturating_sub(1));
                let ag = Schedule::new(40, w, r, 3, w.saturating_sub(1)..2 * (w - 1));
                assert_eq!([&rs.sends[..], &ag.sends[..]].concat(), all.sends);
                assert_eq!([&rs.recvs[..], &ag.recvs[..]].concat(), all.recvs);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
        #[test]
        fn in_memory_ring_sums(n in 0usize..200, w in 1u32..6, piece in 1usize..20,
                               splits in proptest::collection::vec(1usize..13, 1..8)) {
            let data = simulate(sample(n, w), 0..2 * (w - 1), piece, &splits);
            let expect: Vec<f32> =
                (0..n).map(|i| (0..w).map(|r| ((i * 7 + r as usize * 3) % 11) as f32).sum()).collect();
            for rank_data in &data {
                prop_assert_eq!(rank_data, &expect);
            }
        }

        /// Reduce-scatter leaves chunk r of the sum on rank r; all-gather then gives every rank
        /// the bits of the all-reduce (fractional values, so the order of additions matters).
        #[test]
        fn in_memory_reduce_scatter_then_all_gather(k in 0usize..40, w in 1u32..6, piece in 1usize..20,
                               splits in proptest::collection::vec(1usize..13, 1..8)) {
            let wu = w as usize;
            let n = k * wu;
            let input: Vec<Vec<f32>> = (0..w)
                .map(|r| (0..n).map(|i| ((i * 7 + r as usize * 3) as f32 * 0.37).sin() * 1e3).collect())
                .collect();
            let reduced = simulate(input.clone(), 0..w - 1, piece, &splits);
            let all = simulate(input.clone(), 0..2 * (w - 1), piece, &splits);
            let expect: Vec<f32> = (0..n).map(|i| input.iter().map(|v| v[i] as f64).sum::<f64>() as f32).collect();
            for (r, d) in reduced.iter().enumerate() {
                let c = chunk_range(n, wu, r);
                prop_assert_eq!(c.clone(), r * k..(r + 1) * k);
                for i in c {
                    // Sum of W values of magnitude <= 1e3 in some order: within a few ulps.
                    prop_assert!((d[i] - expect[i]).abs() <= 1e-3 * w as f32, "rank {} elem {}", r, i);
                    prop_assert_eq!(d[i].to_bits(), all[0][i].to_bits());
                }
            }
            let gathered = simulate(reduced, w - 1..2 * (w - 1), piece, &splits);
            for d in &gathered {
                prop_assert!(d.iter().zip(&all[0]).all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
    }

    #[test]
    fn excess_bytes_are_reported() {
        let s = Schedule::new(2, 2, 0, 8, 0..2);
        let mut inc = Incoming::new(&s);
        let mut d = vec![0.0f32; 2];
        // Receives one element in each of two phases: 8 bytes, then 3 too many.
        assert_eq!(inc.feed(&s, &mut d, &[0u8; 11]), Err(ExcessBytes(3)));
    }

    #[test]
    fn phase_names() {
        assert_eq!(phase_name(0, 3), "reduce-scatter step 1/2");
        assert_eq!(phase_name(3, 3), "all-gather step 2/2");
    }
}
