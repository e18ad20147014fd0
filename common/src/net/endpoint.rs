//! QUIC endpoint construction: TLS setup and transport tuning.
//!
//! Tuning follows `shared/notes/quic-throughput.md` (measured on the 2-core CI machines):
//! large UDP payloads are the main lever for bulk throughput, and they conflict with GSO, so
//! GSO is off and MTU discovery is allowed to climb to 65507 on paths that carry it
//! (loopback); on real networks discovery settles at the path MTU.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{EndpointConfig, IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{CipherSuite, DigitallySignedStruct, SignatureScheme};

use super::NetError;

/// ALPN protocol id. Bumped together with incompatible changes of the connection-level
/// protocol; `PROTOCOL_VERSION` in `proto` covers message-level changes.
pub const ALPN: &[u8] = b"troupe/1";

/// Name put in the self-signed certificate and used as SNI when connecting. Peers are
/// addressed by IP, so this is a fixed label rather than a DNS name.
pub const TLS_SERVER_NAME: &str = "troupe";

/// Largest UDP payload over IPv4 (65535 - 20 IP - 8 UDP).
const MAX_UDP_PAYLOAD: u16 = 65507;
/// Safe initial MTU for IPv4 and IPv6 over 1500-byte Ethernet (1500 - 40 IPv6 - 8 UDP).
const BASE_MTU: u16 = 1452;

/// How this process proves who it is and checks who the peer is at the TLS layer.
///
/// `#[non_exhaustive]` because mutual TLS with a cluster CA comes next: a variant such as
/// `ClusterCa { ca: CertificateDer, cert_chain, key }` will build a `WebPkiServerVerifier`
/// (and a client-cert verifier for the server side) where [`UnverifiedServerCert`] is used
/// today. Callers outside this module only pick a variant.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub enum TlsSetup {
    /// A fresh self-signed certificate per process (rcgen); clients do not verify the
    /// server certificate. Authentication happens after the handshake with the join-token
    /// proof (`net::join_proof`), which is bound to this TLS session.
    #[default]
    SelfSignedUnverified,
}

/// Congestion controller of the endpoint's connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CongestionControl {
    /// quinn's default.
    #[default]
    Cubic,
    NewReno,
    /// Not loss-based: random loss (e.g. a receive buffer overflowing on a CPU-starved host)
    /// does not shrink the window. quinn marks it experimental.
    Bbr,
}

/// Options of a troupe QUIC endpoint. `Default` holds the measured tuning.
#[derive(Debug, Clone)]
pub struct NetOptions {
    pub tls: TlsSetup,
    /// Send keep-alives this often so idle control connections survive NAT/conntrack and
    /// the idle timeout; `None` disables them.
    pub keep_alive: Option<Duration>,
    /// Close a connection after this long without any packet from the peer.
    pub idle_timeout: Duration,
    /// Connection-level receive window (bytes in flight towards us over all streams).
    pub receive_window: u64,
    /// Per-stream receive window.
    pub stream_receive_window: u64,
    /// How much unacknowledged data we buffer for sending on one connection.
    pub send_window: u64,
    /// Requested SO_SNDBUF / SO_RCVBUF of the UDP socket (best effort: the kernel may cap it).
    pub socket_buffer_bytes: usize,
    pub congestion: CongestionControl,
}

impl Default for NetOptions {
    fn default() -> Self {
        const MIB: u64 = 1 << 20;
        NetOptions {
            tls: TlsSetup::default(),
            keep_alive: Some(Duration::from_secs(5)),
            idle_timeout: Duration::from_secs(30),
            // Beyond 8-16 MiB made no difference in the measurements.
            receive_window: 16 * MIB,
            stream_receive_window: 16 * MIB,
            send_window: 16 * MIB,
            // 4 MiB helped a little; 32 MiB was slower.
            socket_buffer_bytes: 4 << 20,
            congestion: CongestionControl::default(),
        }
    }
}

