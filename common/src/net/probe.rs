//! Is there still a process behind a UDP port? A fast answer to "did the peer crash?".
//!
//! A process that dies (a crash, the OOM killer, `kill -9`) sends nothing, so its peers can
//! only tell from silence, after a lease. But its host is usually alive, and a host's kernel
//! answers a datagram for a port nobody holds with ICMP "port unreachable". On a connected
//! UDP socket Linux reports that answer as `ConnectionRefused` on the next send or receive.
//! So [`until_port_closed`] sends a one-byte datagram to the peer's QUIC port every `period`
//! (QUIC drops it as a malformed packet) and returns once the port is closed. Where ICMP is
//! filtered, or the host or the link is down, it simply never returns: the lease still covers
//! those failures.

use std::net::SocketAddr;
use std::time::Duration;

/// How often to probe: a datagram of one byte ten times a second costs nothing, and a
/// coordinator restarted on the same port leaves its port closed only briefly.
pub const PROBE_PERIOD: Duration = Duration::from_millis(100);

/// Returns when `addr` answers "port unreachable"; never returns otherwise.
pub async fn until_port_closed(addr: SocketAddr, period: Duration) -> std::io::Error {
    let bind: SocketAddr = if addr.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    let socket = match tokio::net::UdpSocket::bind(bind).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%addr, error = %e, "cannot probe the peer's port; relying on the lease");
            return std::future::pending().await;
        }
    };
    if let Err(e) = socket.connect(addr).await {
        tracing::debug!(%addr, error = %e, "cannot probe the peer's port; relying on the lease");
        return std::future::pending().await;
    }
    let refused = |e: &std::io::Error| e.kind() == std::io::ErrorKind::ConnectionRefused;
    let mut tick = tokio::time::interval(period.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = [0u8; 16];
    loop {
        tokio::select! {
            _ = tick.tick() => {
                // One byte, not zero: an empty datagram is legal UDP but not worth surprising
                // the peer's QUIC stack with.
                if let Err(e) = socket.send(&[0]).await {
                    if refused(&e) {
                        return e;
                    }
                }
            }
            received = socket.recv(&mut buf) => {
                if let Err(e) = received {
                    if refused(&e) {
                        return e;
                    }
                    // Some other transient error: wait for the next probe instead of spinning.
                    tick.tick().await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_closed_port_is_noticed_and_an_open_one_is_not() {
        let open = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let open_addr = open.local_addr().unwrap();
        let closed_addr = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap()
        }; // dropped: nobody holds the port now
        let started = std::time::Instant::now();
        let e = tokio::time::timeout(Duration::from_secs(5), until_port_closed(closed_addr, Duration::from_millis(50)))
            .await
            .expect("a closed port is noticed");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
        assert!(started.elapsed() < Duration::from_secs(1));
        let still_open = tokio::time::timeout(Duration::from_millis(400), until_port_closed(open_addr, Duration::from_millis(50))).await;
        assert!(still_open.is_err(), "a live port is not reported");
        drop(open);
    }
}
