//! The HTTP server (axum): OpenAI-compatible completions, models, health, metrics, and the
//! deploy admin endpoints that `troupe deploy --server` uses.
//!
//! ```text
//! POST /v1/completions        prompt → text (JSON, or server-sent events with "stream": true);
//!                             `n`, `echo` and `logprobs` as OpenAI's completions API has them
//! POST /v1/chat/completions   messages → a reply, with the version's chat template
//! POST /tokenize              {"prompt": "text"} → {"tokens": [ids], "count", "max_model_len"}
//! POST /detokenize            {"tokens": [ids]} → {"prompt": "text"}
//! GET  /tokenizer_info        the special tokens and the context length (as vLLM has it: how
//!                             lm-evaluation-harness finds out that it can tokenize here)
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
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/tokenizer_info", get(tokenizer_info))
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
    if messages.is_some() && (req.n > 1 || req.echo || req.logprobs.is_some()) {
        return s.refuse(ApiError::invalid("n", "unsupported_value", "chat completions take n = 1 and no logprobs on this server"));
    }
    let tokenizer = engine.tokenizer();
    let encoded = match (&messages, &req.prompt_ids) {
        (Some(m), _) => render(tokenizer, &engine.chat_template, m, true).map(|(ids, _)| ids),
        (None, Some(ids)) => match ids.iter().find(|&&id| id as usize >= tokenizer.vocab_size()) {
            Some(bad) => {
                return s.refuse(ApiError::invalid(
                    "prompt",
                    "invalid_value",
                    format!("token {bad} is outside this model's vocabulary of {}", tokenizer.vocab_size()),
                ))
            }
            None => Ok(ids.clone()),
        },
        (None, None) => tokenizer.encode(&req.prompt),
    };
    let mut prompt: Vec<i64> = match encoded {
        Ok(ids) => ids.into_iter().map(i64::from).collect(),
        Err(e) => return s.refuse(ApiError::invalid("prompt", "invalid_value", format!("the prompt cannot be tokenized: {e}"))),
    };
    if prompt.is_empty() {
        // An empty prompt continues from a document boundary, as GPT-2 does.
        prompt.push(i64::from(tokenizer.eot_id()));
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
    let prompt_tokens = prompt.len();
    let seed = req.seed.unwrap_or(n ^ 0x5EED);
    let mut receivers = Vec::with_capacity(req.n);
    for i in 0..req.n {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let generation = Generation {
            prompt: prompt.clone(),
            max_tokens: req.max_tokens,
            sampling: req.sampling,
            // Each of the n completions draws from its own random stream.
            seed: seed.wrapping_add(i as u64),
            stop: req.stop.clone(),
            logprobs: req.logprobs,
            // Only one of the n needs to score the prompt: it is the same for all.
            score_prompt: req.echo && req.logprobs.is_some() && i == 0,
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
        receivers.push(rx);
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
        // Checked: a stream has n = 1, no logprobs, no echo.
        reply.stream(receivers.remove(0))
    } else {
        let echo = req.echo.then(|| Echo { prompt, text: if req.prompt_ids.is_some() { String::new() } else { req.prompt.clone() } });
        reply.whole(receivers, &engine, echo, req.logprobs.is_some()).await
    }
}

/// `echo`: the prompt, to put in front of each completion.
struct Echo {
    prompt: Vec<i64>,
    /// As sent (empty when it was sent as token ids: it is then decoded).
    text: String,
}

/// One completion as the engine produced it.
#[derive(Default)]
struct Collected {
    text: String,
    finish_reason: Option<FinishReason>,
    completion_tokens: usize,
    prompt_scores: Option<Vec<troupe_common::model::TokenLogProb>>,
    token_scores: Vec<troupe_common::model::TokenLogProb>,
}

/// The text of one token, as OpenAI's `logprobs.tokens` give it (a token that ends inside a
/// character shows the replacement character).
fn token_text(tokenizer: &troupe_common::data::Tokenizer, id: u32) -> String {
    tokenizer.decode(&[id]).unwrap_or_default()
}

/// A choice's `logprobs`: the echoed prompt's tokens (the first unscored), then the generated ones.
fn logprobs_of(
    tokenizer: &troupe_common::data::Tokenizer,
    echo: Option<&Echo>,
    prompt_scores: Option<&[troupe_common::model::TokenLogProb]>,
    generated: &[troupe_common::model::TokenLogProb],
) -> api::LogProbs {
    let mut out = api::LogProbs::default();
    let mut offset = 0;
    let top_map = |score: &troupe_common::model::TokenLogProb| -> std::collections::BTreeMap<String, f32> {
        score.top.iter().map(|(id, lp)| (token_text(tokenizer, *id), *lp)).collect()
    };
    let mut push = |out: &mut api::LogProbs, text: String, lp: Option<f32>, top: Option<std::collections::BTreeMap<String, f32>>| {
        out.text_offset.push(offset);
        offset += text.len();
        out.tokens.push(text);
        out.token_logprobs.push(lp);
        out.top_logprobs.push(top);
    };
    if let Some(echo) = echo {
        for (i, id) in echo.prompt.iter().enumerate() {
            let score = if i == 0 { None } else { prompt_scores.and_then(|s| s.get(i - 1)) };
            push(&mut out, token_text(tokenizer, *id as u32), score.map(|s| s.logprob), score.map(top_map));
        }
    }
    for score in generated {
        push(&mut out, token_text(tokenizer, score.id), Some(score.logprob), Some(top_map(score)));
    }
    out
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

    /// Every event of one completion, until it is done.
    async fn collect(&self, mut rx: UnboundedReceiver<GenEvent>, seen: &mut bool) -> Result<Collected, String> {
        let mut c = Collected::default();
        while let Some(event) = rx.recv().await {
            match event {
                GenEvent::Prompt(scores) => c.prompt_scores = Some(scores),
                GenEvent::Token(score) => c.token_scores.push(score),
                GenEvent::Text(t) => {
                    self.first_text(seen);
                    c.text.push_str(&t);
                }
                GenEvent::Done { finish_reason, completion_tokens } => {
                    c.finish_reason = Some(finish_reason);
                    c.completion_tokens = completion_tokens;
                    return Ok(c);
                }
                GenEvent::Failed(e) => return Err(e),
            }
        }
        Err("the model version stopped mid-request".into())
    }

    /// The whole answer: the `n` completions as choices, with `echo` and `logprobs` as asked.
    async fn whole(
        self,
        receivers: Vec<UnboundedReceiver<GenEvent>>,
        engine: &crate::engine::Engine,
        echo: Option<Echo>,
        logprobs: bool,
    ) -> Response {
        let mut seen = false;
        let mut collected = Vec::with_capacity(receivers.len());
        for rx in receivers {
            match self.collect(rx, &mut seen).await {
                Ok(c) => collected.push(c),
                Err(e) => {
                    self.done(false, 0);
                    return server_error(StatusCode::INTERNAL_SERVER_ERROR, "generation_failed", e).into_response();
                }
            }
        }
        let completion_tokens: usize = collected.iter().map(|c| c.completion_tokens).sum();
        self.done(true, completion_tokens);
        let usage = Usage { prompt_tokens: self.prompt_tokens, completion_tokens, total_tokens: self.prompt_tokens + completion_tokens };
        if self.chat {
            let c = collected.into_iter().next().unwrap_or_default();
            let body = self.body(c.text, c.finish_reason, Some(usage));
            return (self.version_header(), Json(body)).into_response();
        }
        let tokenizer = engine.tokenizer();
        let echoed = echo.as_ref().map(|e| {
            if e.text.is_empty() {
                let ids: Vec<u32> = e.prompt.iter().map(|&t| t as u32).collect();
                tokenizer.decode(&ids).unwrap_or_default()
            } else {
                e.text.clone()
            }
        });
        let prompt_scores = collected.first().and_then(|c| c.prompt_scores.clone());
        let choices: Vec<Choice> = collected
            .into_iter()
            .enumerate()
            .map(|(index, c)| Choice {
                text: format!("{}{}", echoed.as_deref().unwrap_or(""), c.text),
                index: index as u32,
                logprobs: logprobs.then(|| logprobs_of(tokenizer, echo.as_ref(), prompt_scores.as_deref(), &c.token_scores)),
                finish_reason: c.finish_reason,
            })
            .collect();
        let mut body = self.body(String::new(), None, Some(usage));
        body["choices"] = serde_json::to_value(&choices).unwrap_or_default();
        (self.version_header(), Json(body)).into_response()
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
                        // Not asked for in a stream (no logprobs or echo there).
                        Some(GenEvent::Prompt(_) | GenEvent::Token(_)) => return Some((Vec::new(), (rx, seen, false))),
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

/// `POST /tokenize` and `/detokenize` (as vLLM has them): the serving version's tokenizer, so
/// that a client counts or builds token ids exactly as the model sees them.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeRequest {
    model: Option<String>,
    prompt: String,
    /// vLLM's flag; troupe's tokenizer adds no special tokens either way.
    #[serde(default)]
    add_special_tokens: bool,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
}

fn tokenizer_request<T: serde::de::DeserializeOwned>(
    s: &AppState,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(T, Arc<crate::engine::Engine>), ApiError> {
    s.authorize(headers)?;
    if body.len() > 1 << 20 {
        return Err(ApiError::invalid("body", "request_too_large", "the request body is over 1 MiB"));
    }
    let req: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ApiError::invalid("body", "invalid_json", format!("the body is not valid JSON: {e}")))?;
    let model = req.get("model").and_then(|m| m.as_str()).map(str::to_string);
    let req: T = serde_json::from_value(req).map_err(|e| ApiError::invalid("body", "invalid_type", format!("{e}")))?;
    let pinned = s.pinned(model.as_deref())?;
    let (engine, _) = s.deployment.route(pinned).ok_or_else(|| {
        server_error(StatusCode::SERVICE_UNAVAILABLE, "model_not_ready", "no model version is being served yet (see /readyz)".into())
    })?;
    Ok((req, engine))
}

async fn tokenize(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let (req, engine) = match tokenizer_request::<TokenizeRequest>(&s, &headers, &body) {
        Ok(r) => r,
        Err(e) => return s.refuse(e),
    };
    let _ = (req.model, req.add_special_tokens);
    match engine.tokenizer().encode(&req.prompt) {
        Ok(ids) => Json(serde_json::json!({"tokens": ids, "count": ids.len(), "max_model_len": engine.block_size})).into_response(),
        Err(e) => s.refuse(ApiError::invalid("prompt", "invalid_value", format!("the prompt cannot be tokenized: {e}"))),
    }
}

async fn detokenize(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let (req, engine) = match tokenizer_request::<DetokenizeRequest>(&s, &headers, &body) {
        Ok(r) => r,
        Err(e) => return s.refuse(e),
    };
    let _ = req.model;
    let vocab = engine.tokenizer().vocab_size();
    if let Some(bad) = req.tokens.iter().find(|&&t| t as usize >= vocab) {
        return s.refuse(ApiError::invalid(
            "tokens",
            "invalid_value",
            format!("token {bad} is outside this model's vocabulary of {vocab}"),
        ));
    }
    match engine.tokenizer().decode(&req.tokens) {
        Ok(text) => Json(serde_json::json!({"prompt": text})).into_response(),
        Err(e) => s.refuse(ApiError::invalid("tokens", "invalid_value", format!("the tokens cannot be decoded: {e}"))),
    }
}

/// `GET /tokenizer_info`: the serving version's end-of-text token (the only special token:
/// there is no beginning-of-text or padding token) and its context length.
async fn tokenizer_info(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = s.authorize(&headers) {
        return s.refuse(e);
    }
    let Some((engine, _)) = s.deployment.route(None) else {
        return s.refuse(server_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "model_not_ready",
            "no model version is being served yet (see /readyz)".into(),
        ));
    };
    Json(serde_json::json!({
        "eos_token": troupe_common::data::EOT_TOKEN,
        "bos_token": null,
        "pad_token": null,
        "model_max_length": engine.block_size,
    }))
    .into_response()
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