impl NetOptions {
    fn transport_config(&self) -> Result<TransportConfig, NetError> {
        let varint = |name: &str, v: u64| {
            VarInt::from_u64(v).map_err(|_| NetError::Config(format!("{name} = {v} is too large")))
        };
        let idle = IdleTimeout::try_from(self.idle_timeout).map_err(|_| {
            NetError::Config(format!("idle_timeout {:?} is too large", self.idle_timeout))
        })?;
        if let Some(k) = self.keep_alive {
            if k >= self.idle_timeout {
                return Err(NetError::Config(format!(
                    "keep_alive {k:?} must be shorter than idle_timeout {:?}",
                    self.idle_timeout
                )));
            }
        }
        let mut mtu = MtuDiscoveryConfig::default();
        mtu.upper_bound(MAX_UDP_PAYLOAD)
            // quinn takes a burst of lost large packets for an MTU black hole and falls back
            // to the base MTU. On a busy host, receive-buffer overflow looks exactly like that,
            // and with the default 60 s cooldown a ring then runs at 1452-byte packets (~1/3
            // of the throughput) for a minute. Re-probing soon costs a few probe packets on a
            // path that really has a black hole.
            .black_hole_cooldown(Duration::from_secs(2));

        let mut t = TransportConfig::default();
        match self.congestion {
            CongestionControl::Cubic => {}
            CongestionControl::NewReno => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()));
            }
            CongestionControl::Bbr => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
            }
        }
        t.max_idle_timeout(Some(idle))
            .keep_alive_interval(self.keep_alive)
            .receive_window(varint("receive_window", self.receive_window)?)
            .stream_receive_window(varint("stream_receive_window", self.stream_receive_window)?)
            .send_window(self.send_window)
            // Setting B of the notes: GSO batches up to 10 segments, and 10 x a large MTU
            // exceeds 64 KiB, which the kernel rejects (packets silently lost). Without GSO
            // each datagram can be as large as the path allows.
            .enable_segmentation_offload(false)
            // initial/min MTU >= 16384 hung connections in the measurements; start at a
            // size every Ethernet path carries and let discovery climb.
            .initial_mtu(BASE_MTU)
            .min_mtu(BASE_MTU)
            .mtu_discovery_config(Some(mtu));
        Ok(t)
    }
}

/// Build the endpoint of this process: it accepts connections (server config) and connects
/// out (default client config) on one UDP socket. Must be called inside a tokio runtime.
pub fn make_endpoint(bind: SocketAddr, opts: &NetOptions) -> Result<quinn::Endpoint, NetError> {
    let runtime = quinn::default_runtime().ok_or(NetError::NoRuntime)?;
    let transport = Arc::new(opts.transport_config()?);
    let (server_crypto, client_crypto) = match &opts.tls {
        TlsSetup::SelfSignedUnverified => self_signed_unverified()?,
    };

    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server_config.transport_config(transport.clone());
    let mut client_config = quinn::ClientConfig::new(Arc::new(client_crypto));
    client_config.transport_config(transport);

    // Without this the peer's default (1472) caps the path MTU whatever TransportConfig says;
    // both ends build their endpoint here, so both advertise it.
    let mut endpoint_config = EndpointConfig::default();
    endpoint_config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .map_err(|e| NetError::Config(format!("max_udp_payload_size: {e}")))?;

    let socket = std::net::UdpSocket::bind(bind).map_err(|source| NetError::Bind { addr: bind, source })?;
    set_socket_buffers(&socket, opts.socket_buffer_bytes);

    let mut endpoint = quinn::Endpoint::new(endpoint_config, Some(server_config), socket, runtime)
        .map_err(|source| NetError::Endpoint { addr: bind, source })?;
    endpoint.set_default_client_config(client_config);
    Ok(endpoint)
}

/// Best effort: a too-small buffer costs throughput, not correctness, so failures are logged.
fn set_socket_buffers(socket: &std::net::UdpSocket, bytes: usize) {
    let state = match quinn::udp::UdpSocketState::new(socket.into()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot inspect UDP socket; keeping default buffer sizes");
            return;
        }
    };
    if let Err(e) = state.set_send_buffer_size(socket.into(), bytes) {
        tracing::warn!(error = %e, bytes, "cannot set UDP send buffer size");
    }
    if let Err(e) = state.set_recv_buffer_size(socket.into(), bytes) {
        tracing::warn!(error = %e, bytes, "cannot set UDP receive buffer size");
    }
    tracing::debug!(
        send = ?state.send_buffer_size(socket.into()).ok(),
        recv = ?state.recv_buffer_size(socket.into()).ok(),
        "UDP socket buffers"
    );
}

