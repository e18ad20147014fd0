//! Prometheus service discovery for a run: the coordinator keeps
//! `<run.out_dir>/prometheus/<run.name>.json` listing every `/metrics` endpoint of the run —
//! its own, each worker's, each serving replica's (`deploy.notify`) — in Prometheus's
//! `file_sd_configs` format. Workers come and go with membership, and their metrics ports are
//! picked at start, so a static scrape config could not follow them; Prometheus re-reads this
//! file when it changes. `deploy/prometheus/prometheus.yml` reads it.

use serde::Serialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use troupe_core::config::Config;

/// One `file_sd_configs` group: targets (`host:port`) sharing labels (`run`, `component`).
#[derive(Debug, Serialize, PartialEq)]
pub struct TargetGroup {
    pub targets: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

/// A worker's endpoints as it announced them.
pub struct WorkerEndpoints {
    pub metrics: Option<SocketAddr>,
    /// Its ring address: reachable from the other hosts, so its IP stands in for a metrics
    /// address bound to all interfaces.
    pub peer: SocketAddr,
}

pub struct ScrapeTargets {
    path: PathBuf,
    run: String,
    coordinator: Option<String>,
    serving: Vec<String>,
    /// What the file holds now; it is written only when this changes.
    written: Option<Vec<TargetGroup>>,
    warned: bool,
}

impl ScrapeTargets {
    /// `coordinator_metrics` is where the coordinator's own `/metrics` was bound, if anywhere.
    pub fn new(config: &Config, coordinator_metrics: Option<SocketAddr>) -> Self {
        let cluster_ip = config.cluster.listen.parse::<SocketAddr>().ok().map(|a| a.ip());
        let coordinator = coordinator_metrics.map(|addr| match addr.ip() {
            ip if !ip.is_unspecified() => addr.to_string(),
            // Bound to all interfaces: the cluster address workers reach is the one to name,
            // or else this host's name.
            _ => match cluster_ip {
                Some(ip) if !ip.is_unspecified() => SocketAddr::new(ip, addr.port()).to_string(),
                _ => format!("{}:{}", host_name(), addr.port()),
            },
        });
        if let (Some(addr), Some(ip)) = (coordinator_metrics, cluster_ip) {
            if addr.ip().is_loopback() && !ip.is_loopback() {
                tracing::warn!(
                    "metrics.listen is {addr}, on loopback, while workers join from other hosts: \
                     only a Prometheus on this host can scrape the coordinator (set metrics.listen to 0.0.0.0:PORT)"
                );
            }
        }
        let serving = config
            .deploy
            .notify
            .iter()
            .filter_map(|url| url.strip_prefix("http://").map(|rest| rest.trim_end_matches('/').to_string()))
            .filter(|host_port| !host_port.is_empty() && !host_port.contains('/'))
            .collect();
        ScrapeTargets {
            path: config.run.out_dir.join("prometheus").join(format!("{}.json", config.run.name)),
            run: config.run.name.clone(),
            coordinator,
            serving,
            written: None,
            warned: false,
        }
    }

    /// The groups for the current members.
    pub fn groups(&self, workers: &[WorkerEndpoints]) -> Vec<TargetGroup> {
        let mut worker_targets: Vec<String> = workers
            .iter()
            .filter_map(|w| w.metrics.map(|m| if m.ip().is_unspecified() { SocketAddr::new(w.peer.ip(), m.port()) } else { m }))
            .map(|a| a.to_string())
            .collect();
        worker_targets.sort();
        let mut groups = Vec::new();
        // Labelled `component`, not `role`: a target label must not share a name with a
        // label of the metrics themselves (troupe_serve_version{role}), or Prometheus renames
        // the metric's to exported_role.
        for (component, targets) in [
            ("coordinator", self.coordinator.iter().cloned().collect::<Vec<_>>()),
            ("worker", worker_targets),
            ("serve", self.serving.clone()),
        ] {
            if targets.is_empty() {
                continue;
            }
            let labels = BTreeMap::from([("run".to_string(), self.run.clone()), ("component".to_string(), component.to_string())]);
            groups.push(TargetGroup { targets, labels });
        }
        groups
    }

    /// Rewrites the file (atomically) if the targets changed. Called on every coordinator
    /// event, so an unchanged set is only compared, neither serialised nor written. A failure
    /// is logged once and otherwise ignored: monitoring must not stop a run.
    pub fn update(&mut self, workers: &[WorkerEndpoints]) {
        let groups = self.groups(workers);
        if self.written.as_ref() == Some(&groups) {
            return;
        }
        match self.write(&groups) {
            Ok(()) => self.written = Some(groups),
            Err(e) if !self.warned => {
                self.warned = true;
                tracing::warn!("cannot write the Prometheus targets file {}: {e}", self.path.display());
            }
            Err(_) => {}
        }
    }

    fn write(&self, groups: &[TargetGroup]) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(groups).map_err(std::io::Error::other)?;
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.path)
    }

    /// At the end of the run: nothing is left for Prometheus to scrape.
    pub fn remove(&mut self) {
        if self.written.take().is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| IpAddr::from([127, 0, 0, 1]).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(out: &std::path::Path) -> Config {
        let mut config = Config::default_config();
        config.run.out_dir = out.to_path_buf();
        config.cluster.listen = "10.0.0.1:7070".into();
        config.deploy.notify = vec!["http://10.0.0.9:8000".into(), "http://10.0.0.10:8000/".into()];
        config
    }

    #[test]
    fn lists_every_endpoint_with_routable_addresses_and_rewrites_only_on_change() {
        let dir = std::env::temp_dir().join(format!("troupe-targets-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // The coordinator's metrics on all interfaces: named by the cluster address.
        let mut targets = ScrapeTargets::new(&config(&dir), Some("0.0.0.0:9400".parse().unwrap()));
        let workers = vec![
            WorkerEndpoints { metrics: Some("0.0.0.0:9401".parse().unwrap()), peer: "10.0.0.3:5000".parse().unwrap() },
            WorkerEndpoints { metrics: Some("10.0.0.2:9401".parse().unwrap()), peer: "10.0.0.2:5000".parse().unwrap() },
            WorkerEndpoints { metrics: None, peer: "10.0.0.4:5000".parse().unwrap() },
        ];
        targets.update(&workers);
        let path = dir.join("prometheus/shakespeare.json");
        let groups: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(
            groups,
            serde_json::json!([
                {"targets": ["10.0.0.1:9400"], "labels": {"component": "coordinator", "run": "shakespeare"}},
                {"targets": ["10.0.0.2:9401", "10.0.0.3:9401"], "labels": {"component": "worker", "run": "shakespeare"}},
                {"targets": ["10.0.0.9:8000", "10.0.0.10:8000"], "labels": {"component": "serve", "run": "shakespeare"}},
            ])
        );
        // Unchanged membership: the file is not rewritten.
        std::fs::write(&path, "sentinel").unwrap();
        targets.update(&workers);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "sentinel");
        targets.update(&workers[..1]);
        assert!(std::fs::read_to_string(&path).unwrap().contains("10.0.0.3:9401"));
        targets.remove();
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
