//! Ring all-reduce over QUIC on loopback, each rank its own process, against two references
//! measured in the same run:
//!
//! - a TCP bound: each rank sends 2(W-1)/W x bytes to its successor while receiving as much
//!   from its predecessor (the data volume a ring all-reduce moves per rank), plain TCP
//!   loopback, separate processes, no reduction, no encryption;
//! - PyTorch's gloo all_reduce (`benches/gloo_allreduce.py`), when python can import torch.
//!
//! Bandwidth follows nccl-tests: algbw = bytes / time, busbw = algbw x 2(W-1)/W. Time per size
//! is the median over repetitions (after a warm-up) of the slowest rank.
//!
//!   cargo bench --bench allreduce                 # sizes 1..256 MiB, W = 2 and 3
//!   TROUPE_BENCH_QUICK=1 cargo bench --bench allreduce   # small sizes only
//!
//! Env: TROUPE_BENCH_THREADS (tokio workers per QUIC rank, default 2), TROUPE_BENCH_WORLDS
//! (default "2,3"), TROUPE_BENCH_SIZES (MiB list), TROUPE_BENCH_ONLY (quic|tcp|gloo),
//! TROUPE_BENCH_PIECE_KIB, TROUPE_BENCH_CC (cubic|reno|bbr), TROUPE_BENCH_GLOO=0 to skip gloo,
//! TROUPE_TORCH_PY (torch site dir for gloo).
//! Output: a markdown table on stdout, `target/bench/allreduce.{md,csv}`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use troupe_common::collective::{form_ring, CollectiveOp, CollectiveTag};
use troupe_common::net::{make_endpoint, CongestionControl, NetOptions};

const MIB: usize = 1 << 20;
const ROLE_FLAG: &str = "--troupe-role";

fn main() -> Result<()> {
    // As the troupe binary does (the ranks are this program, started again).
    troupe_common::alloc::tune();
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == ROLE_FLAG) {
        let role = args.get(i + 1).ok_or_else(|| anyhow!("missing role"))?.clone();
        let opts = ChildOpts::parse(&args[i + 2..])?;
        return match role.as_str() {
            "quic" => quic_rank(&opts),
            "tcp" => tcp_rank(&opts),
            other => bail!("unknown role {other}"),
        };
    }
    // `cargo bench` passes --bench (and maybe a filter); nothing else to parse.
    orchestrate()
}

// ---------------------------------------------------------------------------------------------
// Child processes

struct ChildOpts {
    rank: u32,
    world: u32,
    sizes: Vec<usize>,
    reps: Vec<usize>,
    threads: usize,
}

impl ChildOpts {
    fn parse(a: &[String]) -> Result<Self> {
        let get = |k: &str| -> Result<&str> {
            let i = a.iter().position(|x| x == k).ok_or_else(|| anyhow!("missing {k}"))?;
            a.get(i + 1).map(|s| s.as_str()).ok_or_else(|| anyhow!("missing value of {k}"))
        };
        let list = |s: &str| -> Result<Vec<usize>> { s.split(',').map(|x| x.parse::<usize>().map_err(|e| anyhow!("{x}: {e}"))).collect() };
        Ok(ChildOpts {
            rank: get("--rank")?.parse()?,
            world: get("--world")?.parse()?,
            sizes: list(get("--sizes")?)?,
            reps: list(get("--reps")?)?,
            threads: get("--threads")?.parse()?,
        })
    }
}

/// Announce our address on stdout, then read every rank's address from stdin.
fn exchange_addrs(me: SocketAddr, world: u32) -> Result<Vec<SocketAddr>> {
    println!("ADDR {me}");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let addrs: Vec<SocketAddr> = line
        .strip_prefix("PEERS ")
        .ok_or_else(|| anyhow!("expected PEERS line, got {line:?}"))?
        .split_whitespace()
        .map(|s| s.parse().context("peer address"))
        .collect::<Result<_>>()?;
    if addrs.len() != world as usize {
        bail!("got {} peer addresses for world {world}", addrs.len());
    }
    Ok(addrs)
}

fn fill(data: &mut [f32], rank: u32, rep: usize) {
    // Small integers: sums are exact, so the result can be checked.
    for (i, x) in data.iter_mut().enumerate() {
        *x = ((i + rep) % 16) as f32 + rank as f32;
    }
}

