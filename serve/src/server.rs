//! The HTTP server (axum): OpenAI-compatible completions, models, health, metrics, and the
//! deploy admin endpoints that `troupe deploy --server` uses.
//!
//! ```text
//! POST /v1/completions        prompt → text (JSON, or server-sent events with "stream": true)
//! GET  /v1/models             the model name and every version being served
//! GET  /healthz               the process is up
//! GET  /readyz                200 once a version serves, 503 before
//! GET  /metrics               Prometheus text format
//! GET  /admin/deploy          registry state, versions, history, live versions, canary window
//! POST /admin/deploy/promote  {"to": "v3"} (default: the canary)
//! POST /admin/deploy/rollback {"to": "v2"} (default: drop the canary, else the previous stable)
//! POST /admin/reload          read the registry now (what the Deployer calls after publishing)
//! ```
//! With an API key set, everything but /healthz, /readyz, /metrics and /admin needs
//! `Authorization: Bearer <key>`. The admin API takes its own key (`admin_key`); without one
//! it answers only to loopback clients (which must still bring the API key, if one is set).
//! Keys are compared in constant time.

use crate::api::{self, ApiError, Choice, Completion, FinishReason, Usage};
use crate::deployment::Deployment;
use crate::engine::{GenEvent, Generation, SubmitError};
use crate::metrics::ServeMetrics;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedReceiver;
use troupe_common::data::chat::{render, Message};
use troupe_common::registry::{self, parse_version, version_name, Registry};

pub struct ServeOptions {
    pub registry: PathBuf,
    pub listen: SocketAddr,
    /// The `model` name clients use (e.g. the run's name).
    pub model_name: String,
    /// Bearer token; None = no authentication.
    pub api_key: Option<String>,
    /// Bearer token of `/admin/*`; None = loopback clients only.
    pub admin_key: Option<String>,
    pub max_batch: usize,
    pub max_tokens: usize,
    pub max_queue: usize,
}

/// A running server (it runs until the process ends).
pub struct Server {
    pub addr: SocketAddr,
    pub deployment: Arc<Deployment>,
    pub metrics: ServeMetrics,
}

struct AppState {
    deployment: Arc<Deployment>,
    metrics: ServeMetrics,
    model_name: String,
    api_key: Option<String>,
    admin_key: Option<String>,
    max_tokens: usize,
    next_id: AtomicU64,
    id_prefix: String,
}

/// Binds, loads what the registry serves (if anything yet), and starts serving.
pub async fn start(options: ServeOptions) -> anyhow::Result<Server> {
    Registry::create(&options.registry)?;
    let metrics = ServeMetrics::new();
    let deployment = Arc::new(Deployment::new(&options.registry, options.max_batch, options.max_queue, metrics.clone()));
    deployment.reconcile().await;
    tokio::spawn(deployment.clone().watch());
    let listener =
        tokio::net::TcpListener::bind(options.listen).await.map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", options.listen))?;
    let addr = listener.local_addr()?;
    let state = Arc::new(AppState {
        deployment: deployment.clone(),
        metrics: metrics.clone(),
        model_name: options.model_name,
        api_key: options.api_key.filter(|k| !k.is_empty()),
        admin_key: options.admin_key.filter(|k| !k.is_empty()),
        max_tokens: options.max_tokens,
        next_id: AtomicU64::new(0),
        id_prefix: format!("{:x}{:x}", std::process::id(), registry::now_unix_ms() & 0xffff_ffff),
    });
    let admin = Router::new()
        .route("/admin/deploy", get(deploy_status))
        .route("/admin/deploy/promote", post(deploy_promote))
        .route("/admin/deploy/rollback", post(deploy_rollback))
        .route("/admin/reload", post(reload))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), admin_guard));
    let app = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .merge(admin)
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                kind: "invalid_request_error",
                code: "unknown_url",
                param: None,
                message: "no such endpoint; see /v1/completions and /v1/models".into(),
            }
        })
        .with_state(state)
        // Bodies are checked against 1 MiB by the parser; the transport refuses far larger
        // ones before reading them. Its plain-text refusals get OpenAI's error shape.
        .layer(axum::extract::DefaultBodyLimit::max(2 << 20))
        .layer(axum::middleware::map_response(openai_shaped_errors));
    troupe_common::http_server::spawn(listener, app, troupe_common::http_server::Limits::SERVING, "the serving endpoint");
    Ok(Server { addr, deployment, metrics })
}

