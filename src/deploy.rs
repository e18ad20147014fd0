//! `troupe serve` and `troupe deploy`: a serving replica for a registry, and the registry's
//! controls (status, promote, rollback, publish), on the folder or through a running server.

use crate::http;
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use troupe_common::registry::{parse_version, version_name, Registry, Rollout};

/// The API (or admin) key a client or server uses: the flag/env value, else the config's.
pub(crate) fn api_key(explicit: Option<String>, configured: &troupe_core::secret::Secret) -> Option<String> {
    explicit.filter(|k| !k.is_empty()).or_else(|| configured.non_empty().map(|k| k.expose().to_string()))
}

/// A server reachable from other hosts must ask for a key, unless told `--insecure`.
pub(crate) fn check_listen_is_guarded(listen: std::net::SocketAddr, api_key: Option<&str>, insecure: bool) -> anyhow::Result<()> {
    if listen.ip().is_loopback() || api_key.is_some() || insecure {
        return Ok(());
    }
    bail!(
        "refusing to serve on {listen} without an API key: anyone who reaches it could use the model. \
         Set serve.api_key (or TROUPE_API_KEY / --api-key), listen on 127.0.0.1, or pass --insecure"
    )
}

pub(crate) struct ServeArgs {
    pub registry: PathBuf,
    pub listen: std::net::SocketAddr,
    pub model_name: Option<String>,
    pub api_key: Option<String>,
    pub admin_key: Option<String>,
    pub serve: troupe_core::config::ServeConfig,
}

/// The model name clients use: the run that produced the registry's versions.
pub(crate) fn default_model_name(registry: &Path) -> String {
    Registry::open(registry)
        .ok()
        .and_then(|r| r.summaries().ok())
        .and_then(|s| s.into_iter().rev().find_map(|v| v.source.map(|s| s.run)))
        .unwrap_or_else(|| "troupe".into())
}

pub(crate) async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    Registry::open(&args.registry)?;
    let threads = if args.serve.threads > 0 { args.serve.threads } else { std::thread::available_parallelism().map_or(1, |n| n.get()) };
    tch::set_num_threads(threads as i32);
    let model_name = args.model_name.unwrap_or_else(|| default_model_name(&args.registry));
    let server = troupe_serve::start(troupe_serve::ServeOptions {
        registry: args.registry.clone(),
        listen: args.listen,
        model_name: model_name.clone(),
        api_key: args.api_key.clone(),
        admin_key: args.admin_key.clone(),
        max_batch: args.serve.max_batch,
        max_tokens: args.serve.max_tokens,
        max_queue: args.serve.max_queue,
    })
    .await?;
    let live = server.deployment.live();
    let serving = live.stable.as_ref().map_or("nothing yet (waiting for a version)".into(), |e| version_name(e.version));
    troupe_common::say!("serving model `{model_name}` from {} on {} — {serving}", args.registry.display(), server.url());
    troupe_common::say!(
        "try: curl {}/v1/completions -H 'Content-Type: application/json'{} -d '{{\"model\": \"{model_name}\", \"prompt\": \"ROMEO.\", \"max_tokens\": 40}}'",
        server.url(),
        if args.api_key.is_some() { " -H \"Authorization: Bearer $TROUPE_API_KEY\"" } else { "" }
    );
    let signal = troupe_common::signals::shutdown_signal().await;
    troupe_common::say!("{signal}: stopping the server");
    Ok(ExitCode::SUCCESS)
}

/// Where `troupe deploy` acts: a registry folder, or a running server's admin API.
pub(crate) enum Target {
    Registry(PathBuf),
    Server { url: String, api_key: Option<String> },
}

pub(crate) enum DeployAction {
    Status { json: bool },
    Promote { to: Option<String> },
    Rollback { to: Option<String> },
    Publish { checkpoint: PathBuf, canary: Option<f64>, canary_requests: u64 },
}

fn version_arg(to: Option<&str>) -> anyhow::Result<Option<u32>> {
    match to {
        None => Ok(None),
        Some(t) => parse_version(t).map(Some).with_context(|| format!("--to {t}: not a version (use v3 or 3)")),
    }
}

pub(crate) fn deploy(target: Target, action: DeployAction) -> anyhow::Result<ExitCode> {
    match target {
        Target::Registry(dir) => deploy_on_registry(&dir, action),
        Target::Server { url, api_key } => deploy_on_server(&url, api_key.as_deref(), action),
    }
}