fn expected(i: usize, rep: usize, world: u32) -> f32 {
    (0..world).map(|r| ((i + rep) % 16) as f32 + r as f32).sum()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn quic_rank(o: &ChildOpts) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(o.threads).enable_all().build()?;
    rt.block_on(async {
        // TROUPE_BENCH_CC=reno|bbr compares congestion controllers (default: NetOptions').
        let congestion = match std::env::var("TROUPE_BENCH_CC").as_deref() {
            Ok("reno") => CongestionControl::NewReno,
            Ok("bbr") => CongestionControl::Bbr,
            Ok("cubic") => CongestionControl::Cubic,
            _ => NetOptions::default().congestion,
        };
        let ep = make_endpoint("127.0.0.1:0".parse()?, &NetOptions { congestion, ..NetOptions::default() })?;
        let addrs = exchange_addrs(ep.local_addr()?, o.world)?;
        let succ = addrs[((o.rank + 1) % o.world) as usize];
        let mut ring = form_ring(&ep, o.rank, o.world, 1, succ, "bench-token", Duration::from_secs(30)).await?;
        ring.set_call_timeout(Duration::from_secs(300));
        if let Some(kib) = std::env::var("TROUPE_BENCH_PIECE_KIB").ok().and_then(|v| v.parse::<usize>().ok()) {
            ring.set_piece_bytes(kib << 10);
        }
        let mut seq = 0u64;
        let mut tag = |step: u64| {
            seq += 1;
            CollectiveTag { step, seq }
        };
        let mut token = [0f32; 1];
        for (k, (&bytes, &reps)) in o.sizes.iter().zip(&o.reps).enumerate() {
            let mut data = vec![0f32; bytes / 4];
            let mut times = Vec::new();
            for rep in 0..=reps {
                fill(&mut data, o.rank, rep);
                // A one-element all-reduce lines the ranks up so each timing starts together.
                ring.run(CollectiveOp::AllReduce, &mut token, tag(k as u64)).await?;
                let t0 = Instant::now();
                ring.run(CollectiveOp::AllReduce, &mut data, tag(k as u64)).await?;
                let dt = t0.elapsed().as_secs_f64();
                for i in [0, data.len() / 3, data.len().saturating_sub(1)] {
                    if data.get(i).is_some_and(|&x| x != expected(i, rep, o.world)) {
                        bail!("rank {}: wrong sum at {i} for {bytes} bytes", o.rank);
                    }
                }
                if rep > 0 {
                    times.push(dt); // rep 0 is the warm-up
                }
            }
            println!("RESULT {bytes} {}", median(times));
            std::io::stdout().flush()?;
        }
        if let Some((to_succ, _)) = ring.link_stats() {
            let p = &to_succ.path;
            eprintln!(
                "quic rank {}: to successor: {} packets, {} lost, {} congestion events, {} black holes, mtu {}, rtt {:?}",
                o.rank, p.sent_packets, p.lost_packets, p.congestion_events, p.black_holes_detected, p.current_mtu, p.rtt
            );
        }
        ring.shutdown(Duration::from_secs(5)).await;
        Ok(())
    })
}

