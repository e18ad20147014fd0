//! A real multi-host cluster on one machine: two network namespaces joined by a veth pair.
//! Host A runs the coordinator and one worker, host B another worker; the workers bind all
//! interfaces, advertise the address that reaches the coordinator, and form the ring across
//! the veth link. Needs root (`ip netns`); skipped with a message otherwise.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;
use troupe_common::events::RunEvent;

/// Two namespaces with a veth pair, removed on drop.
struct Hosts {
    a: String,
    b: String,
    ip_a: String,
    ip_b: String,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip").args(args).status().map(|s| s.success()).unwrap_or(false)
}

impl Hosts {
    fn create() -> Option<Hosts> {
        let tag = std::process::id() % 10_000;
        let subnet = std::process::id() % 200 + 20;
        let h = Hosts {
            a: format!("troupe-a{tag}"),
            b: format!("troupe-b{tag}"),
            ip_a: format!("10.232.{subnet}.1"),
            ip_b: format!("10.232.{subnet}.2"),
        };
        if !ip(&["netns", "add", &h.a]) {
            return None;
        }
        let (va, vb) = (format!("tva{tag}"), format!("tvb{tag}"));
        let ok = ip(&["netns", "add", &h.b])
            && ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])
            && ip(&["link", "set", &va, "netns", &h.a])
            && ip(&["link", "set", &vb, "netns", &h.b])
            && ip(&["-n", &h.a, "addr", "add", &format!("{}/24", h.ip_a), "dev", &va])
            && ip(&["-n", &h.b, "addr", "add", &format!("{}/24", h.ip_b), "dev", &vb])
            && ip(&["-n", &h.a, "link", "set", &va, "up"])
            && ip(&["-n", &h.b, "link", "set", &vb, "up"])
            && ip(&["-n", &h.a, "link", "set", "lo", "up"])
            && ip(&["-n", &h.b, "link", "set", "lo", "up"]);
        assert!(ok, "could create a namespace but not the veth link");
        Some(h)
    }

    fn troupe_in(&self, ns: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_troupe")]).args(args);
        cmd.env("TROUPE_LOG", "warn,troupe=info,troupe_worker=info,troupe_coordinator=info");
        cmd
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Deleting a namespace removes its end of the veth pair, and with it the other end.
        ip(&["netns", "del", &self.a]);
        ip(&["netns", "del", &self.b]);
    }
}

#[test]
fn workers_on_two_hosts_train_together() {
    let Some(hosts) = Hosts::create() else {
        eprintln!("SKIPPED: cannot create network namespaces here (needs root and iproute2)");
        return;
    };
    let dir = scratch("multihost");
    let data = prepare_small_corpus(&dir);
    let config = tiny_config(&dir, &data, 2, 6);
    let listen = format!("{}:7070", hosts.ip_a);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replacen("listen = \"127.0.0.1:0\"", &format!("listen = \"{listen}\""), 1)
        .replace("token = \"\"", "token = \"two-hosts\"");
    std::fs::write(&config, text).unwrap();

    // The coordinator and both workers run together; each must end successfully.
    let mut processes = vec![hosts.troupe_in(&hosts.a, &["coordinator", "--config", config.to_str().unwrap()])];
    for ns in [&hosts.a, &hosts.b] {
        let mut w = hosts.troupe_in(ns, &["worker", "--join", &listen, "--threads", "1"]);
        w.env("TROUPE_TOKEN", "two-hosts");
        processes.push(w);
    }
    for out in run_all(processes, Duration::from_secs(240)) {
        assert_success(&out);
    }

    let events = events(&dir.join("runs/tiny"));
    let addrs: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            RunEvent::WorkerJoined { addr, .. } => Some(addr.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(addrs.len(), 2);
    assert!(addrs.iter().any(|a| a.starts_with(&format!("{}:", hosts.ip_b))), "host B's worker advertised its own address: {addrs:?}");
    assert_eq!(step_losses(&dir.join("runs/tiny")).len(), 6);
}
