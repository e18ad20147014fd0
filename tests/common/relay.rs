//! A delaying UDP relay for the multi-host tests: this kernel has no `netem`, so added latency
//! comes from here. Every datagram a client sends to the relay's address goes to `target`
//! after `delay`, and every reply comes back to the client after `delay` too; each client has
//! its own upstream socket, so QUIC sees one stable path per connection. The sockets can be
//! made inside a network namespace (`setns` on the creating thread only), after which the
//! relay threads serve from there.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct UdpRelay {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Datagrams waiting out their delay, in arrival order (the delay is constant, so the queue
/// is also in deadline order).
type Delayed = mpsc::Sender<(Instant, Vec<u8>, Arc<UdpSocket>, SocketAddr)>;

/// Runs `f` on a thread that has entered network namespace `netns` (a name under
/// /var/run/netns), or in this one when `None`.
pub fn in_netns<T: Send + 'static>(netns: Option<&str>, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = netns.map(|n| format!("/var/run/netns/{n}"));
    std::thread::spawn(move || {
        if let Some(path) = path {
            use std::os::fd::AsRawFd;
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns on a valid namespace fd; it only changes this thread's namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
        }
        f()
    })
    .join()
    .expect("the namespace thread panicked")
}

impl UdpRelay {
    /// Listens on `listen` (inside `netns`, if given) and relays to `target` with `delay` each way.
    pub fn start(netns: Option<&str>, listen: SocketAddr, target: SocketAddr, delay: Duration) -> UdpRelay {
        let stop = Arc::new(AtomicBool::new(false));
        // Sockets are made in the namespace; upstream sockets for new clients too, so a
        // factory bound there hands them out.
        let (front, factory) = in_netns(netns, move || {
            let front = UdpSocket::bind(listen).expect("bind the relay");
            let (req_tx, req_rx) = mpsc::channel::<mpsc::Sender<UdpSocket>>();
            let unspecified: SocketAddr = if target.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
            // Stays in the namespace: binds an upstream socket whenever asked.
            std::thread::spawn(move || {
                for reply in req_rx {
                    let _ = reply.send(UdpSocket::bind(unspecified).expect("bind an upstream socket"));
                }
            });
            (front, req_tx)
        });
        let addr = front.local_addr().unwrap();
        let front = Arc::new(front);
        front.set_read_timeout(Some(Duration::from_millis(100))).unwrap();

        let (delayed_tx, delayed_rx) = mpsc::channel::<(Instant, Vec<u8>, Arc<UdpSocket>, SocketAddr)>();
        {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while let Ok((due, bytes, socket, to)) = delayed_rx.recv() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    let _ = socket.send_to(&bytes, to);
                }
            });
        }

        let upstreams: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Arc::default();
        {
            let stop = stop.clone();
            let front = front.clone();
            let delayed: Delayed = delayed_tx.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::SeqCst) {
                    let Ok((n, client)) = front.recv_from(&mut buf) else { continue };
                    let upstream = {
                        let mut map = upstreams.lock().unwrap();
                        match map.get(&client) {
                            Some(u) => u.clone(),
                            None => {
                                let (tx, rx) = mpsc::channel();
                                factory.send(tx).expect("the socket factory is running");
                                let socket = Arc::new(rx.recv().expect("an upstream socket"));
                                socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
                                map.insert(client, socket.clone());
                                spawn_return_path(socket.clone(), front.clone(), client, delayed.clone(), delay, stop.clone());
                                socket
                            }
                        }
                    };
                    let _ = delayed.send((Instant::now() + delay, buf[..n].to_vec(), upstream, target));
                }
            });
        }
        UdpRelay { addr, stop }
    }
}

/// Replies from the target to one client, through the relay's own address.
fn spawn_return_path(
    upstream: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    delayed: Delayed,
    delay: Duration,
    stop: Arc<AtomicBool>,
) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while !stop.load(Ordering::SeqCst) {
            let Ok((n, _)) = upstream.recv_from(&mut buf) else { continue };
            if delayed.send((Instant::now() + delay, buf[..n].to_vec(), front.clone(), client)).is_err() {
                return;
            }
        }
    });
}
