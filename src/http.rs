//! The CLI's HTTP client (ureq, blocking): `troupe status`, `troupe deploy --server`, and the
//! completion `troupe local` asks its endpoint for.

use anyhow::Context;
use std::time::Duration;

/// A blocking HTTP call that returns the status and body whatever the status.
pub(crate) fn call(
    method: &str,
    url: &str,
    body: Option<&serde_json::Value>,
    api_key: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<(u16, String)> {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(timeout)).build().into();
    let mut response = match (method, body) {
        ("GET", _) => {
            let mut req = agent.get(url);
            if let Some(key) = api_key {
                req = req.header("Authorization", format!("Bearer {key}"));
            }
            req.call()
        }
        (_, body) => {
            let mut req = agent.post(url).header("Content-Type", "application/json");
            if let Some(key) = api_key {
                req = req.header("Authorization", format!("Bearer {key}"));
            }
            req.send(body.map(|b| b.to_string()).unwrap_or_default())
        }
    }
    .with_context(|| format!("cannot reach {url}"))?;
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().with_context(|| format!("reading the answer of {url}"))?;
    Ok((status, text))
}

/// The message of an OpenAI-style error body, or the body itself.
pub(crate) fn error_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.trim().to_string())
}
