//! The OpenAI-compatible wire format of `POST /v1/completions`: request parsing and checks,
//! response and stream-chunk bodies, and OpenAI-style error bodies.
//!
//! Everything a client sends is checked here, before it reaches a model: a bad request is a
//! 4xx with `{"error": {"message", "type", "param", "code"}}`, never a panic or a 500.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use troupe_common::model::Sampling;

/// The request body. Fields OpenAI defines but troupe does not implement are accepted only
/// at their neutral values; anything else unknown is refused by name (a typo such as
/// `max_token` must not be silently ignored).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Option<Prompt>,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// An extension (not in OpenAI's API, common among open servers).
    pub top_k: Option<u64>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub stream: Option<bool>,
    pub n: Option<u64>,
    pub best_of: Option<u64>,
    pub echo: Option<bool>,
    pub logprobs: Option<serde_json::Value>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub logit_bias: Option<serde_json::Value>,
    pub suffix: Option<String>,
    pub user: Option<String>,
    pub stream_options: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Batch(Vec<String>),
    /// Token ids, as evaluation tools that tokenize themselves send them.
    Ids(Vec<u32>),
    IdBatch(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// OpenAI's default when `max_tokens` is not given.
pub const DEFAULT_MAX_TOKENS: u64 = 16;
/// Completions per request (`n`) at most.
pub const MAX_N: u64 = 16;
/// Alternatives per token (`logprobs`) at most (OpenAI allows 5; evaluation tools ask for 1).
pub const MAX_LOGPROBS: u64 = 20;
const MAX_STOP_SEQUENCES: usize = 4;

/// A request that passed every check, ready for tokenization and routing.
#[derive(Debug, Clone)]
pub struct Checked {
    pub model: Option<String>,
    pub prompt: String,
    /// The prompt as token ids, when it was sent so (then `prompt` is empty).
    pub prompt_ids: Option<Vec<u32>>,
    /// Completions to generate (`n`), each from its own random stream.
    pub n: usize,
    /// `echo`: the prompt comes back in front of each completion (and is scored, with logprobs).
    pub echo: bool,
    /// `logprobs`: the log-probability of each token, with this many alternatives.
    pub logprobs: Option<usize>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub stream: bool,
    /// `stream_options.include_usage`: end a stream with a usage chunk.
    pub include_usage: bool,
}

/// An OpenAI-style error, with the HTTP status it goes out with.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: &'static str,
    pub param: Option<&'static str>,
    pub message: String,
}

impl ApiError {
    pub fn invalid(param: &'static str, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::BAD_REQUEST, kind: "invalid_request_error", code, param: Some(param), message: message.into() }
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": { "message": self.message, "type": self.kind, "param": self.param, "code": self.code }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// The body of `POST /v1/chat/completions`: the conversation instead of a prompt, and the same
/// sampling fields as completions (checked by the same rules).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<troupe_common::data::chat::Message>,
    pub max_tokens: Option<u64>,
    /// The newer name of `max_tokens`.
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<u64>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub stream: Option<bool>,
    pub n: Option<u64>,
    pub logprobs: Option<bool>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub logit_bias: Option<serde_json::Value>,
    pub user: Option<String>,
    pub stream_options: Option<serde_json::Value>,
}

/// Parses and checks a chat request: the messages, and the sampling fields as for
/// completions (the prompt is rendered from the messages by the caller, with the model's
/// chat template).
pub fn parse_chat(body: &[u8], max_tokens_limit: usize) -> Result<(Vec<troupe_common::data::chat::Message>, Checked), ApiError> {
    let req: ChatRequest = deserialize(body, "chat completions")?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages", "invalid_value", "messages is empty: send at least one message"));
    }
    if req.logprobs == Some(true) {
        return Err(ApiError::invalid("logprobs", "unsupported_value", "logprobs = true is not supported by this server"));
    }
    let completion = CompletionRequest {
        model: req.model,
        prompt: None,
        // Chat clients rarely set a limit and expect a whole reply (OpenAI's chat API has no
        // small default): up to this server's serve.max_tokens, or <|endoftext|>.
        max_tokens: req.max_completion_tokens.or(req.max_tokens).or(Some(max_tokens_limit as u64)),
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        stop: req.stop,
        seed: req.seed,
        stream: req.stream,
        n: req.n,
        best_of: None,
        echo: None,
        logprobs: None,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        logit_bias: req.logit_bias,
        suffix: None,
        user: req.user,
        stream_options: req.stream_options,
    };
    Ok((req.messages, check(completion, max_tokens_limit)?))
}

/// Parses and checks a request body. `max_tokens_limit` is `serve.max_tokens`.
pub fn parse(body: &[u8], max_tokens_limit: usize) -> Result<Checked, ApiError> {
    let req: CompletionRequest = deserialize(body, "completions")?;
    check(req, max_tokens_limit)
}

