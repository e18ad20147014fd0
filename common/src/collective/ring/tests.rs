//! The ring against itself: sums and chunks at many lengths and world sizes, and every way
//! a call or a formation fails.

use super::*;
use crate::collective::wire::{self, StreamHeader};
use crate::net::test_util::endpoint;
use troupe_core::proto::PROTOCOL_VERSION;

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

/// Run one collective on every rank concurrently, each with its own call and tag.
async fn call_all(
    rings: Vec<RingCollective>,
    inputs: Vec<Vec<f32>>,
    calls: Vec<CollectiveOp>,
    tags: Vec<CollectiveTag>,
) -> Vec<(RingCollective, Vec<f32>, Result<(), CollectiveError>)> {
    let mut hs = Vec::new();
    for (((mut ring, mut data), call), tag) in rings.into_iter().zip(inputs).zip(calls).zip(tags) {
        hs.push(tokio::spawn(async move {
            let r = ring.run(call, &mut data, tag).await;
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
    let calls = vec![CollectiveOp::AllReduce; rings.len()];
    call_all(rings, inputs, calls, tags).await
}

/// The same call with the same tag on every rank; panics (naming `what`) if any fails.
async fn call_ok(
    rings: Vec<RingCollective>,
    inputs: Vec<Vec<f32>>,
    call: CollectiveOp,
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
    r[0].run(CollectiveOp::AllReduce, &mut d, CollectiveTag { step: 0, seq: 0 }).await.unwrap();
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
    let e = rings[0].run(CollectiveOp::AllReduce, &mut d, CollectiveTag { step: 1, seq: 1 }).await.unwrap_err();
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
    let h = StreamHeader {
        version: PROTOCOL_VERSION,
        op: wire::op_code(CollectiveOp::AllReduce),
        from_rank: 1,
        generation: 7,
        tag,
        count: n as u64,
    };
    s.write_all(&h.encode()).await.unwrap();
    s.write_all(&[0u8; 4 * 100 + 2]).await.unwrap();
    let mut d = input(n, 0, 0);
    let t0 = std::time::Instant::now();
    let e = rings[0].run(CollectiveOp::AllReduce, &mut d, tag).await.unwrap_err();
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
            ring.run(CollectiveOp::Broadcast { root: 1 }, &mut d, CollectiveTag { step: 3, seq: 1 }).await.unwrap();
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
        let (rs, outs) = call_ok(rings, inputs, CollectiveOp::ReduceScatter, tag(), &what).await;
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
        let (rs, outs) = call_ok(rings, gather_in, CollectiveOp::AllGather, tag(), &what).await;
        rings = rs;
        for (r, d) in outs.iter().enumerate() {
            assert!(same_bits(d, &concat), "{what}: rank {r} does not hold the concatenation");
        }

        // Reduce-scatter then all-gather == all-reduce, bit for bit (fractional values).
        let frac: Vec<Vec<f32>> =
            (0..w).map(|r| odd_input(n, r, salt + 1).into_iter().map(|x| if x.is_nan() { 0.5 } else { x }).collect()).collect();
        let what = format!("W={w} n={n} all_reduce vs reduce_scatter + all_gather");
        let (rs, reduced) = call_ok(rings, frac.clone(), CollectiveOp::AllReduce, tag(), &what).await;
        let (rs, scattered) = call_ok(rs, frac, CollectiveOp::ReduceScatter, tag(), &what).await;
        let (rs, gathered) = call_ok(rs, scattered, CollectiveOp::AllGather, tag(), &what).await;
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
    r[0].run(CollectiveOp::ReduceScatter, &mut d, CollectiveTag { step: 0, seq: 0 }).await.unwrap();
    r[0].run(CollectiveOp::AllGather, &mut d, CollectiveTag { step: 0, seq: 1 }).await.unwrap();
    assert_eq!(d, vec![1.0, 2.0, 3.0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn length_not_a_multiple_of_w_is_refused_before_any_traffic() {
    let w = 3;
    let mut rings = ring(w).await;
    let tag = |seq| CollectiveTag { step: 0, seq };
    for (seq, call, n) in [(1, CollectiveOp::ReduceScatter, 7), (2, CollectiveOp::AllGather, 4), (3, CollectiveOp::ReduceScatter, 1)] {
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
    let (rings, outs) = call_ok(rings, inputs, CollectiveOp::AllReduce, tag(4), "after the refusals").await;
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
    let res = call_all(rings, inputs, vec![CollectiveOp::AllGather, CollectiveOp::ReduceScatter], vec![tag; 2]).await;
    let mut named_both = false;
    for (_, _, r) in &res {
        let e = r.as_ref().expect_err("mismatched operations must fail");
        assert!(matches!(e, CollectiveError::Protocol(_)), "{e}");
        let m = e.to_string();
        named_both |= m.contains("all_gather") && m.contains("reduce_scatter_sum");
    }
    assert!(named_both, "{:?}", res.iter().map(|r| r.2.as_ref().err().map(|e| e.to_string())).collect::<Vec<_>>());
}
