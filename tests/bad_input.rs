//! Bad input gets a clear error and the coordinator keeps serving everyone else: wrong join
//! tokens, other protocol versions, garbage and oversized frames, bad configs, missing corpora.

mod common;

use common::*;
use std::net::SocketAddr;
use std::time::Duration;
use troupe_common::net::{self, NetOptions};
use troupe_core::proto::{Capabilities, Hello, RefusalKind, ToCoordinator, ToWorker, PROTOCOL_VERSION};

const TOKEN: &str = "s3cret-token-of-this-test";

fn hello(version: u32, proof: [u8; 32]) -> ToCoordinator {
    ToCoordinator::Hello(Hello {
        protocol_version: version,
        join_proof: proof,
        capabilities: Capabilities {
            hostname: "intruder".into(),
            pid: 1,
            threads: 1,
            device: "cpu".into(),
            nccl: false,
            peer_addr: "127.0.0.1:9".parse().unwrap(),
            metrics_addr: None,
            role: Default::default(),
        },
    })
}

async fn connect(addr: SocketAddr) -> (quinn::Endpoint, quinn::Connection) {
    let endpoint = net::make_endpoint("127.0.0.1:0".parse().unwrap(), &NetOptions::default()).unwrap();
    let conn = endpoint.connect(addr, net::TLS_SERVER_NAME).unwrap().await.unwrap();
    (endpoint, conn)
}

/// Says Hello with the given version and token; returns the coordinator's answer.
async fn say_hello(addr: SocketAddr, version: u32, token: &str) -> ToWorker {
    let (_endpoint, conn) = connect(addr).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let proof = net::join_proof(&conn, token).unwrap();
    net::write_frame(&mut send, &hello(version, proof)).await.unwrap();
    net::read_frame::<ToWorker>(&mut recv, net::MAX_CONTROL_FRAME).await.unwrap().expect("an answer")
}

/// Sends raw bytes as the first thing on the control stream; returns how the connection ended.
async fn send_raw(addr: SocketAddr, bytes: Vec<u8>) -> String {
    let (_endpoint, conn) = connect(addr).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&bytes).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(20), conn.closed()).await.expect("the coordinator closes it");
    net::describe_connection_error(&closed)
}