fn deserialize<T: serde::de::DeserializeOwned>(body: &[u8], api: &str) -> Result<T, ApiError> {
    if body.len() > 1 << 20 {
        return Err(ApiError::invalid("body", "request_too_large", "the request body is over 1 MiB"));
    }
    let mut json = serde_json::Deserializer::from_slice(body);
    let req: T = serde_path_to_error::deserialize(&mut json).map_err(|e| {
        let path = e.path().to_string();
        let e = e.into_inner();
        if e.is_syntax() || e.is_eof() {
            return ApiError {
                status: StatusCode::BAD_REQUEST,
                kind: "invalid_request_error",
                code: "invalid_json",
                param: None,
                message: format!("the body is not valid JSON: {e}"),
            };
        }
        let at = if path == "." || path.is_empty() { String::new() } else { format!(" (field `{path}`)") };
        let message = format!("the request does not match the {api} API{at}: {e}");
        ApiError { status: StatusCode::BAD_REQUEST, kind: "invalid_request_error", code: "invalid_type", param: None, message }
    })?;
    if json.end().is_err() {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: "invalid_json",
            param: None,
            message: "the body holds more than one JSON value".into(),
        });
    }
    Ok(req)
}

fn check(req: CompletionRequest, max_tokens_limit: usize) -> Result<Checked, ApiError> {
    let several = |n: usize| {
        Err(ApiError::invalid(
            "prompt",
            "unsupported_value",
            format!("a list of {n} prompts: send one prompt per request (requests are batched by the server)"),
        ))
    };
    let (prompt, prompt_ids) = match req.prompt {
        None => (String::new(), None),
        Some(Prompt::Text(text)) => (text, None),
        Some(Prompt::Batch(mut texts)) if texts.len() == 1 => (texts.remove(0), None),
        Some(Prompt::Batch(texts)) => return several(texts.len()),
        Some(Prompt::Ids(ids)) => (String::new(), Some(ids)),
        Some(Prompt::IdBatch(mut ids)) if ids.len() == 1 => (String::new(), Some(ids.remove(0))),
        Some(Prompt::IdBatch(ids)) => return several(ids.len()),
    };
    let echo = req.echo.unwrap_or(false);
    let max_tokens = req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    // max_tokens 0 asks only for the prompt back, scored: what evaluation tools send.
    if (max_tokens == 0 && !echo) || max_tokens > max_tokens_limit as u64 {
        return Err(ApiError::invalid(
            "max_tokens",
            "invalid_value",
            format!("max_tokens = {max_tokens} must be between 1 and {max_tokens_limit} (this server's serve.max_tokens), or 0 with echo"),
        ));
    }
    let temperature = req.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid("temperature", "invalid_value", format!("temperature = {temperature} must be between 0 and 2")));
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid("top_p", "invalid_value", format!("top_p = {top_p} must be in (0, 1]")));
    }
    let top_k = req.top_k.unwrap_or(0);
    if top_k > 1 << 20 {
        return Err(ApiError::invalid("top_k", "invalid_value", format!("top_k = {top_k} is too large")));
    }
    let stop = match req.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOP_SEQUENCES || stop.iter().any(|s| s.is_empty() || s.len() > 256) {
        return Err(ApiError::invalid(
            "stop",
            "invalid_value",
            format!("stop takes at most {MAX_STOP_SEQUENCES} non-empty sequences of at most 256 bytes"),
        ));
    }
    let unsupported = |param: &'static str, what: &str| {
        Err(ApiError::invalid(param, "unsupported_value", format!("{param} {what} is not supported by this server")))
    };
    let n = req.n.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::invalid("n", "invalid_value", format!("n = {n} must be between 1 and {MAX_N}")));
    }
    if req.best_of.is_some_and(|b| b != n) {
        return unsupported("best_of", "other than n");
    }
    let logprobs = match &req.logprobs {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(k) if k <= MAX_LOGPROBS => Some(k as usize),
            _ => {
                return Err(ApiError::invalid(
                    "logprobs",
                    "invalid_value",
                    format!("logprobs = {v} must be a whole number from 0 to {MAX_LOGPROBS} (alternatives per token)"),
                ))
            }
        },
    };
    if req.stream == Some(true) && (n > 1 || logprobs.is_some() || echo) {
        return unsupported("stream", "with n > 1, logprobs or echo");
    }
    if req.presence_penalty.is_some_and(|p| p != 0.0) {
        return unsupported("presence_penalty", "other than 0");
    }
    if req.frequency_penalty.is_some_and(|p| p != 0.0) {
        return unsupported("frequency_penalty", "other than 0");
    }
    if req.logit_bias.as_ref().is_some_and(|v| !v.is_null() && v.as_object().is_none_or(|o| !o.is_empty())) {
        return unsupported("logit_bias", "");
    }
    if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return unsupported("suffix", "");
    }
    let include_usage = req.stream_options.as_ref().and_then(|o| o.get("include_usage")).and_then(|v| v.as_bool()).unwrap_or(false);
    let _ = req.user;
    Ok(Checked {
        model: req.model,
        prompt,
        prompt_ids,
        n: n as usize,
        echo,
        logprobs,
        max_tokens: max_tokens as usize,
        sampling: Sampling { temperature, top_k: (top_k > 0).then_some(top_k as usize), top_p },
        stop,
        seed: req.seed.map(|s| s as u64),
        stream: req.stream.unwrap_or(false),
        include_usage,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop sequence or the end-of-text token.
    Stop,
    /// `max_tokens` reached.
    Length,
}

#[derive(Debug, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Debug, Serialize)]
pub struct Choice {
    pub text: String,
    pub index: u32,
    pub logprobs: Option<LogProbs>,
    pub finish_reason: Option<FinishReason>,
}

/// A choice's `logprobs`, as OpenAI's completions API gives them: per token of the returned
/// text (the prompt's first, with `echo`), its text, its log-probability (none for the very
/// first token of a prompt, which nothing precedes), the likeliest alternatives, and where it
/// starts in the text (bytes).
#[derive(Debug, Default, Serialize)]
pub struct LogProbs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<std::collections::BTreeMap<String, f32>>>,
    pub text_offset: Vec<usize>,
}