fn deploy_on_registry(dir: &Path, action: DeployAction) -> anyhow::Result<ExitCode> {
    let registry = if matches!(action, DeployAction::Publish { .. }) { Registry::create(dir)? } else { Registry::open(dir)? };
    match action {
        DeployAction::Status { json } => {
            let report = troupe_serve::server::deploy_report(&registry)?;
            print_status(&report, json)?;
        }
        DeployAction::Promote { to } => {
            let state = registry.promote(version_arg(to.as_deref())?, "cli", "troupe deploy promote")?;
            troupe_common::say!("stable: {}", state.stable.map_or("-".into(), version_name));
        }
        DeployAction::Rollback { to } => {
            let state = registry.rollback(version_arg(to.as_deref())?, "cli", "troupe deploy rollback")?;
            troupe_common::say!("stable: {}", state.stable.map_or("-".into(), version_name));
        }
        DeployAction::Publish { checkpoint, canary, canary_requests } => {
            let eval =
                std::fs::read(checkpoint.join(troupe_common::registry::EVAL_FILE)).ok().and_then(|b| serde_json::from_slice(&b).ok());
            let run = std::fs::canonicalize(&checkpoint)
                .ok()
                .and_then(|p| p.parent()?.parent()?.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "troupe".into());
            let rollout = match canary {
                Some(fraction) => {
                    if !(fraction > 0.0 && fraction < 1.0) {
                        bail!("--canary {fraction}: the share of requests must be in (0, 1)");
                    }
                    if !(1..=10_000_000).contains(&canary_requests) {
                        bail!("--canary-requests {canary_requests}: the canary must answer 1..=10000000 requests before it is judged");
                    }
                    let d = troupe_core::config::DeployConfig::default();
                    Rollout::Canary {
                        fraction,
                        requests: canary_requests,
                        max_error_rate_increase: d.canary_max_error_rate_increase,
                        max_p95_ratio: d.canary_max_p95_ratio,
                    }
                }
                None => Rollout::Direct,
            };
            let v = registry.publish(&checkpoint, eval.as_ref(), &run, &rollout, "cli", || {})?;
            let state = registry.state()?;
            let how = if state.canary.as_ref().is_some_and(|c| c.version == v) { "as a canary" } else { "as the stable version" };
            troupe_common::say!("published {} from {} {how}", version_name(v), checkpoint.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn deploy_on_server(url: &str, api_key: Option<&str>, action: DeployAction) -> anyhow::Result<ExitCode> {
    let base = url.trim_end_matches('/');
    let timeout = Duration::from_secs(120);
    let (status, body) = match &action {
        DeployAction::Status { .. } => http::call("GET", &format!("{base}/admin/deploy"), None, api_key, timeout)?,
        DeployAction::Promote { to } | DeployAction::Rollback { to } => {
            version_arg(to.as_deref())?;
            let verb = if matches!(action, DeployAction::Promote { .. }) { "promote" } else { "rollback" };
            let body = serde_json::json!({ "to": to, "reason": format!("troupe deploy {verb} --server") });
            http::call("POST", &format!("{base}/admin/deploy/{verb}"), Some(&body), api_key, timeout)?
        }
        DeployAction::Publish { .. } => bail!("publish works on a registry folder (--registry DIR): the server reads the registry"),
    };
    if status != 200 {
        bail!("{base} answered {status}: {}", http::error_message(&body));
    }
    let value: serde_json::Value = serde_json::from_str(&body).with_context(|| format!("{base} did not answer with JSON"))?;
    match action {
        DeployAction::Status { json } => print_status(&value, json)?,
        _ => troupe_common::say!("stable: {}", value["stable"].as_u64().map_or("-".into(), |v| version_name(v as u32))),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_status(report: &serde_json::Value, json: bool) -> anyhow::Result<()> {
    if json {
        troupe_common::say!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    let state = &report["state"];
    let name = |v: &serde_json::Value| v.as_u64().map_or("-".to_string(), |v| version_name(v as u32));
    troupe_common::say!("registry {}", report["registry"].as_str().unwrap_or("?"));
    troupe_common::say!(
        "stable {} | canary {} | rollback stack {}",
        name(&state["stable"]),
        name(&state["canary"]["version"]),
        state["previous"]
            .as_array()
            .map(|p| p.iter().map(name).collect::<Vec<_>>().join(", "))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "-".into())
    );
    if let Some(live) = report.get("live") {
        troupe_common::say!(
            "this server serves: stable {} canary {}",
            live["stable"].as_str().unwrap_or("-"),
            live["canary"].as_str().unwrap_or("-")
        );
    }
    troupe_common::say!("{:>8} {:>8} {:>10}  source", "version", "step", "val loss");
    for v in report["versions"].as_array().into_iter().flatten() {
        troupe_common::say!(
            "{:>8} {:>8} {:>10}  {}",
            name(&v["version"]),
            v["source"]["step"].as_u64().map_or("-".into(), |s| s.to_string()),
            v["val_loss"].as_f64().map_or("-".into(), |l| format!("{l:.4}")),
            v["source"]["checkpoint"].as_str().unwrap_or("-")
        );
    }
    troupe_common::say!("history:");
    for t in report["history"].as_array().into_iter().flatten() {
        let when = std::time::UNIX_EPOCH + Duration::from_millis(t["time_unix_ms"].as_u64().unwrap_or(0));
        troupe_common::say!(
            "  {} {:<9} {:<4} by {:<8} {}",
            humantime::format_rfc3339_seconds(when),
            t["action"].as_str().unwrap_or("?"),
            name(&t["version"]),
            t["by"].as_str().unwrap_or("?"),
            t["reason"].as_str().unwrap_or("")
        );
    }
    Ok(())
}
