//! Which parameters each trial gets: grid search, random search, or TPE (a model-based
//! sampler: the Tree-structured Parzen Estimator of Bergstra et al., 2011, as Optuna's
//! default). Pure: the same sweep file and the same earlier results give the same trials.

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
        // `points` integers spread over the range (all of them when it holds fewer).
        Domain::Int([lo, hi]) => {
            let mut values: Vec<i64> = (0..points).map(|i| lo + ((hi - lo) as f64 * at(i)).round() as i64).collect();
            values.dedup();
            values.into_iter().map(toml::Value::Integer).collect()
        }
        Domain::Choice(values) => values.clone(),
    }
}

/// How many trials the sweep has: `trials`, or fewer when a grid has fewer points.
pub(crate) fn trial_count(spec: &SweepSpec) -> usize {
    if spec.search == "grid" {
        grid(spec).len()
    } else {
        spec.trials
    }
}

/// A trial's parameters without earlier results: its grid point, or a random draw (also TPE's
/// first `startup_trials`).
pub(crate) fn prior_params(spec: &SweepSpec, trial: usize) -> Params {
    if spec.search == "grid" {
        return grid(spec).swap_remove(trial);
    }
    spec.space.iter().map(|(key, d)| (key.clone(), pick(d, unit(spec.seed, trial, key)))).collect()
}

/// Whether a trial's parameters depend on earlier trials' results (TPE after its start-up
/// trials).
pub(crate) fn is_model_based(spec: &SweepSpec, trial: usize) -> bool {
    spec.search == "tpe" && trial >= spec.startup_trials()
}

/// For a model-based trial: how many trials before it must have ended before it is sampled.
/// All but the `parallel - 1` just before it, so that the same sweep samples from the same
/// results whatever order trials end in.
pub(crate) fn must_have_ended(spec: &SweepSpec, trial: usize) -> usize {
    (trial + 1).saturating_sub(spec.parallel)
}

/// An ended trial's result as the sampler sees it.
#[derive(Debug, Clone)]
pub(crate) struct Observation {
    pub params: Params,
    /// The furthest step it reported at (stopped trials reach fewer).
    pub step: u64,
    pub metric: f64,
}

/// TPE: split the observations into the better quarter and the rest (a trial that got further
/// ranks above one stopped earlier, as Optuna ranks pruned trials); per parameter, draw 24
/// candidates from a Parzen density of the better values and keep the one where the density of
/// the better over that of the rest is highest.
pub(crate) fn tpe_params(spec: &SweepSpec, trial: usize, observed: &[Observation]) -> Params {
    let minimize = spec.direction == "minimize";
    let mut ranked: Vec<&Observation> = observed.iter().filter(|o| o.metric.is_finite()).collect();
    if ranked.len() < 2 {
        return prior_params(spec, trial);
    }
    ranked.sort_by(|a, b| {
        b.step.cmp(&a.step).then_with(|| if minimize { a.metric.total_cmp(&b.metric) } else { b.metric.total_cmp(&a.metric) })
    });
    let n_good = ranked.len().div_ceil(4).max(1);
    let (good, bad) = ranked.split_at(n_good);
    spec.space
        .iter()
        .map(|(key, domain)| {
            let values = |set: &[&Observation]| set.iter().filter_map(|o| o.params.get(key).cloned()).collect::<Vec<_>>();
            let value = tpe_one(domain, &values(good), &values(bad), |what| unit(spec.seed, trial, &format!("{key}/{what}")));
            (key.clone(), value)
        })
        .collect()
}

const CANDIDATES: usize = 24;

fn tpe_one(domain: &Domain, good: &[toml::Value], bad: &[toml::Value], draw: impl Fn(&str) -> f64) -> toml::Value {
    if let Domain::Choice(options) = domain {
        // Counts with one pseudo-observation each, so no option's density is zero.
        let weights = |set: &[toml::Value]| options.iter().map(|o| 1.0 + set.iter().filter(|v| *v == o).count() as f64).collect::<Vec<_>>();
        let (l, g) = (weights(good), weights(bad));
        let (l_sum, g_sum): (f64, f64) = (l.iter().sum(), g.iter().sum());
        let mut best = (f64::NEG_INFINITY, 0);
        for c in 0..CANDIDATES {
            let mut u = draw(&format!("c{c}")) * l_sum;
            let mut i = 0;
            while i + 1 < l.len() && u >= l[i] {
                u -= l[i];
                i += 1;
            }
            let score = (l[i] / l_sum).ln() - (g[i] / g_sum).ln();
            if score > best.0 {
                best = (score, i);
            }
        }
        return options[best.1].clone();
    }
    let (l, g) = (
        Parzen::new(good.iter().filter_map(|v| to_unit(domain, v)).collect()),
        Parzen::new(bad.iter().filter_map(|v| to_unit(domain, v)).collect()),
    );
    let mut best = (f64::NEG_INFINITY, 0.5);
    for c in 0..CANDIDATES {
        let x = l.sample(draw(&format!("c{c}/k")), draw(&format!("c{c}/a")), draw(&format!("c{c}/b")));
        let score = l.density(x).ln() - g.density(x).ln();
        if score > best.0 {
            best = (score, x);
        }
    }
    from_unit(domain, best.1)
}

/// A value's place in its domain, in [0, 1] (log scale for log-uniform).
fn to_unit(domain: &Domain, value: &toml::Value) -> Option<f64> {
    let x = value.as_float().or_else(|| value.as_integer().map(|i| i as f64))?;
    Some(match domain {
        Domain::Uniform([lo, hi]) => (x - lo) / (hi - lo),
        Domain::LogUniform([lo, hi]) => (x.ln() - lo.ln()) / (hi.ln() - lo.ln()),
        Domain::Int([lo, hi]) => (x - *lo as f64 + 0.5) / (hi - lo + 1) as f64,
        Domain::Choice(_) => return None,
    })
}