/// Turns axum's own refusals (405, 413, …, plain text) into OpenAI-style JSON errors.
async fn openai_shaped_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response.headers().get(axum::http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (code, message) = match status {
        StatusCode::METHOD_NOT_ALLOWED => ("method_not_allowed", "this endpoint does not take that HTTP method".to_string()),
        StatusCode::PAYLOAD_TOO_LARGE => ("request_too_large", "the request body is too large".to_string()),
        other => ("http_error", format!("the request was refused ({other})")),
    };
    let kind = if status.is_client_error() { "invalid_request_error" } else { "server_error" };
    ApiError { status, kind, code, param: None, message }.into_response()
}

/// Admits a request to `/admin/*` (see the module documentation).
async fn admin_guard(State(s): State<Arc<AppState>>, request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let peer = request.extensions().get::<axum::extract::ConnectInfo<SocketAddr>>().map(|c| c.0);
    match s.authorize_admin(request.headers(), peer) {
        Ok(()) => next.run(request).await,
        Err(e) => s.refuse(e),
    }
}

/// The bearer token of a request, if it sends one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "))
}

/// Whether `given` is `key`, in time that does not depend on where they differ (both are
/// hashed first, so neither the length nor a common prefix shows in the timing).
fn key_matches(given: Option<&str>, key: &str) -> bool {
    use sha2::{Digest, Sha256};
    let Some(given) = given else { return false };
    troupe_common::net::constant_time_eq(&Sha256::digest(given.as_bytes()), &Sha256::digest(key.as_bytes()))
}

impl AppState {
    fn authorize_admin(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> Result<(), ApiError> {
        let refused =
            |status, code, message: &str| ApiError { status, kind: "invalid_request_error", code, param: None, message: message.into() };
        match &self.admin_key {
            Some(key) if key_matches(bearer(headers), key) => Ok(()),
            Some(_) => Err(refused(
                StatusCode::UNAUTHORIZED,
                "invalid_admin_key",
                "missing or wrong admin key: the admin API takes serve.admin_key (TROUPE_ADMIN_KEY) as Authorization: Bearer <key>, not the completions key",
            )),
            None if peer.is_some_and(|p| p.ip().is_loopback()) => self.authorize(headers),
            None => Err(refused(
                StatusCode::FORBIDDEN,
                "admin_loopback_only",
                "the admin API answers only on loopback unless the server has an admin key (serve.admin_key / TROUPE_ADMIN_KEY)",
            )),
        }
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.api_key else { return Ok(()) };
        if key_matches(bearer(headers), key) {
            Ok(())
        } else {
            Err(ApiError {
                status: StatusCode::UNAUTHORIZED,
                kind: "invalid_request_error",
                code: "invalid_api_key",
                param: None,
                message: "missing or wrong API key: send Authorization: Bearer <key> (serve.api_key / TROUPE_API_KEY)".into(),
            })
        }
    }

    /// Counts a refused request and turns it into its response.
    fn refuse(&self, e: ApiError) -> Response {
        if e.status.is_client_error() {
            self.metrics.bad_requests.with_label_values(&[e.code]).inc();
        }
        e.into_response()
    }

    /// The version a request's `model` pins, if any: `name`, `name:vN` or `vN`.
    fn pinned(&self, model: Option<&str>) -> Result<Option<u32>, ApiError> {
        let Some(model) = model.filter(|m| !m.is_empty()) else { return Ok(None) };
        if model == self.model_name {
            return Ok(None);
        }
        let version = model.strip_prefix(&format!("{}:", self.model_name)).unwrap_or(model);
        match parse_version(version) {
            Some(v) => Ok(Some(v)),
            None => Err(self.model_not_found(model)),
        }
    }

    fn model_not_found(&self, model: &str) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            code: "model_not_found",
            param: Some("model"),
            message: format!("the model `{model}` does not exist here; GET /v1/models lists `{}` and its served versions", self.model_name),
        }
    }
}

