//! Which versions a replica serves, and the canary's judgement.
//!
//! The registry's `state.json` says what should be served; [`Deployment::reconcile`] makes it
//! so: it loads any version not yet loaded in the background (after checking its sha256
//! against the MANIFEST), then replaces the live set in one atomic swap. Requests already
//! running keep the engine they started on, so a swap fails nothing.
//!
//! While a canary runs, a fixed share of requests goes to it (an exact, deterministic split)
//! and both versions' outcomes are counted. After `canary.requests` canary answers the canary
//! is judged against the stable version of the same window ([`judge`]) and the replica
//! promotes or rolls it back in the registry, which every replica then follows.

use crate::engine::{BatchObserver, Engine};
use crate::metrics::ServeMetrics;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use troupe_common::registry::{version_name, Canary, DeployState, Registry};

/// How often a replica reads the registry's state when nobody tells it about a change.
const POLL: Duration = Duration::from_millis(200);
/// The same for a registry in object storage, where each poll is two requests to the store.
const REMOTE_POLL: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Stable,
    Canary,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Stable => "stable",
            Role::Canary => "canary",
        }
    }
}

/// The versions serving now.
#[derive(Default)]
pub struct Live {
    pub serial: u64,
    pub stable: Option<Arc<Engine>>,
    pub canary: Option<(Arc<Engine>, Canary)>,
}

impl Live {
    pub fn engines(&self) -> impl Iterator<Item = (&Arc<Engine>, Role)> {
        self.stable.iter().map(|e| (e, Role::Stable)).chain(self.canary.iter().map(|(e, _)| (e, Role::Canary)))
    }
}

/// Outcomes of one version's requests during a canary window.
#[derive(Debug, Default, Clone)]
pub struct Outcomes {
    pub requests: u64,
    pub errors: u64,
    pub latencies: Vec<f64>,
}