#[test]
fn hostile_peers_are_refused_and_the_run_goes_on() {
    let dir = scratch("hostile");
    let data = prepare_small_corpus(&dir);
    let config = tiny_config(&dir, &data, 2, 4);
    let text = std::fs::read_to_string(&config).unwrap().replace("token = \"\"", &format!("token = \"{TOKEN}\""));
    std::fs::write(&config, text).unwrap();

    let coordinator = CoordinatorProcess::start(&config, &[]);
    let addr = coordinator.addr;

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        match say_hello(addr, PROTOCOL_VERSION, "not-the-token").await {
            ToWorker::Refused { kind: RefusalKind::BadToken, reason } => assert!(reason.contains("wrong join token"), "{reason}"),
            other => panic!("a wrong token must be refused, got {other:?}"),
        }
        match say_hello(addr, PROTOCOL_VERSION + 98, TOKEN).await {
            ToWorker::Refused { kind: RefusalKind::VersionMismatch, reason } => {
                assert!(reason.contains(&format!("version {}", PROTOCOL_VERSION + 98)), "{reason}")
            }
            other => panic!("another protocol version must be refused, got {other:?}"),
        }
        // Garbage: a frame whose body is not a Hello.
        let mut garbage = 64u32.to_le_bytes().to_vec();
        garbage.extend((0..64u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 | 0x80));
        let why = send_raw(addr, garbage).await;
        assert!(why.contains("PROTOCOL_ERROR") || why.contains("reset by peer"), "{why}");
        // An oversized frame: refused from its length alone, nothing allocated.
        // (Under load the close frame can lose the race with a stateless reset; the
        // coordinator's log below says why it closed either way.)
        let why = send_raw(addr, u32::MAX.to_le_bytes().to_vec()).await;
        assert!(why.contains("FRAME_TOO_LARGE") || why.contains("reset by peer"), "{why}");
        // Garbage after a successful join, on the open connection: that worker is dropped,
        // and its slot is free again for a real worker.
        let (_endpoint, conn) = connect(addr).await;
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let proof = net::join_proof(&conn, TOKEN).unwrap();
        net::write_frame(&mut send, &hello(PROTOCOL_VERSION, proof)).await.unwrap();
        // The coordinator proves the token in turn, then welcomes.
        match net::read_frame::<ToWorker>(&mut recv, net::MAX_CONTROL_FRAME).await.unwrap() {
            Some(ToWorker::Authenticated { proof }) => assert!(net::verify_peer_join_proof(&conn, TOKEN, &proof).unwrap()),
            other => panic!("expected the coordinator's proof, got {other:?}"),
        }
        let welcome = net::read_frame::<ToWorker>(&mut recv, net::MAX_CONTROL_FRAME).await.unwrap();
        assert!(matches!(welcome, Some(ToWorker::Welcome { .. })), "{welcome:?}");
        send.write_all(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3]).await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(20), conn.closed()).await.expect("closed");
        let why = net::describe_connection_error(&closed);
        assert!(why.contains("PROTOCOL_ERROR") || why.contains("reset by peer"), "{why}");

        // An authenticated peer that floods well-formed messages is cut off.
        let (_endpoint, conn) = connect(addr).await;
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let proof = net::join_proof(&conn, TOKEN).unwrap();
        net::write_frame(&mut send, &hello(PROTOCOL_VERSION, proof)).await.unwrap();
        for _ in 0..2 {
            net::read_frame::<ToWorker>(&mut recv, net::MAX_CONTROL_FRAME).await.unwrap().expect("proof, then welcome");
        }
        let heartbeats: Vec<u8> = (0..100_000).flat_map(|_| net::encode_frame(&ToCoordinator::Heartbeat).unwrap()).collect();
        let _ = send.write_all(&heartbeats).await;
        let closed = tokio::time::timeout(Duration::from_secs(20), conn.closed()).await.expect("a flood is closed");
        let why = net::describe_connection_error(&closed);
        assert!(why.contains("PROTOCOL_ERROR") || why.contains("reset by peer"), "{why}");
    });

    // A worker process with the wrong token is told why and exits with an error.
    let mut wrong = troupe();
    wrong.args(["worker", "--join", &addr.to_string(), "--token", "nope", "--threads", "1"]);
    let refused = run(wrong, Duration::from_secs(60));
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("wrong join token"), "{}", stderr(&refused));

    // The coordinator still serves real workers: the run completes.
    let workers = (0..2)
        .map(|_| {
            let mut w = worker_command(&addr.to_string());
            w.env("TROUPE_TOKEN", TOKEN);
            w
        })
        .collect();
    for out in run_all(workers, Duration::from_secs(240)) {
        assert_success(&out);
    }
    let (status, log) = coordinator.wait();
    assert!(status.success(), "coordinator: {status}\n{log}");
    assert!(log.contains("refused worker at 127.0.0.1:") && log.contains("wrong join token"), "{log}");
    assert!(log.contains("protocol version mismatch"), "{log}");
    assert!(log.contains("frame of 4294967295 bytes exceeds the limit"), "{log}");
    assert!(log.contains("the first frame is not a Hello"), "{log}");
    assert!(log.contains("bad frame from worker"), "{log}");
    assert!(log.contains("messages a second (bursts of 20000): no honest worker does"), "{log}");
    let steps = step_losses(&dir.join("runs/tiny"));
    assert_eq!(steps.len(), 4);
}

#[test]
fn a_config_with_an_unknown_field_is_rejected_with_its_name() {
    let dir = scratch("badconfig");
    let config = tiny_config(&dir, &dir, 1, 4);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("[train]", "[train]\nlearning_rat = 0.1")).unwrap();
    let mut cmd = troupe();
    cmd.arg("local").arg("--config").arg(&config);
    let out = run(cmd, Duration::from_secs(60));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("unknown field `learning_rat`") && err.contains(&config.display().to_string()), "{err}");
}

#[test]
fn an_out_of_range_value_is_rejected_with_its_name_and_the_fix() {
    let dir = scratch("rangeconfig");
    let config = tiny_config(&dir, &dir, 1, 4);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("micro_batch = 2", "micro_batch = 64")).unwrap();
    let mut cmd = troupe();
    cmd.arg("local").arg("--config").arg(&config);
    let out = run(cmd, Duration::from_secs(60));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("train.micro_batch") && err.contains("between 1 and train.global_batch"), "{err}");
    // A flag out of range is caught the same way.
    let mut cmd = troupe();
    cmd.args(["local", "--workers", "0"]);
    let err = stderr(&run(cmd, Duration::from_secs(60)));
    assert!(err.contains("cluster.workers"), "{err}");
}

#[test]
fn a_corpus_path_that_does_not_exist_is_named() {
    let dir = scratch("nocorpus");
    let mut cmd = troupe();
    cmd.args(["prepare", "--input", "/does/not/exist/plays", "--out"]).arg(dir.join("out"));
    let out = run(cmd, Duration::from_secs(60));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("/does/not/exist/plays"), "{}", stderr(&out));
    assert!(!dir.join("out").exists(), "nothing half-prepared is left behind");
}

#[test]
fn every_command_has_help_with_examples() {
    for sub in ["local", "coordinator", "worker", "prepare", "generate", "status", "gpu-check"] {
        let mut cmd = troupe();
        cmd.args([sub, "--help"]);
        let out = run(cmd, Duration::from_secs(30));
        assert_success(&out);
        assert!(stdout(&out).contains("Examples:"), "{sub} --help has examples");
    }
}