fn tcp_rank(o: &ChildOpts) -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addrs = exchange_addrs(listener.local_addr()?, o.world)?;
    let succ_addr = addrs[((o.rank + 1) % o.world) as usize];
    let deadline = Instant::now() + Duration::from_secs(30);
    let connector = std::thread::spawn(move || -> Result<TcpStream> {
        loop {
            match TcpStream::connect(succ_addr) {
                Ok(s) => return Ok(s),
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        }
    });
    let (mut pred, _) = listener.accept()?;
    let mut succ = connector.join().map_err(|_| anyhow!("connect thread panicked"))??;
    pred.set_nodelay(true)?;
    succ.set_nodelay(true)?;
    let w = o.world as usize;
    let buf = vec![7u8; MIB];
    for (&bytes, &reps) in o.sizes.iter().zip(&o.reps) {
        // The per-rank volume of a ring all-reduce: 2(W-1) chunks of bytes/W.
        let volume = bytes * 2 * (w - 1) / w;
        let mut times = Vec::new();
        for rep in 0..=reps {
            // One byte around the ring as a barrier.
            succ.write_all(&[1])?;
            pred.read_exact(&mut [0u8; 1])?;
            let t0 = Instant::now();
            std::thread::scope(|s| -> Result<()> {
                let writer = s.spawn(|| -> std::io::Result<()> {
                    let mut left = volume;
                    while left > 0 {
                        let n = left.min(buf.len());
                        succ.write_all(&buf[..n])?;
                        left -= n;
                    }
                    Ok(())
                });
                let mut rbuf = vec![0u8; MIB];
                let mut left = volume;
                while left > 0 {
                    let n = pred.read(&mut rbuf[..left.min(MIB)])?;
                    if n == 0 {
                        bail!("predecessor closed");
                    }
                    left -= n;
                }
                writer.join().map_err(|_| anyhow!("writer panicked"))??;
                Ok(())
            })?;
            if rep > 0 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        println!("RESULT {bytes} {}", median(times));
        std::io::stdout().flush()?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Orchestrator

/// Run `world` copies of this binary in `role`; per size, the slowest rank's median seconds.
fn run_ranks(role: &str, world: u32, sizes: &[usize], reps: &[usize], threads: usize) -> Result<BTreeMap<usize, f64>> {
    let exe = std::env::current_exe()?;
    let join = |v: &[usize]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",");
    let mut children = Vec::new();
    for rank in 0..world {
        let child = Command::new(&exe)
            .args([ROLE_FLAG, role, "--rank", &rank.to_string(), "--world", &world.to_string()])
            .args(["--sizes", &join(sizes), "--reps", &join(reps), "--threads", &threads.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawning {role} rank {rank}"))?;
        children.push(child);
    }
    let mut readers = Vec::new();
    let mut addrs = Vec::new();
    for c in &mut children {
        let out = c.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut r = BufReader::new(out);
        let mut line = String::new();
        r.read_line(&mut line)?;
        let addr = line.trim().strip_prefix("ADDR ").ok_or_else(|| anyhow!("{role} rank did not start: {line:?}"))?;
        addrs.push(addr.to_string());
        readers.push(r);
    }
    let peers = format!("PEERS {}\n", addrs.join(" "));
    for c in &mut children {
        let mut stdin = c.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
        stdin.write_all(peers.as_bytes())?;
    }
    let mut worst: BTreeMap<usize, f64> = BTreeMap::new();
    for (rank, r) in readers.into_iter().enumerate() {
        for line in r.lines() {
            let line = line?;
            if let Some(rest) = line.strip_prefix("RESULT ") {
                let mut it = rest.split_whitespace();
                let bytes: usize = it.next().ok_or_else(|| anyhow!("bad line {line}"))?.parse()?;
                let secs: f64 = it.next().ok_or_else(|| anyhow!("bad line {line}"))?.parse()?;
                let e = worst.entry(bytes).or_insert(0.0);
                *e = e.max(secs);
            } else {
                eprintln!("{role} rank {rank}: {line}");
            }
        }
    }
    for (rank, mut c) in children.into_iter().enumerate() {
        let st = c.wait()?;
        if !st.success() {
            bail!("{role} rank {rank} of {world} failed: {st}");
        }
    }
    Ok(worst)
}

/// gloo via the python script: `Ok(times)` or `Err(reason it was skipped)`.
fn run_gloo(world: u32, sizes: &[usize], reps: &[usize]) -> std::result::Result<BTreeMap<usize, f64>, String> {
    if std::env::var("TROUPE_BENCH_GLOO").is_ok_and(|v| v == "0") {
        return Err("disabled by TROUPE_BENCH_GLOO=0".into());
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/gloo_allreduce.py");
    let join = |v: &[usize]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",");
    let out = Command::new("python3")
        .args([script, "--world", &world.to_string(), "--sizes", &join(sizes), "--reps", &join(reps)])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run python3: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut times = BTreeMap::new();
    for line in text.lines() {
        if let Some(reason) = line.strip_prefix("SKIP ") {
            return Err(reason.to_string());
        }
        if let Some(rest) = line.strip_prefix("RESULT ") {
            let mut it = rest.split_whitespace();
            if let (Some(Ok(b)), Some(Ok(s))) = (it.next().map(str::parse::<usize>), it.next().map(str::parse::<f64>)) {
                times.insert(b, s);
            }
        }
    }
    if !out.status.success() || times.is_empty() {
        return Err(format!("gloo_allreduce.py failed ({}): {}", out.status, text.trim()));
    }
    Ok(times)
}

fn busbw(bytes: usize, secs: f64, world: u32) -> f64 {
    let algbw = bytes as f64 / secs / 1e9;
    algbw * 2.0 * (world as f64 - 1.0) / world as f64
}

fn orchestrate() -> Result<()> {
    let quick = std::env::var("TROUPE_BENCH_QUICK").is_ok_and(|v| v != "0" && !v.is_empty());
    let (sizes_mib, reps): (Vec<usize>, Vec<usize>) =
        if quick { (vec![1, 4], vec![5, 5]) } else { (vec![1, 4, 16, 64, 256], vec![9, 7, 5, 3, 3]) };
    // TROUPE_BENCH_SIZES="64,256" (MiB) overrides the sizes, e.g. for profiling one size.
    let (sizes_mib, reps) = match std::env::var("TROUPE_BENCH_SIZES") {
        Ok(v) => {
            let s: Vec<usize> = v.split(',').filter_map(|x| x.trim().parse().ok()).collect();
            let r = s.iter().map(|&m| if m >= 64 { 3 } else { 5 }).collect();
            (s, r)
        }
        Err(_) => (sizes_mib, reps),
    };
    let sizes: Vec<usize> = sizes_mib.iter().map(|m| m * MIB).collect();
    // TROUPE_BENCH_ONLY=quic|tcp|gloo runs one column (the others show n/a).
    let only = std::env::var("TROUPE_BENCH_ONLY").ok();
    let want = |what: &str| only.as_deref().is_none_or(|o| o == what);
    let threads: usize = std::env::var("TROUPE_BENCH_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let worlds: Vec<u32> = std::env::var("TROUPE_BENCH_WORLDS")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![2, 3]);
    let started = Instant::now();

    let mut rows = Vec::new();
    let mut gloo_notes = Vec::new();
    for &w in &worlds {
        eprintln!("allreduce bench: W={w}: QUIC ring ...");
        let quic = if want("quic") { run_ranks("quic", w, &sizes, &reps, threads)? } else { BTreeMap::new() };
        eprintln!("allreduce bench: W={w}: TCP bound ...");
        let tcp = if want("tcp") { run_ranks("tcp", w, &sizes, &reps, threads)? } else { BTreeMap::new() };
        eprintln!("allreduce bench: W={w}: gloo ...");
        let gloo = match if want("gloo") { run_gloo(w, &sizes, &reps) } else { Err("not selected".into()) } {
            Ok(t) => Some(t),
            Err(why) => {
                gloo_notes.push(format!("gloo W={w} skipped: {why}"));
                None
            }
        };
        for &b in &sizes {
            let q = quic.get(&b).copied();
            let t = tcp.get(&b).copied();
            let g = gloo.as_ref().and_then(|g| g.get(&b).copied());
            rows.push((w, b, q, t, g));
        }
    }

    let fmt_bw = |b: usize, s: Option<f64>, w: u32| s.map_or("n/a".to_string(), |s| format!("{:.2}", busbw(b, s, w)));
    let fmt_ms = |s: Option<f64>| s.map_or("n/a".to_string(), |s| format!("{:.1}", s * 1e3));
    let mut md = String::new();
    md.push_str(&format!(
        "Ring all-reduce, loopback, one process per rank, {threads} tokio threads per QUIC rank; busbw (GB/s) = bytes/time x 2(W-1)/W, median of the slowest rank.\n\n"
    ));
    md.push_str("| W | size (MiB) | QUIC ring ms | QUIC ring busbw | TCP bound busbw | gloo busbw | QUIC / TCP |\n");
    md.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
    let mut csv = String::from("world,bytes,quic_seconds,quic_busbw_gbps,tcp_seconds,tcp_busbw_gbps,gloo_seconds,gloo_busbw_gbps\n");
    for &(w, b, q, t, g) in &rows {
        let ratio = match (q, t) {
            (Some(q), Some(t)) => format!("{:.0}%", t / q * 100.0),
            _ => "n/a".into(),
        };
        md.push_str(&format!(
            "| {w} | {} | {} | {} | {} | {} | {ratio} |\n",
            b / MIB,
            fmt_ms(q),
            fmt_bw(b, q, w),
            fmt_bw(b, t, w),
            fmt_bw(b, g, w)
        ));
        let opt = |x: Option<f64>| x.map_or(String::new(), |v| format!("{v:.6}"));
        let optbw = |x: Option<f64>| x.map_or(String::new(), |v| format!("{:.4}", busbw(b, v, w)));
        csv.push_str(&format!("{w},{b},{},{},{},{},{},{}\n", opt(q), optbw(q), opt(t), optbw(t), opt(g), optbw(g)));
    }
    for n in &gloo_notes {
        md.push_str(&format!("\n{n}\n"));
    }
    md.push_str(&format!("\nTotal bench time {:.0} s.\n", started.elapsed().as_secs_f64()));
    print!("{md}");

    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target").to_string());
    let dir = std::path::Path::new(&target).join("bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("allreduce.md"), &md)?;
    std::fs::write(dir.join("allreduce.csv"), &csv)?;
    eprintln!("wrote {}", dir.join("allreduce.{md,csv}").display());
    Ok(())
}
