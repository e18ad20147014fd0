//! Prometheus metrics (prefix `troupe_`) and the `/metrics` HTTP endpoint.
//!
//! Each process has its own registry; the coordinator's and every worker's are served on
//! their own address so Prometheus scrapes them all.

use crate::status::SharedStatus;
use prometheus::{
    Counter, Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use std::net::SocketAddr;

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    registry.register(Box::new(metric.clone())).expect("metric names are unique constants within one registry");
    metric
}

/// Adds the process's object-storage request failures to a registry.
fn with_storage_failures(registry: Registry) -> Registry {
    register(&registry, crate::storage::request_failures().clone());
    registry
}

/// Buckets from 1 ms to ~100 s for durations.
fn seconds_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.001, 2.0, 18).expect("constant bucket layout is valid")
}

#[derive(Clone)]
pub struct CoordinatorMetrics {
    pub registry: Registry,
    pub step: IntGauge,
    pub train_loss: Gauge,
    pub learning_rate: Gauge,
    pub tokens_per_second: Gauge,
    pub workers: IntGaugeVec,
    pub step_seconds: Histogram,
    pub allreduce_seconds: Histogram,
    pub checkpoint_seconds: Histogram,
    pub eval_loss: Gauge,
    pub actor_restarts_total: IntCounterVec,
    pub refused_connections_total: IntCounterVec,
    /// Ranks of the current membership generation.
    pub world_size: IntGauge,
    pub generation: IntGauge,
    /// 1 while fewer than `cluster.min_workers` are present.
    pub paused: IntGauge,
    pub regroups_total: IntCounter,
    pub regroup_seconds: Histogram,
    /// exp(validation loss) of the last evaluated checkpoint.
    pub eval_perplexity: Gauge,
    /// The registry's newest published version (0: none yet).
    pub deployed_version: IntGauge,
    /// Evaluated checkpoints by what the Deployer did: published, skipped, failed.
    pub deploys_total: IntCounterVec,
    /// Validation loss per data source, when the data has several.
    pub eval_loss_by_source: prometheus::GaugeVec,
    /// Evaluation tasks' scores of the last evaluated checkpoint (`eval.task_items`).
    pub eval_task_score: prometheus::GaugeVec,
    /// Steps that applied no update, by reason (nonfinite_loss, nonfinite_gradient, injected).
    pub steps_skipped_total: IntCounterVec,
    /// Step reports of a rank that differed from the other ranks'.
    pub rank_disagreements_total: IntCounter,
    pub checkpoint_failures_total: IntCounter,
    /// Checkpoints that failed in a row; anything above 0 means nothing is being saved.
    pub checkpoint_failures_in_a_row: IntGauge,
}

impl CoordinatorMetrics {
    pub fn new() -> CoordinatorMetrics {
        let r = Registry::new();
        CoordinatorMetrics {
            step: register(&r, IntGauge::new("troupe_step", "Completed optimizer steps").unwrap()),
            train_loss: register(&r, Gauge::new("troupe_train_loss", "Training loss of the last step").unwrap()),
            learning_rate: register(&r, Gauge::new("troupe_learning_rate", "Learning rate of the last step").unwrap()),
            tokens_per_second: register(
                &r,
                Gauge::new("troupe_tokens_per_second", "Training throughput over the last step, all workers").unwrap(),
            ),
            workers: register(&r, IntGaugeVec::new(Opts::new("troupe_workers", "Workers by state"), &["state"]).unwrap()),
            step_seconds: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new("troupe_step_seconds", "Wall time of one optimizer step").buckets(seconds_buckets()),
                )
                .unwrap(),
            ),
            allreduce_seconds: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new("troupe_allreduce_seconds", "Gradient all-reduce time per step (slowest rank)")
                        .buckets(seconds_buckets()),
                )
                .unwrap(),
            ),
            checkpoint_seconds: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new("troupe_checkpoint_seconds", "From checkpoint request to commit").buckets(seconds_buckets()),
                )
                .unwrap(),
            ),
            eval_loss: register(&r, Gauge::new("troupe_eval_loss", "Validation loss of the last evaluation").unwrap()),
            actor_restarts_total: register(
                &r,
                IntCounterVec::new(Opts::new("troupe_actor_restarts_total", "Supervised actor restarts"), &["actor"]).unwrap(),
            ),
            refused_connections_total: register(
                &r,
                IntCounterVec::new(Opts::new("troupe_refused_connections_total", "Connections refused by the coordinator"), &["reason"])
                    .unwrap(),
            ),
            world_size: register(&r, IntGauge::new("troupe_world_size", "Ranks training in the current membership generation").unwrap()),
            generation: register(
                &r,
                IntGauge::new("troupe_membership_generation", "Membership generation (bumped on every regroup)").unwrap(),
            ),
            paused: register(&r, IntGauge::new("troupe_paused", "1 while the run waits for cluster.min_workers workers").unwrap()),
            regroups_total: register(
                &r,
                IntCounter::new("troupe_regroups_total", "Membership changes after which training resumed").unwrap(),
            ),
            regroup_seconds: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new("troupe_regroup_seconds", "From a membership change to training again").buckets(seconds_buckets()),
                )
                .unwrap(),
            ),
            eval_perplexity: register(
                &r,
                Gauge::new("troupe_eval_perplexity", "Validation perplexity of the last evaluated checkpoint").unwrap(),
            ),
            deployed_version: register(
                &r,
                IntGauge::new("troupe_deployed_version", "Newest registry version the Deployer published (0 = none)").unwrap(),
            ),
            deploys_total: register(
                &r,
                IntCounterVec::new(Opts::new("troupe_deploys_total", "Evaluated checkpoints by the Deployer's decision"), &["action"])
                    .unwrap(),
            ),
            eval_loss_by_source: register(
                &r,
                prometheus::GaugeVec::new(
                    Opts::new("troupe_eval_loss_by_source", "Validation loss of the last evaluation, per data source"),
                    &["source"],
                )
                .unwrap(),
            ),
            eval_task_score: register(
                &r,
                prometheus::GaugeVec::new(
                    Opts::new("troupe_eval_task_score", "Score of the last evaluated checkpoint on each evaluation task metric"),
                    &["metric"],
                )
                .unwrap(),
            ),
            steps_skipped_total: register(
                &r,
                IntCounterVec::new(
                    Opts::new("troupe_steps_skipped_total", "Steps that applied no update because their loss or gradient was not finite"),
                    &["reason"],
                )
                .unwrap(),
            ),
            rank_disagreements_total: register(
                &r,
                IntCounter::new("troupe_rank_disagreements_total", "Step reports of a rank that differed from the other ranks'").unwrap(),
            ),
            checkpoint_failures_total: register(
                &r,
                IntCounter::new("troupe_checkpoint_failures_total", "Checkpoints that could not be written or committed").unwrap(),
            ),
            checkpoint_failures_in_a_row: register(
                &r,
                IntGauge::new("troupe_checkpoint_failures_in_a_row", "Checkpoints that failed in a row (0 once one commits)").unwrap(),
            ),
            registry: with_storage_failures(r),
        }
    }
}