fn server_error(status: StatusCode, code: &'static str, message: String) -> ApiError {
    ApiError { status, kind: "server_error", code, param: None, message }
}

async fn completions(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let started = Instant::now();
    if let Err(e) = s.authorize(&headers) {
        return s.refuse(e);
    }
    let req = match api::parse(&body, s.max_tokens) {
        Ok(req) => req,
        Err(e) => return s.refuse(e),
    };
    answer(s, started, req, None).await
}

/// `POST /v1/chat/completions`: the messages rendered with the version's chat template, then
/// generated like a completion (stopping at `<|endoftext|>`, which ends an assistant's turn).
async fn chat_completions(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let started = Instant::now();
    if let Err(e) = s.authorize(&headers) {
        return s.refuse(e);
    }
    let (messages, req) = match api::parse_chat(&body, s.max_tokens) {
        Ok(parsed) => parsed,
        Err(e) => return s.refuse(e),
    };
    answer(s, started, req, Some(messages)).await
}

/// Routes a checked request to a version and answers it: a completion of `req.prompt`, or with
/// `messages` a chat reply.
async fn answer(s: Arc<AppState>, started: Instant, req: api::Checked, messages: Option<Vec<Message>>) -> Response {
    let pinned = match s.pinned(req.model.as_deref()) {
        Ok(p) => p,
        Err(e) => return s.refuse(e),
    };
    let Some((engine, _role)) = s.deployment.route(pinned) else {
        return match pinned {
            Some(v) => s.refuse(s.model_not_found(&version_name(v))),
            None => server_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "model_not_ready",
                "no model version is being served yet (the registry has none; see /readyz)".into(),
            )
            .into_response(),
        };
    };
    let version = engine.version;
    let encoded = match &messages {
        Some(m) => render(engine.tokenizer(), &engine.chat_template, m, true).map(|(ids, _)| ids),
        None => engine.tokenizer().encode(&req.prompt),
    };
    let mut prompt: Vec<i64> = match encoded {
        Ok(ids) => ids.into_iter().map(i64::from).collect(),
        Err(e) => return s.refuse(ApiError::invalid("prompt", "invalid_value", format!("the prompt cannot be tokenized: {e}"))),
    };
    if prompt.is_empty() {
        // An empty prompt continues from a document boundary, as GPT-2 does.
        prompt.push(i64::from(engine.tokenizer().eot_id()));
    }
    if prompt.len() > engine.block_size {
        return s.refuse(ApiError::invalid(
            "prompt",
            "context_length_exceeded",
            format!("the prompt is {} tokens; this model's context is {} tokens", prompt.len(), engine.block_size),
        ));
    }
    let faults = s.deployment.faults;
    if let Some((v, ms)) = faults.delay {
        if v == version {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
    }
    let n = s.next_id.fetch_add(1, Ordering::Relaxed);
    let id = format!("cmpl-{}{n:x}", s.id_prefix);
    if faults.fail_version == Some(version) {
        s.deployment.record(version, false, started.elapsed().as_secs_f64(), 0);
        return server_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "fault_injection",
            format!("fault injection: {} fails every request", version_name(version)),
        )
        .into_response();
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let prompt_tokens = prompt.len();
    let generation = Generation {
        prompt,
        max_tokens: req.max_tokens,
        sampling: req.sampling,
        seed: req.seed.unwrap_or(n ^ 0x5EED),
        stop: req.stop,
        events: tx,
    };
    if let Err(e) = engine.submit(generation) {
        s.metrics.queue_depth.set(engine.queue_depth() as i64);
        let code = match e {
            SubmitError::Overloaded(_) => "overloaded",
            SubmitError::Closed => "version_closed",
        };
        return server_error(StatusCode::SERVICE_UNAVAILABLE, code, e.to_string()).into_response();
    }
    s.metrics.queue_depth.set(engine.queue_depth() as i64);
    let reply = Reply {
        s: s.clone(),
        chat: messages.is_some(),
        include_usage: req.include_usage,
        id,
        version,
        prompt_tokens,
        started,
        created: registry::now_unix_ms() / 1000,
    };
    if req.stream {
        reply.stream(rx)
    } else {
        reply.whole(rx).await
    }
}