impl Outcomes {
    fn add(&mut self, ok: bool, seconds: f64) {
        self.requests += 1;
        if ok {
            self.latencies.push(seconds);
        } else {
            self.errors += 1;
        }
    }

    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }

    /// 95th percentile of successful requests' latency (nearest rank); None without any.
    pub fn p95(&self) -> Option<f64> {
        if self.latencies.is_empty() {
            return None;
        }
        let mut sorted = self.latencies.clone();
        sorted.sort_by(f64::total_cmp);
        let rank = ((0.95 * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        Some(sorted[rank - 1])
    }
}

#[derive(Debug, Default)]
struct CanaryWindow {
    version: u32,
    stable: Outcomes,
    canary: Outcomes,
    judged: bool,
}

/// Latency differences smaller than this are noise on a busy machine, whatever the ratio.
const LATENCY_NOISE_FLOOR_SECONDS: f64 = 0.05;

/// The canary's verdict: promote it (true) or roll it back, and why.
pub fn judge(stable: &Outcomes, canary: &Outcomes, c: &Canary) -> (bool, String) {
    let (se, ce) = (stable.error_rate(), canary.error_rate());
    if ce > se + c.max_error_rate_increase {
        return (
            false,
            format!(
                "error rate {:.1}% over {} requests against the stable version's {:.1}% (allowed: +{:.1} points)",
                ce * 100.0,
                canary.requests,
                se * 100.0,
                c.max_error_rate_increase * 100.0
            ),
        );
    }
    match (stable.p95(), canary.p95()) {
        (Some(sp), Some(cp)) if cp > sp * c.max_p95_ratio && cp - sp > LATENCY_NOISE_FLOOR_SECONDS => (
            false,
            format!("p95 latency {:.0} ms against the stable version's {:.0} ms (allowed: ×{})", cp * 1e3, sp * 1e3, c.max_p95_ratio),
        ),
        (sp, cp) => (
            true,
            format!(
                "error rate {:.1}% (stable {:.1}%), p95 {} (stable {}) over {} requests",
                ce * 100.0,
                se * 100.0,
                cp.map_or("-".into(), |v| format!("{:.0} ms", v * 1e3)),
                sp.map_or("-".into(), |v| format!("{:.0} ms", v * 1e3)),
                canary.requests
            ),
        ),
    }
}

/// Test-only fault hooks, read once: `TROUPE_FAULT_SERVE_FAIL_VERSION=N` makes every request
/// served by version N fail; `TROUPE_FAULT_SERVE_DELAY_VERSION=N:MS` delays each by MS.
#[derive(Debug, Default, Clone, Copy)]
pub struct Faults {
    pub fail_version: Option<u32>,
    pub delay: Option<(u32, u64)>,
}

impl Faults {
    pub fn from_env() -> Faults {
        let fail_version = std::env::var("TROUPE_FAULT_SERVE_FAIL_VERSION").ok().and_then(|v| v.parse().ok());
        let delay = std::env::var("TROUPE_FAULT_SERVE_DELAY_VERSION").ok().and_then(|v| {
            let (version, ms) = v.split_once(':')?;
            Some((version.parse().ok()?, ms.parse().ok()?))
        });
        Faults { fail_version, delay }
    }
}

pub struct Deployment {
    registry_dir: PathBuf,
    live: RwLock<Arc<Live>>,
    max_batch: usize,
    max_queue: usize,
    metrics: ServeMetrics,
    routed: AtomicU64,
    window: Mutex<CanaryWindow>,
    /// One reconcile at a time.
    reconciling: tokio::sync::Mutex<()>,
    /// The (serial, version) whose load failed, not retried until the state changes.
    failed: Mutex<Option<(u64, u32, String)>>,
    wake: tokio::sync::Notify,
    last_warning: Mutex<Option<std::time::Instant>>,
    pub faults: Faults,
}

impl Deployment {
    pub fn new(registry_dir: &Path, max_batch: usize, max_queue: usize, metrics: ServeMetrics) -> Deployment {
        Deployment {
            registry_dir: registry_dir.to_path_buf(),
            live: RwLock::new(Arc::new(Live::default())),
            max_batch,
            max_queue,
            metrics,
            routed: AtomicU64::new(0),
            window: Mutex::new(CanaryWindow::default()),
            reconciling: tokio::sync::Mutex::new(()),
            failed: Mutex::new(None),
            wake: tokio::sync::Notify::new(),
            last_warning: Mutex::new(None),
            faults: Faults::from_env(),
        }
    }

    pub fn registry_dir(&self) -> &Path {
        &self.registry_dir
    }

    pub fn live(&self) -> Arc<Live> {
        self.live.read().map(|l| l.clone()).unwrap_or_default()
    }

    /// The last load failure, for /readyz and the status.
    pub fn load_error(&self) -> Option<String> {
        self.failed.lock().ok().and_then(|f| f.as_ref().map(|(_, v, e)| format!("{}: {e}", version_name(*v))))
    }

    /// Picks the engine for a request: `pinned` names a version explicitly; otherwise the
    /// canary gets its exact share (request n goes to the canary when floor(n·f) steps up).
    pub fn route(&self, pinned: Option<u32>) -> Option<(Arc<Engine>, Role)> {
        let live = self.live();
        if let Some(v) = pinned {
            return live.engines().find(|(e, _)| e.version == v).map(|(e, r)| (e.clone(), r));
        }
        if let Some((engine, canary)) = &live.canary {
            let n = self.routed.fetch_add(1, Ordering::Relaxed) as f64;
            if ((n + 1.0) * canary.fraction).floor() > (n * canary.fraction).floor() {
                return Some((engine.clone(), Role::Canary));
            }
        }
        live.stable.clone().map(|e| (e, Role::Stable))
    }

    /// Counts a finished request; judges the canary once it has answered enough.
    pub fn record(self: &Arc<Self>, version: u32, ok: bool, seconds: f64, completion_tokens: usize) {
        let name = version_name(version);
        self.metrics.requests.with_label_values(&[name.as_str(), if ok { "ok" } else { "error" }]).inc();
        if ok {
            self.metrics.request_seconds.with_label_values(&[name.as_str()]).observe(seconds);
        }
        self.metrics.generated_tokens.with_label_values(&[name.as_str()]).inc_by(completion_tokens as u64);
        let live = self.live();
        let Some((_, canary)) = &live.canary else { return };
        let verdict = {
            let Ok(mut w) = self.window.lock() else { return };
            if w.version != canary.version {
                *w = CanaryWindow { version: canary.version, ..Default::default() };
            }
            if w.judged {
                return;
            }
            if version == canary.version {
                w.canary.add(ok, seconds);
            } else if live.stable.as_ref().is_some_and(|s| s.version == version) {
                w.stable.add(ok, seconds);
            }
            if w.canary.requests < canary.requests.max(1) {
                return;
            }
            w.judged = true;
            judge(&w.stable, &w.canary, canary)
        };
        let (promote, reason) = verdict;
        let canary_version = canary.version;
        let this = self.clone();
        tokio::spawn(async move {
            let dir = this.registry_dir.clone();
            let why = reason.clone();
            let result = tokio::task::spawn_blocking(move || {
                let reason = why;
                let registry = Registry::open(&dir)?;
                // Only the canary that was measured, and only if it still is the canary.
                let verdict = if promote { format!("canary passed: {reason}") } else { format!("canary failed: {reason}") };
                registry.conclude_canary(canary_version, promote, "serve", &verdict)
            })
            .await;
            match result {
                Ok(Ok(Some(_))) => {
                    let decision = if promote { "promote" } else { "rollback" };
                    this.metrics.canary_decisions.with_label_values(&[decision]).inc();
                    tracing::info!("canary {}: {decision} ({reason})", version_name(canary_version));
                    this.wake.notify_one();
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::error!("cannot record the canary decision in the registry: {e}; judging again at the next request");
                    this.rejudge(canary_version);
                }
                Err(e) => {
                    tracing::error!("the canary decision task failed: {e}; judging again at the next request");
                    this.rejudge(canary_version);
                }
            }
        });
    }

    /// Lets the canary `version` be judged again (its verdict could not be written).
    fn rejudge(&self, version: u32) {
        if let Ok(mut w) = self.window.lock() {
            if w.version == version {
                w.judged = false;
            }
        }
    }

    /// Outcomes of the current canary window: (canary version, stable, canary).
    pub fn window(&self) -> Option<(u32, Outcomes, Outcomes)> {
        let w = self.window.lock().ok()?;
        (w.version != 0).then(|| (w.version, w.stable.clone(), w.canary.clone()))
    }

    /// Follows the registry until the process ends.
    pub async fn watch(self: Arc<Self>) {
        loop {
            self.reconcile().await;
            let poll = if troupe_common::storage::is_remote(&self.registry_dir) { REMOTE_POLL } else { POLL };
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    /// Makes the live set match the registry's state. Returns the serial now served.
    pub async fn reconcile(&self) -> u64 {
        let _one = self.reconciling.lock().await;
        let current = self.live();
        let dir = self.registry_dir.clone();
        let state = match tokio::task::spawn_blocking(move || Registry::open(&dir).and_then(|r| r.state())).await {
            Ok(Ok(state)) => state,
            Ok(Err(e)) => {
                // A missing folder is normal before the first publish; anything else (a
                // state.json edited by hand, say) is worth a warning, once a minute at most.
                if self.registry_dir.is_dir() {
                    let mut last = self.last_warning.lock().unwrap_or_else(|p| p.into_inner());
                    if last.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                        *last = Some(std::time::Instant::now());
                        tracing::warn!("cannot read the registry's state: {e}; still serving what was served");
                    }
                }
                return current.serial;
            }
            Err(_) => return current.serial,
        };
        let all_alive = current.engines().all(|(e, _)| e.alive());
        if state.serial == current.serial && all_alive {
            return current.serial;
        }
        if let Ok(f) = self.failed.lock() {
            if f.as_ref().is_some_and(|(serial, _, _)| *serial == state.serial) {
                return current.serial;
            }
        }
        match self.build(&state, &current).await {
            Ok(live) => {
                let stable = live.stable.as_ref().map_or(0, |e| e.version);
                let canary = live.canary.as_ref().map_or(0, |(e, _)| e.version);
                if let Ok(mut slot) = self.live.write() {
                    *slot = Arc::new(live);
                }
                if let Ok(mut f) = self.failed.lock() {
                    *f = None;
                }
                self.metrics.version.with_label_values(&["stable"]).set(stable as i64);
                self.metrics.version.with_label_values(&["canary"]).set(canary as i64);
                self.metrics.swaps.inc();
                let canary_text = if canary > 0 { format!(", canary {}", version_name(canary)) } else { String::new() };
                tracing::info!("serving {}{canary_text} (registry state {})", version_name(stable), state.serial);
                state.serial
            }
            Err((version, e)) => {
                tracing::error!("cannot load {}: {e:#}; still serving what was served", version_name(version));
                if let Ok(mut f) = self.failed.lock() {
                    *f = Some((state.serial, version, format!("{e:#}")));
                }
                current.serial
            }
        }
    }

    async fn build(&self, state: &DeployState, current: &Live) -> Result<Live, (u32, anyhow::Error)> {
        let stable = match state.stable {
            Some(v) => Some(self.engine(v, current).await?),
            None => None,
        };
        let canary = match &state.canary {
            Some(c) => Some((self.engine(c.version, current).await?, c.clone())),
            None => None,
        };
        Ok(Live { serial: state.serial, stable, canary })
    }

    /// A loaded engine for `v`: the live one, or a new one loaded on a blocking thread.
    async fn engine(&self, v: u32, current: &Live) -> Result<Arc<Engine>, (u32, anyhow::Error)> {
        if let Some((e, _)) = current.engines().find(|(e, _)| e.version == v && e.alive()) {
            return Ok(e.clone());
        }
        let dir = self.registry_dir.clone();
        let (max_batch, max_queue) = (self.max_batch, self.max_queue);
        let batch = self.metrics.batch_size.clone();
        let observer: BatchObserver = Arc::new(move |n| batch.observe(n as f64));
        let loaded = tokio::task::spawn_blocking(move || {
            let registry = Registry::open(&dir)?;
            let folder = registry.verify(v)?;
            Engine::start(&folder, v, max_batch, max_queue, observer)
        })
        .await;
        match loaded {
            Ok(Ok(engine)) => Ok(Arc::new(engine)),
            Ok(Err(e)) => Err((v, e)),
            Err(e) => Err((v, anyhow::anyhow!("the loading task failed: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canary() -> Canary {
        Canary { version: 2, fraction: 0.25, requests: 4, max_error_rate_increase: 0.01, max_p95_ratio: 1.5, started_unix_ms: 0 }
    }

    fn outcomes(ok: &[f64], errors: u64) -> Outcomes {
        Outcomes { requests: ok.len() as u64 + errors, errors, latencies: ok.to_vec() }
    }

    #[test]
    fn a_canary_as_good_as_stable_is_promoted() {
        let (promote, reason) = judge(&outcomes(&[0.1, 0.1, 0.12], 0), &outcomes(&[0.11, 0.1, 0.13, 0.1], 0), &canary());
        assert!(promote, "{reason}");
    }

    #[test]
    fn a_failing_or_slow_canary_is_rolled_back_with_the_reason() {
        let (promote, reason) = judge(&outcomes(&[0.1; 10], 0), &outcomes(&[0.1], 3), &canary());
        assert!(!promote);
        assert!(reason.contains("error rate 75.0%"), "{reason}");
        let (promote, reason) = judge(&outcomes(&[0.1; 10], 0), &outcomes(&[0.3; 4], 0), &canary());
        assert!(!promote);
        assert!(reason.contains("p95 latency 300 ms"), "{reason}");
        let (promote, reason) = judge(&outcomes(&[0.004; 10], 0), &outcomes(&[0.012; 4], 0), &canary());
        assert!(promote, "3x of a few milliseconds is noise: {reason}");
    }

    #[test]
    fn p95_is_the_nearest_rank() {
        let o = outcomes(&(1..=20).map(f64::from).collect::<Vec<_>>(), 0);
        assert_eq!(o.p95(), Some(19.0));
        assert_eq!(outcomes(&[], 2).p95(), None);
    }
}