impl Default for CoordinatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Clone)]
pub struct WorkerMetrics {
    pub registry: Registry,
    pub step: IntGauge,
    /// `phase` = compute | communication | data.
    pub step_seconds: HistogramVec,
    pub bytes_sent_total: IntCounter,
    /// Supervised actors of the worker (the collective) that failed and were replaced.
    pub actor_restarts_total: IntCounterVec,
    /// Training state held between steps: `kind` = params | grads | optim.
    pub memory_bytes: IntGaugeVec,
    /// Time training waited for the previous checkpoint write to finish.
    pub checkpoint_wait_seconds_total: Counter,
}

impl WorkerMetrics {
    pub fn new(rank_label: &str) -> WorkerMetrics {
        let r = Registry::new_custom(None, Some([("worker".to_string(), rank_label.to_string())].into()))
            .expect("constant registry labels are valid");
        WorkerMetrics {
            step: register(&r, IntGauge::new("troupe_worker_step", "Completed optimizer steps on this worker").unwrap()),
            step_seconds: register(
                &r,
                HistogramVec::new(
                    HistogramOpts::new("troupe_worker_step_seconds", "Time per step by phase").buckets(seconds_buckets()),
                    &["phase"],
                )
                .unwrap(),
            ),
            bytes_sent_total: register(
                &r,
                IntCounter::new("troupe_bytes_sent_total", "Gradient bytes sent to the ring successor").unwrap(),
            ),
            actor_restarts_total: register(
                &r,
                IntCounterVec::new(Opts::new("troupe_actor_restarts_total", "Supervised actor restarts"), &["actor"]).unwrap(),
            ),
            memory_bytes: register(
                &r,
                IntGaugeVec::new(Opts::new("troupe_memory_bytes", "Training state this worker holds between steps, by kind"), &["kind"])
                    .unwrap(),
            ),
            checkpoint_wait_seconds_total: register(
                &r,
                Counter::new("troupe_checkpoint_wait_seconds_total", "Time training waited for the previous checkpoint write").unwrap(),
            ),
            registry: with_storage_failures(r),
        }
    }
}

/// Text exposition of a registry.
pub fn render(registry: &Registry) -> String {
    let mut buf = Vec::new();
    let encoder = TextEncoder::new();
    if encoder.encode(&registry.gather(), &mut buf).is_err() {
        return String::new();
    }
    String::from_utf8(buf).unwrap_or_default()
}

/// Serves `GET /metrics` for `registry` on `addr` (port 0 picks one), and `GET /status` (JSON)
/// when a status is given. Returns the bound address; the server runs until the process ends.
pub async fn serve(registry: Registry, addr: SocketAddr, status: Option<SharedStatus>) -> std::io::Result<SocketAddr> {
    let mut app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || async move { ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], render(&registry)) }),
    );
    if let Some(status) = status {
        app = app.route(
            "/status",
            axum::routing::get(move || async move {
                let snapshot = status.read().map(|s| s.clone()).unwrap_or_default();
                axum::Json(snapshot)
            }),
        );
    }
    crate::http_server::bind_and_spawn(addr, app, crate::http_server::Limits::METRICS, "the metrics server").await
}