fn from_unit(domain: &Domain, u: f64) -> toml::Value {
    pick(domain, u.clamp(0.0, 1.0 - 1e-12))
}

/// A mixture of Gaussians on [0, 1]: a broad prior plus one per observed value, each as wide as
/// the larger gap to its neighbours.
struct Parzen {
    centres: Vec<f64>,
    widths: Vec<f64>,
}

impl Parzen {
    fn new(mut points: Vec<f64>) -> Parzen {
        points.sort_by(f64::total_cmp);
        let floor = 1.0 / (points.len() as f64 + 1.0).min(100.0);
        let mut centres = vec![0.5];
        let mut widths = vec![1.0];
        for (i, &p) in points.iter().enumerate() {
            let left = if i == 0 { p } else { p - points[i - 1] };
            let right = if i + 1 == points.len() { 1.0 - p } else { points[i + 1] - p };
            centres.push(p);
            widths.push(left.max(right).clamp(floor, 1.0));
        }
        Parzen { centres, widths }
    }

    fn density(&self, x: f64) -> f64 {
        let sum: f64 = self
            .centres
            .iter()
            .zip(&self.widths)
            .map(|(c, w)| (-0.5 * ((x - c) / w).powi(2)).exp() / (w * (2.0 * std::f64::consts::PI).sqrt()))
            .sum();
        (sum / self.centres.len() as f64).max(f64::MIN_POSITIVE)
    }

    /// One draw from three uniform numbers: the component, then Box–Muller; folded back into
    /// [0, 1] at its edges (clamping would pile the broad prior's tails onto the bounds).
    fn sample(&self, pick: f64, a: f64, b: f64) -> f64 {
        let k = ((pick * self.centres.len() as f64) as usize).min(self.centres.len() - 1);
        let normal = (-2.0 * (1.0 - a).ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos();
        let x = (self.centres[k] + self.widths[k] * normal).rem_euclid(2.0);
        if x > 1.0 {
            2.0 - x
        } else {
            x
        }
    }
}

/// Every grid point, in trial order (at most `trials`).
fn grid(spec: &SweepSpec) -> Vec<Params> {
    {
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
        combos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_search_is_seeded_and_stays_in_its_domains() {
        let text = "name = \"t\"\ntrials = 20\nseed = 4\n[space.\"train.learning_rate\"]\nlog_uniform = [1e-4, 1e-2]\n[space.\"model.n_layer\"]\nint = [2, 4]\n";
        let spec: SweepSpec = toml::from_str(text).unwrap();
        let a: Vec<Params> = (0..trial_count(&spec)).map(|t| prior_params(&spec, t)).collect();
        assert_eq!(a, (0..20).map(|t| prior_params(&spec, t)).collect::<Vec<_>>());
        assert_eq!(a.len(), 20);
        for p in &a {
            let lr = p["train.learning_rate"].as_float().unwrap();
            assert!((1e-4..=1e-2).contains(&lr));
            assert!((2..=4).contains(&p["model.n_layer"].as_integer().unwrap()));
        }
        let grid: SweepSpec = toml::from_str(&text.replace("trials = 20", "trials = 100\nsearch = \"grid\"")).unwrap();
        assert_eq!(trial_count(&grid), 9, "3 learning rates × 3 layer counts");
        assert_ne!(prior_params(&grid, 0), prior_params(&grid, 8));
    }

    /// On a bowl with its bottom at lr = 3e-3 and one strategy better than the others, TPE's trials after the random
    /// start-up land nearer the bottom than random search's do.
    #[test]
    fn tpe_samples_near_the_best_results_so_far() {
        let text = "name = \"t\"\ntrials = 30\nseed = 2\nsearch = \"tpe\"\nstartup_trials = 8\n[space.\"train.learning_rate\"]\nlog_uniform = [1e-5, 1e-1]\n[space.\"parallel.strategy\"]\nchoice = [\"ddp\", \"zero1\", \"zero2\"]\n";
        let spec: SweepSpec = toml::from_str(text).unwrap();
        let loss = |p: &Params| {
            let lr = p["train.learning_rate"].as_float().unwrap();
            (lr.ln() - 3e-3f64.ln()).powi(2) / 10.0 + if p["parallel.strategy"].as_str() == Some("zero1") { 0.0 } else { 2.0 }
        };
        let mut observed = Vec::new();
        for t in 0..spec.trials {
            let p = if is_model_based(&spec, t) { tpe_params(&spec, t, &observed) } else { prior_params(&spec, t) };
            assert_eq!(p, if is_model_based(&spec, t) { tpe_params(&spec, t, &observed) } else { prior_params(&spec, t) });
            observed.push(Observation { metric: loss(&p), params: p, step: 10 });
        }
        let mean = |set: &[Observation]| set.iter().map(|o| o.metric).sum::<f64>() / set.len() as f64;
        let random: Vec<Observation> =
            (8..30).map(|t| prior_params(&spec, t)).map(|p| Observation { metric: loss(&p), params: p, step: 10 }).collect();
        let (tpe, rnd) = (mean(&observed[8..]), mean(&random));
        assert!(tpe < rnd / 2.0, "TPE's mean loss {tpe:.3} against random search's {rnd:.3}");
        let zero1 = observed[8..].iter().filter(|o| o.params["parallel.strategy"].as_str() == Some("zero1")).count();
        assert!(zero1 > 11, "the better choice is drawn more often: {zero1} of 22");
    }
}
