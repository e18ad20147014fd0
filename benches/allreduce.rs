// temporary debug harness
use std::time::Duration;
use troupe_common::collective::*;
use troupe_common::net::*;

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    tracing_subscriber::fmt().with_env_filter("quinn_proto=trace,quinn=trace,troupe_common=trace").init();
    let eps: Vec<_> = (0..2).map(|_| make_endpoint("127.0.0.1:0".parse().unwrap(), &NetOptions::default()).unwrap()).collect();
    let addrs: Vec<_> = eps.iter().map(|e| e.local_addr().unwrap()).collect();
    eprintln!("addrs {addrs:?}");
    let toks = ["right", "wrong"];
    let mut hs = vec![];
    for r in 0..2u32 {
        let ep = eps[r as usize].clone();
        let succ = addrs[((r + 1) % 2) as usize];
        let tok = toks[r as usize].to_string();
        hs.push(tokio::spawn(async move { form_ring(&ep, r, 2, 1, succ, &tok, Duration::from_secs(2)).await }));
    }
    for h in hs { eprintln!("RESULT {:?}", h.await.unwrap().err().map(|e| e.to_string())); }
}