/// Builds the answer to one completion from the engine's events.
struct Reply {
    s: Arc<AppState>,
    /// A chat reply (`chat.completion` bodies) rather than a text completion.
    chat: bool,
    /// Streams end with a usage chunk only when the client asked (stream_options).
    include_usage: bool,
    id: String,
    version: u32,
    prompt_tokens: usize,
    started: Instant,
    created: u64,
}

impl Reply {
    /// A whole answer (with `usage`), or one chunk of a stream: a text completion's, or a chat
    /// reply's (`message` when whole, `delta` in a stream).
    fn body(&self, text: String, finish_reason: Option<FinishReason>, usage: Option<Usage>) -> serde_json::Value {
        let completion = Completion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.s.model_name.clone(),
            version: version_name(self.version),
            system_fingerprint: version_name(self.version),
            choices: Vec::new(),
            usage,
        };
        let mut body = serde_json::to_value(&completion).unwrap_or_default();
        if !self.chat {
            body["choices"] = serde_json::json!([Choice { text, index: 0, logprobs: None, finish_reason }]);
            return body;
        }
        let whole = body.get("usage").is_some_and(|u| !u.is_null()) && finish_reason.is_some();
        let (object, choice) = if whole {
            (
                "chat.completion",
                serde_json::json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}),
            )
        } else if text.is_empty() {
            ("chat.completion.chunk", serde_json::json!({"index": 0, "delta": {}, "finish_reason": finish_reason}))
        } else {
            (
                "chat.completion.chunk",
                serde_json::json!({"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": finish_reason}),
            )
        };
        body["object"] = object.into();
        body["id"] = format!("chat{}", self.id).into();
        body["choices"] = serde_json::json!([choice]);
        body
    }

    fn version_header(&self) -> [(&'static str, HeaderValue); 1] {
        [("x-troupe-version", HeaderValue::from_str(&version_name(self.version)).expect("ascii"))]
    }

    fn first_text(&self, seen: &mut bool) {
        if !*seen {
            *seen = true;
            self.s.metrics.first_token_seconds.observe(self.started.elapsed().as_secs_f64());
        }
    }

    fn done(&self, ok: bool, completion_tokens: usize) {
        self.s.deployment.record(self.version, ok, self.started.elapsed().as_secs_f64(), completion_tokens);
    }

    async fn whole(self, mut rx: UnboundedReceiver<GenEvent>) -> Response {
        let mut text = String::new();
        let mut seen = false;
        while let Some(event) = rx.recv().await {
            match event {
                GenEvent::Text(t) => {
                    self.first_text(&mut seen);
                    text.push_str(&t);
                }
                GenEvent::Done { finish_reason, completion_tokens } => {
                    self.done(true, completion_tokens);
                    let usage = Usage {
                        prompt_tokens: self.prompt_tokens,
                        completion_tokens,
                        total_tokens: self.prompt_tokens + completion_tokens,
                    };
                    let body = self.body(text, Some(finish_reason), Some(usage));
                    return (self.version_header(), Json(body)).into_response();
                }
                GenEvent::Failed(e) => {
                    self.done(false, 0);
                    return server_error(StatusCode::INTERNAL_SERVER_ERROR, "generation_failed", e).into_response();
                }
            }
        }
        self.done(false, 0);
        server_error(StatusCode::INTERNAL_SERVER_ERROR, "generation_failed", "the model version stopped mid-request".into()).into_response()
    }

    /// Server-sent events as OpenAI sends them: one chunk per piece of text, a last chunk
    /// with `finish_reason` and `usage`, then `data: [DONE]`.
    fn stream(self, rx: UnboundedReceiver<GenEvent>) -> Response {
        let headers = self.version_header();
        let reply = Arc::new(self);
        let chunks = futures::stream::unfold((rx, false, false), {
            let reply = reply.clone();
            move |(mut rx, mut seen, ended)| {
                let reply = reply.clone();
                async move {
                    if ended {
                        return None;
                    }
                    let event = match rx.recv().await {
                        Some(GenEvent::Text(t)) => {
                            reply.first_text(&mut seen);
                            json_event(&reply.body(t, None, None))
                        }
                        Some(GenEvent::Done { finish_reason, completion_tokens }) => {
                            reply.done(true, completion_tokens);
                            let mut events = vec![json_event(&reply.body(String::new(), Some(finish_reason), None))];
                            if reply.include_usage {
                                // As OpenAI does with stream_options.include_usage: one more
                                // chunk, with no choices, carrying the usage.
                                let usage = Usage {
                                    prompt_tokens: reply.prompt_tokens,
                                    completion_tokens,
                                    total_tokens: reply.prompt_tokens + completion_tokens,
                                };
                                let mut last = reply.body(String::new(), None, Some(usage));
                                last["choices"] = serde_json::json!([]);
                                events.push(json_event(&last));
                            }
                            events.push(Event::default().data("[DONE]"));
                            return Some((events, (rx, seen, true)));
                        }
                        Some(GenEvent::Failed(e)) => {
                            reply.done(false, 0);
                            let err = server_error(StatusCode::INTERNAL_SERVER_ERROR, "generation_failed", e);
                            return Some((
                                vec![Event::default().data(err.body().to_string()), Event::default().data("[DONE]")],
                                (rx, seen, true),
                            ));
                        }
                        None => {
                            reply.done(false, 0);
                            return None;
                        }
                    };
                    Some((vec![event], (rx, seen, false)))
                }
            }
        })
        .flat_map(|events| futures::stream::iter(events.into_iter().map(Ok::<_, std::convert::Infallible>)));
        (headers, Sse::new(chunks).keep_alive(KeepAlive::default())).into_response()
    }
}

