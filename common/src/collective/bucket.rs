//! Gradient buckets: which parameters' gradients travel together in one collective.
//!
//! One collective per parameter pays NCCL's launch latency a hundred times a step; one for the
//! whole model needs a flat copy of every gradient at once. Buckets of about 25 MB (PyTorch
//! DDP's default) sit between: each is flattened into a buffer of its own size, reduced and
//! copied back, so the extra memory is one bucket, and a bucket's communication can overlap
//! the work on the next. Buckets are formed from the last parameter to the first, the order
//! in which the backward pass finishes gradients, and never split a parameter.

use std::ops::Range;

/// PyTorch DDP's default bucket size.
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// Groups parameters of `numels` scalars each (in parameter order) into buckets of at most
/// `cap_bytes` (at `elem_bytes` per scalar), walking from the last parameter to the first. Each
/// bucket is a range of parameter indices; a parameter larger than the cap gets a bucket of its
/// own. The buckets cover every parameter exactly once, in reverse order of their ranges.
pub fn gradient_buckets(numels: &[usize], elem_bytes: usize, cap_bytes: usize) -> Vec<Range<usize>> {
    let cap = cap_bytes.max(1);
    let mut buckets = Vec::new();
    let mut end = numels.len();
    let mut bytes = 0usize;
    for i in (0..numels.len()).rev() {
        let size = numels[i].saturating_mul(elem_bytes);
        // Close the open bucket when this parameter would overflow it.
        if i + 1 < end && bytes.saturating_add(size) > cap {
            buckets.push(i + 1..end);
            end = i + 1;
            bytes = 0;
        }
        bytes = bytes.saturating_add(size);
    }
    if end > 0 {
        buckets.push(0..end);
    }
    buckets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_fill_up_to_the_cap_from_the_last_parameter() {
        // 4-byte scalars, cap 40 bytes = 10 scalars.
        assert_eq!(gradient_buckets(&[3, 3, 3, 3, 3], 4, 40), vec![2..5, 0..2]);
        assert_eq!(gradient_buckets(&[10, 10], 4, 40), vec![1..2, 0..1]);
        assert_eq!(gradient_buckets(&[5, 5], 4, 40), vec![0..2]);
    }

    #[test]
    fn a_parameter_larger_than_the_cap_travels_alone() {
        assert_eq!(gradient_buckets(&[1, 100, 1], 4, 40), vec![2..3, 1..2, 0..1]);
        assert_eq!(gradient_buckets(&[100], 4, 40), vec![0..1]);
    }

    #[test]
    fn edge_cases() {
        assert!(gradient_buckets(&[], 4, 40).is_empty());
        // A cap of zero still makes progress: one parameter per bucket.
        assert_eq!(gradient_buckets(&[1, 1], 4, 0), vec![1..2, 0..1]);
        // Empty parameters ride along without opening buckets.
        assert_eq!(gradient_buckets(&[0, 10, 0], 4, 40), vec![0..3]);
    }

    proptest::proptest! {
        #[test]
        fn buckets_cover_every_parameter_once_and_respect_the_cap(
            numels in proptest::collection::vec(0usize..5000, 0..60),
            cap in 1usize..40_000,
        ) {
            let buckets = gradient_buckets(&numels, 4, cap);
            // Contiguous, descending, covering 0..n.
            let mut next_end = numels.len();
            for b in &buckets {
                proptest::prop_assert_eq!(b.end, next_end);
                proptest::prop_assert!(b.start < b.end);
                next_end = b.start;
                let bytes: usize = numels[b.clone()].iter().map(|n| n * 4).sum();
                proptest::prop_assert!(bytes <= cap || b.len() == 1 || numels[b.start + 1..b.end].iter().all(|&n| n == 0),
                    "bucket {:?} holds {} bytes over the cap {}", b, bytes, cap);
            }
            proptest::prop_assert_eq!(next_end, 0);
        }
    }
}