#[test]
fn generate_from_a_folder_that_is_not_a_checkpoint_says_so() {
    let dir = scratch("nogen");
    let mut cmd = troupe();
    cmd.args(["generate", "--prompt", "ROMEO.", "--checkpoint"]).arg(&dir);
    let out = run(cmd, Duration::from_secs(60));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("model.json") && err.contains("is") && err.contains("a troupe checkpoint"), "{err}");
}

/// Asking for a GPU where libtorch sees none (these machines) is a clear error, never a quiet
/// run on the CPU; a malformed device is named.
#[test]
fn cuda_asked_where_there_is_none_is_refused_with_what_to_check() {
    for (args, expected) in [
        (vec!["worker", "--join", "127.0.0.1:9", "--device", "cuda:0"], "--device cuda:0: no CUDA device is visible to libtorch"),
        (vec!["worker", "--join", "127.0.0.1:9", "--device", "gpu"], "expected auto, cpu or cuda:N"),
        (vec!["local", "--gpus", "all"], "--gpus all: no CUDA device is visible to libtorch"),
        (vec!["local", "--gpus", "0"], "expected all or a number of GPUs of at least 1"),
    ] {
        let mut cmd = troupe();
        cmd.args(&args);
        let out = run(cmd, Duration::from_secs(60));
        assert!(!out.status.success(), "{args:?}");
        let err = stderr(&out);
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    // The GPU check says the same and writes what it found.
    let dir = scratch("gpucheck");
    let figures = dir.join("figures.json");
    let mut cmd = troupe();
    cmd.args(["gpu-check", "--out"]).arg(&figures);
    let out = run(cmd, Duration::from_secs(60));
    assert!(!out.status.success());
    assert!(stdout(&out).contains("FAIL cuda device: libtorch sees no CUDA device"), "{}", stdout(&out));
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(&figures).unwrap()).unwrap();
    assert_eq!(written["cuda_devices"], 0);
}

/// `troupe prepare` on bad input says what is wrong and where, and leaves nothing behind.
#[test]
fn prepare_names_the_bad_file_and_line_and_leaves_nothing_half_written() {
    let dir = scratch("prepare-bad-input");
    let attempt = |args: &[&str], out: &str| {
        let mut cmd = troupe();
        cmd.current_dir(&dir).arg("prepare").args(["--out", out, "--vocab-size", "300"]).args(args);
        let output = run(cmd, Duration::from_secs(60));
        assert!(!output.status.success(), "{args:?} must fail");
        assert!(!dir.join(out).exists(), "{args:?} left {out} behind");
        let left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(left.is_empty(), "{args:?} left {left:?}");
        stderr(&output)
    };
    std::fs::write(dir.join("table.csv"), "a,b\n").unwrap();
    let err = attempt(&["--input", "table.csv"], "out1");
    assert!(err.contains("table.csv") && err.contains(".jsonl.zst"), "{err}");

    std::fs::write(dir.join("docs.jsonl"), "{\"text\": \"fine\"}\n{\"text\": 3}\nnot json at all\n").unwrap();
    let err = attempt(&["--input", "docs.jsonl", "--max-bad-records", "1"], "out2");
    assert!(err.contains("docs.jsonl:2: field \"text\" is not a string") && err.contains("docs.jsonl:3: not JSON"), "{err}");

    std::fs::write(dir.join("other.jsonl"), "{\"body\": \"a\"}\n").unwrap();
    let err = attempt(&["--input", "other.jsonl"], "out3");
    assert!(err.contains("no document is left"), "{err}");

    let err = attempt(&["--input", "missing-folder"], "out4");
    assert!(err.contains("missing-folder") && err.contains("does not exist"), "{err}");
}

/// A config file that names only what it changes is a whole configuration; `--set` overrides
/// any field; `troupe config show` says where each value came from; unknown keys are named.
#[test]
fn a_config_file_names_only_what_it_changes_and_set_overrides_any_field() {
    let dir = scratch("config-layers");
    let partial = dir.join("partial.toml");
    std::fs::write(&partial, "[train]\nlearning_rate = 1e-3\n").unwrap();
    let mut show = troupe();
    show.args(["config", "show", "--config"]).arg(&partial).args(["--set", "train.steps=70", "--set", "parallel.strategy=zero2"]);
    let out = run(show, Duration::from_secs(30));
    assert_success(&out);
    let text = stdout(&out);
    assert!(text.contains(&format!("learning_rate = 0.001  # {}", partial.display())), "{text}");
    assert!(text.contains("steps = 70  # --set") && text.contains("strategy = \"zero2\"  # --set"), "{text}");
    assert!(text.contains("[model]") && text.contains("n_layer = "), "the whole configuration: {text}");

    let mut typo = troupe();
    typo.args(["config", "show", "--set", "train.lerning_rate=1"]);
    let out = run(typo, Duration::from_secs(30));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("lerning_rate"), "{}", stderr(&out));
}
