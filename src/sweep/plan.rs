//! The pure half of a sweep: which parameters each trial gets (random or grid search), and
//! which trials successive halving (ASHA) stops at each rung. No processes, no clock: the
//! driver feeds it and acts on its answers.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use super::spec::{Domain, SweepSpec};

/// One trial's parameters: config key → value.
pub(crate) type Params = BTreeMap<String, toml::Value>;

/// A uniform number in [0, 1) from (seed, trial, key): the same for the same sweep, whatever
/// order trials are made in.
fn unit(seed: u64, trial: usize, key: &str) -> f64 {
    let digest = Sha256::digest(format!("{seed}/{trial}/{key}").as_bytes());
    let bits = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes")) >> 11;
    bits as f64 / (1u64 << 53) as f64
}

/// Value `u` in [0, 1) of a domain.
fn pick(domain: &Domain, u: f64) -> toml::Value {
    match domain {
        Domain::Uniform([lo, hi]) => toml::Value::Float(lo + u * (hi - lo)),
        Domain::LogUniform([lo, hi]) => toml::Value::Float((lo.ln() + u * (hi.ln() - lo.ln())).exp()),
        Domain::Int([lo, hi]) => toml::Value::Integer(lo + ((u * (hi - lo + 1) as f64) as i64).min(hi - lo)),
        Domain::Choice(values) => values[((u * values.len() as f64) as usize).min(values.len() - 1)].clone(),
    }
}

/// The points of a domain under grid search (ranges: `points` evenly, log-evenly for
/// log-uniform).
fn grid_values(domain: &Domain, points: usize) -> Vec<toml::Value> {
    let points = points.max(1);
    let at = |i: usize| if points == 1 { 0.5 } else { i as f64 / (points - 1) as f64 };
    match domain {
        Domain::Uniform([lo, hi]) => (0..points).map(|i| toml::Value::Float(lo + at(i) * (hi - lo))).collect(),
        Domain::LogUniform([lo, hi]) => (0..points).map(|i| toml::Value::Float((lo.ln() + at(i) * (hi.ln() - lo.ln())).exp())).collect(),
        Domain::Int([lo, hi]) => (*lo..=*hi).map(toml::Value::Integer).collect(),
        Domain::Choice(values) => values.clone(),
    }
}

/// Every trial's parameters, in trial order.
pub(crate) fn trial_params(spec: &SweepSpec) -> Vec<Params> {
    if spec.search == "grid" {
        let mut combos: Vec<Params> = vec![Params::new()];
        for (key, domain) in &spec.space {
            combos = combos
                .into_iter()
                .flat_map(|combo| {
                    grid_values(domain, spec.grid_points).into_iter().map(move |v| {
                        let mut c = combo.clone();
                        c.insert(key.clone(), v);
                        c
                    })
                })
                .collect();
        }
        combos.truncate(spec.trials);
        return combos;
    }
    (0..spec.trials).map(|t| spec.space.iter().map(|(key, d)| (key.clone(), pick(d, unit(spec.seed, t, key)))).collect()).collect()
}

/// Asynchronous successive halving: rungs at `grace`, `grace·rf`, `grace·rf²`, … steps; a
/// trial reaching a rung goes on only if its metric is among the best 1/rf of those that
/// reached that rung so far (fewer than rf there: it goes on).
#[derive(Debug, Clone)]
pub(crate) struct Asha {
    grace: u64,
    factor: u64,
    minimize: bool,
    /// rung step → metrics recorded there.
    rungs: BTreeMap<u64, Vec<f64>>,
}

impl Asha {
    pub(crate) fn new(grace: u64, factor: u64, minimize: bool) -> Asha {
        Asha { grace, factor, minimize, rungs: BTreeMap::new() }
    }

    /// Whether `step` is a rung.
    pub(crate) fn is_rung(&self, step: u64) -> bool {
        let mut rung = self.grace;
        while rung < step {
            rung = rung.saturating_mul(self.factor);
        }
        rung == step
    }

    /// A trial reports `metric` at `step`; false when it must stop there.
    pub(crate) fn report(&mut self, step: u64, metric: f64) -> bool {
        if !self.is_rung(step) {
            return true;
        }
        let better = |a: f64, b: f64| if self.minimize { a < b } else { a > b };
        let recorded = self.rungs.entry(step).or_default();
        recorded.push(metric);
        let n = recorded.len();
        if n < self.factor as usize {
            return true;
        }
        let keep = (n / self.factor as usize).max(1);
        let better_than_me = recorded.iter().filter(|&&m| better(m, metric)).count();
        better_than_me < keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asha_keeps_the_best_third_at_each_rung() {
        let mut asha = Asha::new(10, 3, true);
        assert!(asha.is_rung(10) && asha.is_rung(30) && asha.is_rung(90) && !asha.is_rung(20));
        assert!(asha.report(5, 9.0), "not a rung");
        assert!(asha.report(10, 3.0) && asha.report(10, 2.0), "fewer than 3 at the rung: go on");
        assert!(!asha.report(10, 4.0), "third, worst of three: stop");
        assert!(asha.report(10, 1.0), "best so far: go on");
        // A maximising metric turns the comparison round.
        let mut max = Asha::new(10, 2, false);
        assert!(max.report(10, 0.5));
        assert!(!max.report(10, 0.1));
        assert!(max.report(10, 0.9));
    }

    #[test]
    fn random_search_is_seeded_and_stays_in_its_domains() {
        let text = "name = \"t\"\ntrials = 20\nseed = 4\n[space.\"train.learning_rate\"]\nlog_uniform = [1e-4, 1e-2]\n[space.\"model.n_layer\"]\nint = [2, 4]\n";
        let spec: SweepSpec = toml::from_str(text).unwrap();
        let a = trial_params(&spec);
        assert_eq!(a, trial_params(&spec));
        assert_eq!(a.len(), 20);
        for p in &a {
            let lr = p["train.learning_rate"].as_float().unwrap();
            assert!((1e-4..=1e-2).contains(&lr));
            assert!((2..=4).contains(&p["model.n_layer"].as_integer().unwrap()));
        }
        let grid: SweepSpec = toml::from_str(&text.replace("trials = 20", "trials = 100\nsearch = \"grid\"")).unwrap();
        let g = trial_params(&grid);
        assert_eq!(g.len(), 9, "3 learning rates × 3 layer counts");
    }
}