fn json_event<T: serde::Serialize>(value: &T) -> Event {
    Event::default().data(serde_json::to_string(value).unwrap_or_default())
}

async fn models(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = s.authorize(&headers) {
        return s.refuse(e);
    }
    let live = s.deployment.live();
    let mut data = vec![serde_json::json!({"id": s.model_name, "object": "model", "created": 0, "owned_by": "troupe",
        "version": live.stable.as_ref().map(|e| version_name(e.version))})];
    for (engine, role) in live.engines() {
        data.push(serde_json::json!({"id": format!("{}:{}", s.model_name, version_name(engine.version)), "object": "model",
            "created": 0, "owned_by": "troupe", "role": role.name()}));
    }
    Json(serde_json::json!({"object": "list", "data": data})).into_response()
}

async fn readyz(State(s): State<Arc<AppState>>) -> Response {
    let live = s.deployment.live();
    match &live.stable {
        Some(e) => Json(serde_json::json!({"ready": true, "stable": version_name(e.version)})).into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"ready": false, "reason": s.deployment.load_error().unwrap_or_else(|| "no version published yet".into())})),
        )
            .into_response(),
    }
}

async fn metrics_text(State(s): State<Arc<AppState>>) -> Response {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], troupe_common::metrics::render(&s.metrics.registry)).into_response()
}

/// What `GET /admin/deploy` and `troupe deploy status` show.
pub fn deploy_report(registry: &Registry) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::json!({
        "registry": registry.dir().display().to_string(),
        "state": registry.state()?,
        "versions": registry.summaries()?,
        "history": registry.history()?,
    }))
}