/// The ring provider with only TLS 1.3 suites, AES-GCM first: it measured ~1.5x faster than
/// ChaCha20 on these (AES-NI) machines. ChaCha20 stays as a fallback for peers without it.
/// AES-128 before AES-256: the QUIC initial packets use AES-128-GCM anyway, and it is faster.
fn crypto_provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    let rank = |s: &rustls::SupportedCipherSuite| match s.suite() {
        CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
        _ => 2,
    };
    provider.cipher_suites.retain(|s| s.tls13().is_some());
    provider.cipher_suites.sort_by_key(rank);
    Arc::new(provider)
}

fn tls_err(what: &str) -> impl FnOnce(rustls::Error) -> NetError + '_ {
    move |e| NetError::Tls(format!("{what}: {e}"))
}

fn self_signed_unverified() -> Result<(QuicServerConfig, QuicClientConfig), NetError> {
    let provider = crypto_provider();

    let certified = rcgen::generate_simple_self_signed(vec![TLS_SERVER_NAME.to_string()])
        .map_err(|e| NetError::Tls(format!("generating self-signed certificate: {e}")))?;
    let cert = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()));

    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err("server TLS 1.3"))?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .map_err(tls_err("server certificate"))?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    // No 0-RTT: troupe connections are long-lived and 0-RTT data is replayable.
    server.max_early_data_size = 0;

    let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err("client TLS 1.3"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(UnverifiedServerCert { provider }))
        .with_no_client_auth();
    client.alpn_protocols = vec![ALPN.to_vec()];

    let server = QuicServerConfig::try_from(server)
        .map_err(|e| NetError::Tls(format!("server config not usable for QUIC: {e}")))?;
    let client = QuicClientConfig::try_from(client)
        .map_err(|e| NetError::Tls(format!("client config not usable for QUIC: {e}")))?;
    Ok((server, client))
}

/// Accepts ANY server certificate: the single place where this version trusts the peer's
/// identity without checking it.
///
/// Why this is acceptable for now: every process has a throw-away self-signed certificate,
/// so there is nothing to check it against; the join-token proof that follows the handshake
/// (`net::join_proof`, bound to this TLS session's exported keying material) is what admits
/// a peer, and a man in the middle cannot forward a proof from one session to another.
/// The handshake signature is still verified, so the peer holds the key of the certificate
/// it presented.
///
/// Next step: `TlsSetup::ClusterCa` replaces this with rustls' `WebPkiServerVerifier` over
/// the cluster CA (and the server requires client certificates from the same CA).
#[derive(Debug)]
pub struct UnverifiedServerCert {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for UnverifiedServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_prefers_aes_gcm_and_is_tls13_only() {
        let p = crypto_provider();
        assert_eq!(p.cipher_suites[0].suite(), CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert!(p.cipher_suites.iter().all(|s| s.tls13().is_some()));
    }

    #[test]
    fn keep_alive_must_be_below_idle_timeout() {
        let opts = NetOptions {
            keep_alive: Some(Duration::from_secs(10)),
            idle_timeout: Duration::from_secs(5),
            ..NetOptions::default()
        };
        assert!(matches!(opts.transport_config(), Err(NetError::Config(_))));
        assert!(NetOptions::default().transport_config().is_ok());
    }

    #[test]
    fn endpoint_outside_runtime_is_an_error_not_a_panic() {
        let r = make_endpoint("127.0.0.1:0".parse().unwrap(), &NetOptions::default());
        assert!(matches!(r, Err(NetError::NoRuntime)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connect_with_alpn_and_export_keying_material() {
        let opts = NetOptions::default();
        let a = make_endpoint("127.0.0.1:0".parse().unwrap(), &opts).unwrap();
        let b = make_endpoint("127.0.0.1:0".parse().unwrap(), &opts).unwrap();
        let b_addr = b.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let inc = b.accept().await.expect("incoming");
            let conn = inc.await.expect("handshake");
            (b, conn)
        });
        let ca = a.connect(b_addr, TLS_SERVER_NAME).unwrap().await.unwrap();
        let (_b, cb) = accept.await.unwrap();
        let hd = ca.handshake_data().unwrap();
        let hd = hd.downcast::<quinn::crypto::rustls::HandshakeData>().unwrap();
        assert_eq!(hd.protocol.as_deref(), Some(ALPN));
        let mut x = [0u8; 32];
        let mut y = [0u8; 32];
        ca.export_keying_material(&mut x, b"l", b"").unwrap();
        cb.export_keying_material(&mut y, b"l", b"").unwrap();
        assert_eq!(x, y);
    }
}
