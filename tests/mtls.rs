//! Mutual TLS end to end: `troupe init-certs`, then a coordinator and two workers with
//! certificates from the cluster CA and no join token train to the end, while workers with
//! certificates from a foreign CA, or with none, are refused at the TLS handshake.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

fn init_certs(out: &std::path::Path, workers: usize) -> std::process::Output {
    let mut cmd = troupe();
    cmd.arg("init-certs").arg("--out").arg(out).args(["--workers", &workers.to_string(), "--hosts", "localhost,127.0.0.1"]);
    run(cmd, Duration::from_secs(60))
}

#[test]
fn mutual_tls_cluster_trains_without_a_token_and_refuses_strangers() {
    let dir = scratch("mtls");
    let certs = dir.join("certs");
    let out = init_certs(&certs, 2);
    assert_success(&out);
    assert!(stdout(&out).contains("worker-1-key.pem") && stdout(&out).contains("--tls-dir"), "{}", stdout(&out));
    for key in ["ca-key.pem", "coordinator-key.pem", "worker-0-key.pem", "worker-1-key.pem"] {
        let mode = std::fs::metadata(certs.join(key)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    // A second run does not silently replace the CA.
    let again = init_certs(&certs, 2);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("--force"), "{}", stderr(&again));
    let foreign = dir.join("foreign");
    assert_success(&init_certs(&foreign, 1));

    let data = prepare_small_corpus(&dir);
    let config = tiny_config(&dir, &data, 2, 4);
    assert!(std::fs::read_to_string(&config).unwrap().contains("token = \"\""));

    let coordinator = CoordinatorProcess::start(&config, &["--tls-dir", certs.to_str().unwrap()]);
    let addr = coordinator.addr;

    // A worker whose certificate comes from another CA: refused at the handshake, exits
    // non-zero at once (no retrying until --connect-timeout) and says why. It binds port 0
    // and reports the port; the coordinator's log must name this peer by that address.
    let mut stranger = troupe();
    stranger
        .args(["worker", "--join", &addr.to_string(), "--threads", "1", "--connect-timeout", "120"])
        .args(["--listen", "127.0.0.1:0"])
        .arg("--tls-dir")
        .arg(&foreign);
    let started = std::time::Instant::now();
    let refused = run(stranger, Duration::from_secs(60));
    assert!(!refused.status.success());
    let err = stderr(&refused);
    let stranger_port = bound_port(&err);
    assert!(err.contains("TLS handshake with the coordinator") && err.contains("invalid peer certificate: UnknownIssuer"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60), "a TLS refusal must not be retried");

    // A worker without any certificate: the coordinator requires one. (Its port reported as
    // above.)
    let mut anonymous = troupe();
    anonymous.args(["worker", "--join", &addr.to_string(), "--threads", "1", "--connect-timeout", "10"]).args(["--listen", "127.0.0.1:0"]);
    let refused = run(anonymous, Duration::from_secs(60));
    assert!(!refused.status.success());
    let anonymous_port = bound_port(&stderr(&refused));
    assert!(stderr(&refused).contains("TLS"), "{}", stderr(&refused));

    // The members, without a token: the run completes over mutual TLS (coordinator links
    // and the worker ring alike).
    let workers = (0..2)
        .map(|i| {
            let mut w = worker_command(&addr.to_string());
            w.args(["--tls-worker", &i.to_string()]).arg("--tls-dir").arg(&certs);
            w
        })
        .collect();
    for out in run_all(workers, Duration::from_secs(240)) {
        assert_success(&out);
    }
    let (status, log) = coordinator.wait();
    assert!(status.success(), "coordinator: {status}\n{log}");
    for port in [stranger_port, anonymous_port] {
        assert!(
            log.contains(&format!("TLS handshake with 127.0.0.1:{port} failed, peer not admitted")),
            "the coordinator names the refused peer 127.0.0.1:{port}:\n{log}"
        );
    }
    assert_eq!(step_losses(&dir.join("runs/tiny")).len(), 4);
}

/// The port a worker reported binding ("worker endpoint bound on ADDR").
fn bound_port(log: &str) -> u16 {
    let line =
        log.lines().find_map(|l| l.split("worker endpoint bound on ").nth(1)).unwrap_or_else(|| panic!("no bound address in:\n{log}"));
    line.trim().parse::<std::net::SocketAddr>().expect("a socket address").port()
}