async fn deploy_status(State(s): State<Arc<AppState>>) -> Response {
    // Admitted by admin_guard.
    let dir = s.deployment.registry_dir().to_path_buf();
    let report =
        tokio::task::spawn_blocking(move || Registry::open(&dir).map_err(anyhow::Error::from).and_then(|r| deploy_report(&r))).await;
    let mut report = match report {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return server_error(StatusCode::INTERNAL_SERVER_ERROR, "registry_error", format!("{e:#}")).into_response(),
        Err(e) => return server_error(StatusCode::INTERNAL_SERVER_ERROR, "registry_error", e.to_string()).into_response(),
    };
    let live = s.deployment.live();
    report["live"] = serde_json::json!({
        "serial": live.serial,
        "stable": live.stable.as_ref().map(|e| version_name(e.version)),
        "canary": live.canary.as_ref().map(|(e, _)| version_name(e.version)),
        "load_error": s.deployment.load_error(),
    });
    if let Some((v, stable, canary)) = s.deployment.window() {
        report["canary_window"] = serde_json::json!({
            "version": version_name(v),
            "stable": {"requests": stable.requests, "errors": stable.errors, "p95_seconds": stable.p95()},
            "canary": {"requests": canary.requests, "errors": canary.errors, "p95_seconds": canary.p95()},
        });
    }
    Json(report).into_response()
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Target {
    to: Option<String>,
    reason: Option<String>,
}

async fn deploy_change(s: Arc<AppState>, body: Bytes, promote: bool) -> Response {
    // Admitted by admin_guard.
    let target: Target = if body.is_empty() {
        Target::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(t) => t,
            Err(e) => return s.refuse(ApiError::invalid("body", "invalid_json", format!("expected {{\"to\": \"vN\"}}: {e}"))),
        }
    };
    let to = match target.to.as_deref().map(|t| parse_version(t).ok_or(t)) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(t)) => return s.refuse(ApiError::invalid("to", "invalid_value", format!("`{t}` is not a version (use v3 or 3)"))),
    };
    let reason = target.reason.unwrap_or_else(|| "asked through the server's admin API".into());
    let dir = s.deployment.registry_dir().to_path_buf();
    let changed = tokio::task::spawn_blocking(move || {
        let registry = Registry::open(&dir)?;
        if promote {
            registry.promote(to, "admin", &reason)
        } else {
            registry.rollback(to, "admin", &reason)
        }
    })
    .await;
    match changed {
        Ok(Ok(state)) => {
            // Answer once this replica serves the new state, or say why it does not.
            let serving = s.deployment.reconcile().await;
            if serving < state.serial {
                let why = s.deployment.load_error().unwrap_or_else(|| "it is still loading".into());
                return server_error(
                    StatusCode::BAD_GATEWAY,
                    "not_served",
                    format!("the registry changed (state {}) but this server cannot serve it: {why}", state.serial),
                )
                .into_response();
            }
            Json(state).into_response()
        }
        Ok(Err(e)) => s.refuse(ApiError {
            status: StatusCode::CONFLICT,
            kind: "invalid_request_error",
            code: "deploy_refused",
            param: Some("to"),
            message: e.to_string(),
        }),
        Err(e) => server_error(StatusCode::INTERNAL_SERVER_ERROR, "registry_error", e.to_string()).into_response(),
    }
}

async fn deploy_promote(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    deploy_change(s, body, true).await
}

async fn deploy_rollback(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    deploy_change(s, body, false).await
}

async fn reload(State(s): State<Arc<AppState>>) -> Response {
    // Admitted by admin_guard.
    let serial = s.deployment.reconcile().await;
    Json(serde_json::json!({"serial": serial})).into_response()
}

impl Server {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_transports_plain_refusals_get_openai_error_bodies() {
        for (status, code) in [(StatusCode::PAYLOAD_TOO_LARGE, "request_too_large"), (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")]
        {
            let plain = (status, "length limit exceeded").into_response();
            let shaped = openai_shaped_errors(plain).await;
            assert_eq!(shaped.status(), status);
            let bytes = axum::body::to_bytes(shaped.into_body(), 1 << 16).await.unwrap();
            let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(body["error"]["code"], code);
        }
        let ok = openai_shaped_errors("fine".into_response()).await;
        assert_eq!(ok.status(), StatusCode::OK);
    }
}