/// A whole response, or (with `usage: None`) one chunk of a stream.
#[derive(Debug, Serialize)]
pub struct Completion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    /// The registry version that produced the text (also in `system_fingerprint` and the
    /// `x-troupe-version` header).
    pub version: String,
    pub system_fingerprint: String,
    pub choices: Vec<Choice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> ApiError {
        parse(body.as_bytes(), 512).unwrap_err()
    }

    #[test]
    fn a_plain_request_gets_openai_defaults() {
        let c = parse(br#"{"model":"m","prompt":"Hi"}"#, 512).unwrap();
        assert_eq!(c.prompt, "Hi");
        assert_eq!(c.max_tokens, 16);
        assert_eq!(c.sampling.temperature, 1.0);
        assert!(!c.stream);
        assert!(!c.include_usage);
        let c = parse(br#"{"prompt":["Hi"],"stop":"\n","stream":true,"top_k":5,"seed":3,"n":1,"logprobs":null,"stream_options":{"include_usage":true}}"#, 512).unwrap();
        assert!(c.include_usage);
        assert_eq!((c.stop, c.stream, c.sampling.top_k, c.seed), (vec!["\n".to_string()], true, Some(5), Some(3)));
        // What an evaluation tool sends to score a text: token ids, echo, no new tokens.
        let c = parse(br#"{"prompt":[[464, 3290, 318]],"echo":true,"max_tokens":0,"logprobs":1,"n":1}"#, 512).unwrap();
        assert_eq!((c.prompt_ids, c.echo, c.max_tokens, c.logprobs), (Some(vec![464, 3290, 318]), true, 0, Some(1)));
        let c = parse(br#"{"prompt":"Hi","n":3,"best_of":3}"#, 512).unwrap();
        assert_eq!(c.n, 3);
    }

    #[test]
    fn every_bad_request_is_a_400_naming_what_is_wrong() {
        for (body, code, needle) in [
            ("{", "invalid_json", "not valid JSON"),
            ("[1,2]", "invalid_type", "completions API"),
            (r#"{"prompt": 5}"#, "invalid_type", "completions API"),
            (r#"{"max_tokens": "ten"}"#, "invalid_type", "max_tokens"),
            (r#"{"max_tokens": -1}"#, "invalid_type", "max_tokens"),
            (r#"{"max_tokens": 100000}"#, "invalid_value", "serve.max_tokens"),
            (r#"{"max_tokens": 0}"#, "invalid_value", "or 0 with echo"),
            (r#"{"temperature": 3}"#, "invalid_value", "temperature"),
            (r#"{"top_p": 0}"#, "invalid_value", "top_p"),
            (r#"{"stop": ["a","b","c","d","e"]}"#, "invalid_value", "stop"),
            (r#"{"n": 0}"#, "invalid_value", "between 1"),
            (r#"{"n": 17}"#, "invalid_value", "between 1"),
            (r#"{"best_of": 3}"#, "unsupported_value", "best_of"),
            (r#"{"logprobs": 50}"#, "invalid_value", "logprobs"),
            (r#"{"logprobs": true}"#, "invalid_value", "logprobs"),
            (r#"{"stream": true, "n": 2}"#, "unsupported_value", "stream"),
            (r#"{"prompt": [[1], [2]]}"#, "unsupported_value", "2 prompts"),
            (r#"{"max_token": 5}"#, "invalid_type", "unknown field `max_token`"),
            (r#"{"prompt": ["a","b"]}"#, "unsupported_value", "2 prompts"),
        ] {
            let e = err(body);
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.code, code, "{body}: {}", e.message);
            assert!(e.message.contains(needle), "{body}: {}", e.message);
            let json = e.body();
            assert_eq!(json["error"]["type"], "invalid_request_error");
        }
    }
}
