//! A real multi-host cluster on one machine: two network namespaces joined by a veth pair.
//! Host A runs the coordinator and one worker, host B another worker; the workers bind all
//! interfaces, advertise the address that reaches the coordinator, and form the ring across
//! the veth link. Needs root and iproute2 (`ip netns`); skipped with a message otherwise, except
//! under CI=true, where that fails the test.
//!
//! The ports are fixed (7070 and 71xx/72xx): each namespace is new and private to its test, so
//! nothing else can hold them, and the relays must know their targets before those start.
//!
//! The second test degrades host B's link (100 Mbit/s with `tc` tbf, 20 ms each way through a
//! delaying UDP relay: this kernel has no netem), checks that training still converges, then
//! cuts the link (`ip link set down`): the coordinator drops B's worker when its lease runs
//! out and the run finishes on host A.

mod common;

use common::relay::UdpRelay;
use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use troupe_core::events::RunEvent;

/// Two namespaces with a veth pair, removed on drop.
struct Hosts {
    a: String,
    b: String,
    ip_a: String,
    ip_b: String,
    /// Host B's end of the link.
    veth_b: String,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip").args(args).status().map(|s| s.success()).unwrap_or(false)
}

impl Hosts {
    fn create() -> Option<Hosts> {
        // The tests of this file run at once in one process: each pair of namespaces (and
        // the veth pair, named in the root namespace until it is moved) needs its own names.
        static CREATED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let nth = CREATED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("{}{nth}", std::process::id() % 10_000);
        let subnet = (std::process::id() + nth) % 200 + 20;
        let h = Hosts {
            a: format!("troupe-a{tag}"),
            b: format!("troupe-b{tag}"),
            ip_a: format!("10.232.{subnet}.1"),
            ip_b: format!("10.232.{subnet}.2"),
            veth_b: format!("tvb{tag}"),
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
        skip_or_fail("cannot create network namespaces here (`ip netns add` needs root and iproute2)");
        return;
    };
    let dir = scratch("multihost");
    let data = prepare_small_corpus(&dir);
    let config = tiny_config(&dir, &data, 2, 6);
    let listen = format!("{}:7070", hosts.ip_a);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replacen("listen = \"127.0.0.1:0\"", &format!("listen = \"{listen}\""), 1)
        .replace("token = \"\"", "token = \"two-hosts-join-token\"");
    std::fs::write(&config, text).unwrap();

    // The coordinator and both workers run together; each must end successfully.
    let mut processes = vec![hosts.troupe_in(&hosts.a, &["coordinator", "--config", config.to_str().unwrap()])];
    for ns in [&hosts.a, &hosts.b] {
        let mut w = hosts.troupe_in(ns, &["worker", "--join", &listen, "--threads", "1"]);
        w.env("TROUPE_TOKEN", "two-hosts-join-token");
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

#[test]
fn a_degraded_link_still_converges_and_a_cut_link_is_handled_like_a_lost_worker() {
    let Some(hosts) = Hosts::create() else {
        skip_or_fail("cannot create network namespaces here (`ip netns add` needs root and iproute2)");
        return;
    };
    // 100 Mbit/s out of host B.
    let shaped = Command::new("ip")
        .args([
            "netns",
            "exec",
            &hosts.b,
            "tc",
            "qdisc",
            "add",
            "dev",
            &hosts.veth_b,
            "root",
            "tbf",
            "rate",
            "100mbit",
            "burst",
            "32kbit",
            "latency",
            "400ms",
        ])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !shaped {
        skip_or_fail("`tc qdisc add ... tbf` is not available here (needs the sch_tbf kernel module)");
        return;
    }
    let dir = scratch("multihost-degraded");
    let data = prepare_small_corpus(&dir);
    let steps = 60;
    let config = tiny_config(&dir, &data, 2, steps);
    let listen = format!("{}:7070", hosts.ip_a);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replacen("listen = \"127.0.0.1:0\"", &format!("listen = \"{listen}\""), 1)
        .replace("token = \"\"", "token = \"two-hosts-join-token\"")
        .replace("lease_ms = 5000", "lease_ms = 1500\nrejoin_ms = 2000");
    std::fs::write(&config, text).unwrap();

    // Host B's worker reaches the coordinator, and its ring predecessor reaches it, only
    // through relays on host A that add 20 ms each way.
    let delay = Duration::from_millis(20);
    let to_coordinator = UdpRelay::start(Some(&hosts.a), format!("{}:7202", hosts.ip_a).parse().unwrap(), listen.parse().unwrap(), delay);
    let to_worker_b = UdpRelay::start(
        Some(&hosts.a),
        format!("{}:7201", hosts.ip_a).parse().unwrap(),
        format!("{}:7101", hosts.ip_b).parse().unwrap(),
        delay,
    );

    let log = |name: &str| std::fs::File::create(dir.join(name)).unwrap();
    let spawn = |mut cmd: Command, name: &str| {
        KillOnDrop(cmd.stdout(log(&format!("{name}.out"))).stderr(log(&format!("{name}.err"))).spawn().unwrap())
    };
    let coordinator = spawn(hosts.troupe_in(&hosts.a, &["coordinator", "--config", config.to_str().unwrap()]), "coordinator");
    let mut worker_a = hosts.troupe_in(&hosts.a, &["worker", "--join", &listen, "--threads", "1"]);
    worker_a.env("TROUPE_TOKEN", "two-hosts-join-token");
    let mut worker_a = spawn(worker_a, "worker-a");
    let coordinator_via_relay = to_coordinator.addr.to_string();
    let advertised = to_worker_b.addr.to_string();
    let mut worker_b = hosts.troupe_in(
        &hosts.b,
        &["worker", "--join", &coordinator_via_relay, "--listen", "0.0.0.0:7101", "--advertise", &advertised, "--threads", "1"],
    );
    worker_b.env("TROUPE_TOKEN", "two-hosts-join-token").stdin(Stdio::null());
    let mut worker_b = spawn(worker_b, "worker-b");

    let run_dir = dir.join("runs/tiny");
    wait_for_steps(&run_dir, 20, Duration::from_secs(180));
    let losses = step_losses(&run_dir);
    assert!(
        events(&run_dir).iter().all(|e| !matches!(e, troupe_core::events::RunEvent::Regrouped { .. })),
        "no regroup over the slow link"
    );

    // Cut host B off.
    assert!(ip(&["-n", &hosts.b, "link", "set", &hosts.veth_b, "down"]));
    let cut_at = Instant::now();
    let mut coordinator = coordinator;
    let status = loop {
        if let Some(s) = coordinator.0.try_wait().unwrap() {
            break s;
        }
        assert!(cut_at.elapsed() < Duration::from_secs(120), "the run did not finish after the link was cut");
        std::thread::park_timeout(Duration::from_millis(50));
    };
    let coordinator_log = std::fs::read_to_string(dir.join("coordinator.out")).unwrap_or_default();
    assert!(status.success(), "{coordinator_log}");
    assert!(worker_a.0.wait().unwrap().success());
    let b_status = worker_b.0.wait().unwrap();
    let b_log = std::fs::read_to_string(dir.join("worker-b.err")).unwrap_or_default();
    assert!(!b_status.success() && b_log.contains("did not come back"), "host B's worker gives up on the coordinator: {b_log}");

    let events = events(&run_dir);
    use troupe_core::events::RunEvent;
    assert!(events.iter().any(|e| matches!(e, RunEvent::WorkerLeft { reason, .. } if reason.contains("lease"))), "{coordinator_log}");
    assert!(events.iter().any(|e| matches!(e, RunEvent::Regrouped { world_size: 1, .. })), "{coordinator_log}");
    let all: Vec<(u64, f64)> = step_losses(&run_dir);
    assert_eq!(all.iter().map(|(s, _)| *s).collect::<Vec<_>>(), (0..steps).collect::<Vec<_>>(), "every step once");
    // Converges: over the slow link (first 20 steps) and after.
    let first = losses[0].1;
    let slow_tail: f64 = losses[15..20].iter().map(|(_, l)| l).sum::<f64>() / 5.0;
    let end: f64 = all[all.len() - 5..].iter().map(|(_, l)| l).sum::<f64>() / 5.0;
    println!("loss {first:.3} at step 0, {slow_tail:.3} over steps 15-19 (degraded link), {end:.3} over the last 5 steps");
    assert!(slow_tail < first - 0.4 && end < slow_tail, "{first} {slow_tail} {end}");
    drop((to_coordinator, to_worker_b));
}
