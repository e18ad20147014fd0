//! A small deterministic random source in plain Rust, for parameter initialisation and sampling.
//!
//! Why not libtorch's generator: it is process-global (concurrent users race on it), CPU and CUDA
//! generators give different streams, and its algorithms may change between libtorch releases.
//! Initial parameters must be bit-identical on every worker whatever its device, so they are
//! drawn here using only operations IEEE 754 rounds exactly (`+ - * /`, `sqrt`): no libm call,
//! whose last bit may differ between platforms, touches the numbers.

/// SplitMix64: tiny, fast, and good enough for weights and token sampling (not for secrets).
pub struct Rng {
    state: u64,
    /// The polar method makes normals in pairs; the second one waits here.
    spare_normal: Option<f64>,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed, spare_normal: None }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal, by Marsaglia's polar method.
    pub(crate) fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare_normal.take() {
            return z;
        }
        loop {
            let u = 2.0 * self.next_f64() - 1.0;
            let v = 2.0 * self.next_f64() - 1.0;
            let s = u * u + v * v;
            if s > 0.0 && s < 1.0 {
                let factor = (-2.0 * portable_ln(s) / s).sqrt();
                self.spare_normal = Some(v * factor);
                return u * factor;
            }
        }
    }
}

/// Natural logarithm for finite x > 0 built from exactly-rounded operations only, so that it
/// returns the same bits on every platform (unlike `f64::ln`, which calls the system libm).
/// Accurate to a few ulp, which is all initialisation needs.
pub(crate) fn portable_ln(x: f64) -> f64 {
    debug_assert!(x > 0.0 && x.is_finite());
    // Split x = m * 2^e with m in [1, 2); scale subnormals into the normal range first.
    let (x, extra_exp) = if x < f64::MIN_POSITIVE { (x * (1u64 << 54) as f64, -54) } else { (x, 0) };
    let bits = x.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023 + extra_exp;
    let mut m = f64::from_bits((bits & 0x000F_FFFF_FFFF_FFFF) | 0x3FF0_0000_0000_0000);
    // Centre m on 1 (m in [sqrt(1/2), sqrt(2))) so the series below converges fast.
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    // ln(m) = 2 atanh(t) = 2 (t + t^3/3 + t^5/5 + ...), t = (m-1)/(m+1), |t| < 0.172:
    // twelve terms bring the truncation error below 1e-18.
    let t = (m - 1.0) / (m + 1.0);
    let t2 = t * t;
    let mut series = 0.0;
    for k in (0..12).rev() {
        series = series * t2 + 1.0 / (2 * k + 1) as f64;
    }
    e as f64 * std::f64::consts::LN_2 + 2.0 * t * series
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portable_ln_matches_std() {
        let mut rng = Rng::new(7);
        for _ in 0..10_000 {
            let x = rng.next_f64() + 1e-300;
            let (a, b) = (portable_ln(x), x.ln());
            assert!((a - b).abs() <= 1e-14 * b.abs().max(1.0), "ln({x}) = {a} vs {b}");
        }
        for x in [1.0, 2.0, 0.5, 1e-310, 1e300, std::f64::consts::E] {
            assert!((portable_ln(x) - x.ln()).abs() <= 1e-13 * x.ln().abs().max(1.0), "{x}");
        }
    }

    #[test]
    fn normals_have_unit_variance() {
        let mut rng = Rng::new(1);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
    }
}
