//! The serving replica's Prometheus metrics (`GET /metrics`).

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

#[derive(Clone)]
pub struct ServeMetrics {
    pub registry: Registry,
    /// Completions by version and outcome (ok, error).
    pub requests: IntCounterVec,
    /// Refused requests by reason (the OpenAI error code).
    pub bad_requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub first_token_seconds: Histogram,
    pub generated_tokens: IntCounterVec,
    /// Sequences per forward pass.
    pub batch_size: Histogram,
    pub queue_depth: IntGauge,
    /// The version serving each role (0 = none).
    pub version: IntGaugeVec,
    pub swaps: IntCounter,
    pub canary_decisions: IntCounterVec,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone())).expect("metric names are unique");
    c
}

impl ServeMetrics {
    pub fn new() -> ServeMetrics {
        let r = Registry::new();
        let latency = vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
        ServeMetrics {
            requests: register(
                &r,
                IntCounterVec::new(
                    Opts::new("troupe_serve_requests_total", "Completion requests answered, by version and outcome"),
                    &["version", "outcome"],
                )
                .unwrap(),
            ),
            bad_requests: register(
                &r,
                IntCounterVec::new(Opts::new("troupe_serve_bad_requests_total", "Requests refused with a 4xx, by reason"), &["reason"])
                    .unwrap(),
            ),
            request_seconds: register(
                &r,
                HistogramVec::new(
                    HistogramOpts::new("troupe_serve_request_seconds", "Completion latency, request to last token")
                        .buckets(latency.clone()),
                    &["version"],
                )
                .unwrap(),
            ),
            first_token_seconds: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new("troupe_serve_first_token_seconds", "Time to the first generated text").buckets(latency),
                )
                .unwrap(),
            ),
            generated_tokens: register(
                &r,
                IntCounterVec::new(Opts::new("troupe_serve_generated_tokens_total", "Tokens generated, by version"), &["version"]).unwrap(),
            ),
            batch_size: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new("troupe_serve_batch_size", "Sequences per forward pass")
                        .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),
                )
                .unwrap(),
            ),
            queue_depth: register(&r, IntGauge::new("troupe_serve_queue_depth", "Requests waiting for a place in a batch").unwrap()),
            version: register(
                &r,
                IntGaugeVec::new(Opts::new("troupe_serve_version", "Registry version serving each role (0 = none)"), &["role"]).unwrap(),
            ),
            swaps: register(&r, IntCounter::new("troupe_serve_swaps_total", "Times the set of served versions changed").unwrap()),
            canary_decisions: register(
                &r,
                IntCounterVec::new(Opts::new("troupe_serve_canary_decisions_total", "Canaries judged, by decision"), &["decision"])
                    .unwrap(),
            ),
            registry: r,
        }
    }
}

impl Default for ServeMetrics {
    fn default() -> Self {
        ServeMetrics::new()
    }
}
