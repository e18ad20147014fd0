//! Serving an axum router to clients that may be slow, idle or hostile: every troupe HTTP
//! server (the serving endpoint, `/metrics` and `/status`) goes through [`spawn`].
//!
//! `axum::serve` runs hyper without a timer, so hyper's header read timeout is off, nothing
//! bounds a request, and connections are accepted without limit: a thousand clients that send
//! half a request line and go quiet hold a thousand sockets forever. Here each connection is
//! served by hyper's HTTP/1 server with a timer, so that
//!
//! - a client must deliver a request's headers within `header_read_timeout` of connecting (or
//!   of its previous response, on a kept-alive connection), or the connection is closed;
//! - a handler must produce its response within `request_timeout` (408 otherwise; a streamed
//!   body, once started, is not cut);
//! - at most `max_connections` are served at once; more wait in the listen backlog until one
//!   ends, so the process never runs out of file descriptors.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::IntoResponse;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Limits of one HTTP server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub request_timeout: Duration,
    pub max_connections: usize,
}

impl Limits {
    /// `/metrics` and `/status`: small, quick answers to scrapers and `troupe status`.
    pub const METRICS: Limits =
        Limits { header_read_timeout: Duration::from_secs(10), request_timeout: Duration::from_secs(30), max_connections: 1024 };

    /// The serving endpoint: a completion of many tokens may take minutes on a CPU.
    pub const SERVING: Limits =
        Limits { header_read_timeout: Duration::from_secs(10), request_timeout: Duration::from_secs(600), max_connections: 4096 };
}

/// Serves `app` on `listener` with `limits` until the process ends; `name` says which server
/// in the logs.
pub fn spawn(listener: TcpListener, app: Router, limits: Limits, name: &'static str) -> tokio::task::JoinHandle<()> {
    let request_timeout = limits.request_timeout;
    let app = app.layer(axum::middleware::from_fn(move |request: Request, next: Next| async move {
        match tokio::time::timeout(request_timeout, next.run(request)).await {
            Ok(response) => response,
            Err(_) => (StatusCode::REQUEST_TIMEOUT, format!("no response within {request_timeout:?}\n")).into_response(),
        }
    }));
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was accepted:
                    // a pause lets the cause pass instead of spinning on it.
                    tracing::warn!("{name} on {addr}: cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Handlers that care where a request comes from (the admin API) read it as ConnectInfo.
            let service = TowerToHyperService::new(app.clone().layer(axum::Extension(axum::extract::ConnectInfo(peer))));
            tokio::spawn(async move {
                let _slot = slot;
                let mut http = hyper::server::conn::http1::Builder::new();
                http.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
                if let Err(e) = http.serve_connection(TokioIo::new(stream), service).await {
                    tracing::debug!("{name}: connection from {peer} ended: {e}");
                }
            });
        }
    })
}

/// Binds `addr` (port 0 picks one) and serves `app` there with `limits`; the bound address.
pub async fn bind_and_spawn(addr: SocketAddr, app: Router, limits: Limits, name: &'static str) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    spawn(listener, app, limits, name);
    Ok(bound)
}

/// Raises this process's soft limit of open files to its hard limit (as Go's runtime does):
/// servers and the workers' QUIC endpoints hold a socket per peer, and the soft limit is often
/// 1024 while the hard one is far higher. Returns the limit now in force.
pub fn raise_open_files_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// A thousand clients that send half a request and go quiet: the server still answers
    /// others at once, and closes the quiet ones at the header timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_clients_are_closed_and_do_not_hold_up_others() {
        raise_open_files_limit();
        let app = Router::new().route("/healthz", axum::routing::get(|| async { "ok\n" }));
        let limits = Limits { header_read_timeout: Duration::from_secs(1), request_timeout: Duration::from_secs(5), max_connections: 1500 };
        let addr = bind_and_spawn("127.0.0.1:0".parse().unwrap(), app, limits, "test server").await.unwrap();
        let mut slow = Vec::new();
        for _ in 0..1000 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
            slow.push(s);
        }
        let t = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(2), get(addr, "/healthz")).await.expect("an answer within 2 s");
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok\n"), "{answer}");
        println!("/healthz answered in {:?} with 1000 slow clients connected", t.elapsed());
        // Every slow client is closed at the header timeout (408 or a bare close).
        let deadline = Instant::now() + Duration::from_secs(20);
        for s in &mut slow {
            let mut buf = Vec::new();
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::timeout(left, s.read_to_end(&mut buf)).await.expect("closed by the header timeout").ok();
        }
    }

    /// A handler slower than the request timeout is answered 408.
    #[tokio::test]
    async fn a_slow_handler_is_cut_at_the_request_timeout() {
        let app = Router::new().route(
            "/slow",
            axum::routing::get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        );
        let limits =
            Limits { header_read_timeout: Duration::from_secs(5), request_timeout: Duration::from_millis(200), max_connections: 4 };
        let addr = bind_and_spawn("127.0.0.1:0".parse().unwrap(), app, limits, "test server").await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), get(addr, "/slow")).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
}
