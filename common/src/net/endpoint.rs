//! QUIC endpoint construction: TLS setup and transport tuning.
//!
//! Tuning follows `shared/notes/quic-throughput.md` (measured on the 2-core CI machines):
//! large UDP payloads are the main lever for bulk throughput, and they conflict with GSO, so
//! GSO is off and MTU discovery is allowed to climb to 65507 on paths that carry it
//! (loopback); on real networks discovery settles at the path MTU.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{EndpointConfig, IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{CipherSuite, DigitallySignedStruct, RootCertStore, SignatureScheme};

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
/// `#[non_exhaustive]` so further schemes can be added; callers outside this module only
/// pick a variant.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub enum TlsSetup {
    /// A fresh self-signed certificate per process (rcgen); clients do not verify the
    /// server certificate. Authentication happens after the handshake with the join-token
    /// proof (`net::join_proof`), which is bound to this TLS session.
    #[default]
    SelfSignedUnverified,
    /// Mutual TLS with a cluster CA (`troupe init-certs`): this process presents `cert`
    /// (PEM chain) signed with `key` (PEM, PKCS#8/PKCS#1/SEC1), requires every connecting
    /// peer to present a certificate issued by `ca`, and checks that the peers it connects
    /// to present one too. See [`ClusterCaServerCert`] for why names are not checked.
    ClusterCa { ca: PathBuf, cert: PathBuf, key: PathBuf },
}

impl TlsSetup {
    /// The endpoint setup that a config's `[tls]` files describe.
    pub fn from_config(tls: &troupe_core::config::TlsConfig) -> TlsSetup {
        TlsSetup::ClusterCa { ca: tls.ca.clone(), cert: tls.cert.clone(), key: tls.key.clone() }
    }
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
    /// Streams a peer may have open towards us at once, bidirectional and unidirectional.
    pub max_incoming_bidi_streams: u32,
    pub max_incoming_uni_streams: u32,
    /// Requested SO_SNDBUF / SO_RCVBUF of the UDP socket (best effort: the kernel may cap it).
    pub socket_buffer_bytes: usize,
    pub congestion: CongestionControl,
    /// Secret from which QUIC stateless-reset tokens are derived; random when `None`. A
    /// coordinator restarted with the same key (kept in its run folder) resets its workers'
    /// connections of the previous process on their next packet, so they rejoin at once
    /// instead of waiting out the lease.
    pub reset_key: Option<Vec<u8>>,
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
            max_incoming_bidi_streams: 100,
            max_incoming_uni_streams: 100,
            // 4 MiB helped a little; 32 MiB was slower.
            socket_buffer_bytes: 4 << 20,
            congestion: CongestionControl::default(),
            reset_key: None,
        }
    }
}

impl NetOptions {
    /// The coordinator's endpoint: it only ever carries control frames (at most
    /// `MAX_CONTROL_FRAME` each) on the one bidirectional stream a worker opens, so a peer that
    /// has proven nothing gets small windows and no stream beyond that one to fill.
    pub fn control_plane() -> NetOptions {
        const MIB: u64 = 1 << 20;
        NetOptions {
            receive_window: 2 * MIB,
            stream_receive_window: 2 * MIB,
            send_window: 4 * MIB,
            max_incoming_bidi_streams: 1,
            max_incoming_uni_streams: 0,
            socket_buffer_bytes: 1 << 20,
            ..NetOptions::default()
        }
    }

    fn transport_config(&self) -> Result<TransportConfig, NetError> {
        let varint = |name: &str, v: u64| VarInt::from_u64(v).map_err(|_| NetError::Config(format!("{name} = {v} is too large")));
        let idle = IdleTimeout::try_from(self.idle_timeout)
            .map_err(|_| NetError::Config(format!("idle_timeout {:?} is too large", self.idle_timeout)))?;
        if let Some(k) = self.keep_alive {
            if k >= self.idle_timeout {
                return Err(NetError::Config(format!("keep_alive {k:?} must be shorter than idle_timeout {:?}", self.idle_timeout)));
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
            .max_concurrent_bidi_streams(VarInt::from_u32(self.max_incoming_bidi_streams))
            .max_concurrent_uni_streams(VarInt::from_u32(self.max_incoming_uni_streams))
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
        TlsSetup::ClusterCa { ca, cert, key } => cluster_ca(ca, cert, key)?,
    };

    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server_config.transport_config(transport.clone());
    let mut client_config = quinn::ClientConfig::new(Arc::new(client_crypto));
    client_config.transport_config(transport);

    // Without this the peer's default (1472) caps the path MTU whatever TransportConfig says;
    // both ends build their endpoint here, so both advertise it.
    let mut endpoint_config = EndpointConfig::default();
    if let Some(key) = &opts.reset_key {
        endpoint_config.reset_key(Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key)));
    }
    endpoint_config.max_udp_payload_size(MAX_UDP_PAYLOAD).map_err(|e| NetError::Config(format!("max_udp_payload_size: {e}")))?;

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

    let server = QuicServerConfig::try_from(server).map_err(|e| NetError::Tls(format!("server config not usable for QUIC: {e}")))?;
    let client = QuicClientConfig::try_from(client).map_err(|e| NetError::Tls(format!("client config not usable for QUIC: {e}")))?;
    Ok((server, client))
}

/// Reads a PEM file, saying which file and what to do when it is missing or unreadable.
fn pem_err(what: &str, path: &Path, e: rustls::pki_types::pem::Error) -> NetError {
    NetError::Tls(format!(
        "cannot load the {what} from {}: {e} (create the cluster certificates with `troupe init-certs --out DIR`)",
        path.display()
    ))
}

/// Loads the CA, this process' certificate chain and its key.
fn load_cluster_pems(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<(RootCertStore, Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), NetError> {
    let mut roots = RootCertStore::empty();
    let mut n = 0;
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| pem_err("cluster CA certificate", ca, e))? {
        let c = c.map_err(|e| pem_err("cluster CA certificate", ca, e))?;
        roots.add(c).map_err(|e| NetError::Tls(format!("{} is not a usable CA certificate: {e}", ca.display())))?;
        n += 1;
    }
    if n == 0 {
        return Err(NetError::Tls(format!("{} holds no PEM certificate (expected the cluster CA, ca.pem)", ca.display())));
    }
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem_err("certificate", cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err("certificate", cert, e))?;
    if chain.is_empty() {
        return Err(NetError::Tls(format!("{} holds no PEM certificate", cert.display())));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err("private key", key, e))?;
    Ok((roots, chain, key_der))
}

fn cluster_ca(ca: &Path, cert: &Path, key: &Path) -> Result<(QuicServerConfig, QuicClientConfig), NetError> {
    let provider = crypto_provider();
    let (roots, chain, key_der) = load_cluster_pems(ca, cert, key)?;
    let roots = Arc::new(roots);

    // The server side requires a client certificate (no `allow_unauthenticated`): a peer
    // without one from the cluster CA fails the handshake before any troupe message.
    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| NetError::Tls(format!("client certificate verifier over {}: {e}", ca.display())))?;
    let mismatch = |e: rustls::Error| {
        NetError::Tls(format!(
            "{} and {} do not form a usable certificate and key (do they belong together?): {e}",
            cert.display(),
            key.display()
        ))
    };
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err("server TLS 1.3"))?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain.clone(), key_der.clone_key())
        .map_err(mismatch)?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    server.max_early_data_size = 0;

    let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err("client TLS 1.3"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ClusterCaServerCert { roots, provider }))
        .with_client_auth_cert(chain, key_der)
        .map_err(mismatch)?;
    client.alpn_protocols = vec![ALPN.to_vec()];

    let server = QuicServerConfig::try_from(server).map_err(|e| NetError::Tls(format!("server config not usable for QUIC: {e}")))?;
    let client = QuicClientConfig::try_from(client).map_err(|e| NetError::Tls(format!("client config not usable for QUIC: {e}")))?;
    Ok((server, client))
}

/// Verifies the server's certificate chain against the cluster CA, but not its name.
///
/// Why not the name: in a troupe cluster, membership in the cluster CA *is* the identity.
/// Every process (coordinator and workers) holds a certificate from that CA, and ring peers
/// are addressed by whatever IP the coordinator relays (`peer_addr`, possibly an address
/// behind NAT or a wildcard-resolved one), so no fixed name or IP in a certificate could
/// match reliably; connections use the fixed label [`TLS_SERVER_NAME`] as SNI. What matters
/// is that the peer holds a key certified by the cluster CA — which the chain check plus the
/// TLS 1.3 handshake signature establish — and that is exactly what is checked. The client
/// certificate is checked the same way on the other side (rustls' `WebPkiClientVerifier`,
/// which never checks names either), so both directions authenticate the same property.
#[derive(Debug)]
pub struct ClusterCaServerCert {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ClusterCaServerCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        // Chain, validity period, key usage (serverAuth) and signatures, against the CA only.
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
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
/// `TlsSetup::ClusterCa` replaces this with [`ClusterCaServerCert`] (and the server then
/// requires client certificates from the same CA).
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
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
        let opts = NetOptions { keep_alive: Some(Duration::from_secs(10)), idle_timeout: Duration::from_secs(5), ..NetOptions::default() };
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

    /// Writes a CA's leaf (and the CA cert) into a fresh folder; returns the TLS setup.
    fn setup_from(ca: &crate::net::certs::ClusterCa, trust: &crate::net::certs::ClusterCa, name: &str) -> TlsSetup {
        let dir = std::env::temp_dir().join(format!("troupe-mtls-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let leaf = ca.issue(name, &["127.0.0.1".into()]).unwrap();
        let (ca_path, cert, key) = (dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&ca_path, &trust.pem().cert_pem).unwrap();
        std::fs::write(&cert, &leaf.cert_pem).unwrap();
        std::fs::write(&key, &leaf.key_pem).unwrap();
        TlsSetup::ClusterCa { ca: ca_path, cert, key }
    }

    fn ep(tls: TlsSetup) -> quinn::Endpoint {
        make_endpoint("127.0.0.1:0".parse().unwrap(), &NetOptions { tls, ..NetOptions::default() }).unwrap()
    }

    /// Connects `client` to `server`: (client result, server result). A client whose own
    /// certificate is refused may finish its side of the TLS 1.3 handshake before the server
    /// rejects it, so a client "success" counts only if the connection then stays up.
    async fn try_connect(
        client: &quinn::Endpoint,
        server: &quinn::Endpoint,
    ) -> (Result<quinn::Connection, quinn::ConnectionError>, Result<quinn::Connection, quinn::ConnectionError>) {
        let addr = server.local_addr().unwrap();
        let c = async {
            let conn = client.connect(addr, TLS_SERVER_NAME).unwrap().await?;
            match tokio::time::timeout(Duration::from_millis(500), conn.closed()).await {
                Ok(e) => Err(e),
                Err(_) => Ok(conn),
            }
        };
        let s = async { server.accept().await.expect("incoming").await };
        tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(c, s) }).await.expect("no hang")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cluster_ca_mutual_tls_accepts_members() {
        let ca = crate::net::certs::ClusterCa::generate("test CA").unwrap();
        let server = ep(setup_from(&ca, &ca, "member-server"));
        let client = ep(setup_from(&ca, &ca, "member-client"));
        let (c, s) = try_connect(&client, &server).await;
        let (c, s) = (c.expect("client side"), s.expect("server side"));
        // Both sides saw the other's certificate: this is mutual TLS.
        for conn in [&c, &s] {
            let chain = conn.peer_identity().expect("peer identity");
            let chain = chain.downcast::<Vec<CertificateDer<'static>>>().unwrap();
            assert_eq!(chain.len(), 1);
        }
        let mut x = [0u8; 32];
        let mut y = [0u8; 32];
        c.export_keying_material(&mut x, b"l", b"").unwrap();
        s.export_keying_material(&mut y, b"l", b"").unwrap();
        assert_eq!(x, y);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cluster_ca_refuses_foreign_and_missing_client_certs() {
        let ca = crate::net::certs::ClusterCa::generate("test CA").unwrap();
        let other = crate::net::certs::ClusterCa::generate("foreign CA").unwrap();
        let server = ep(setup_from(&ca, &ca, "refuse-server"));

        // Client certificate from another CA (the client trusts our CA, so only the server
        // can refuse).
        let foreign = ep(setup_from(&other, &ca, "refuse-foreign"));
        let (c, s) = try_connect(&foreign, &server).await;
        let s = s.expect_err("server must refuse a foreign client certificate");
        assert!(crate::net::is_tls_handshake_failure(&s), "{s:?}");
        let c = c.expect_err("client must see the refusal");
        assert!(crate::net::describe_connection_error(&c).contains("TLS"), "{c:?}");

        // No client certificate at all.
        let anonymous = ep(TlsSetup::SelfSignedUnverified);
        let (c, s) = try_connect(&anonymous, &server).await;
        let s = s.expect_err("server must refuse a client without a certificate");
        assert!(crate::net::is_tls_handshake_failure(&s), "{s:?}");
        assert!(c.is_err(), "client must see the refusal");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cluster_ca_client_refuses_foreign_server() {
        let ca = crate::net::certs::ClusterCa::generate("test CA").unwrap();
        let other = crate::net::certs::ClusterCa::generate("foreign CA").unwrap();
        // The server trusts our CA but presents a certificate from another one.
        let server = ep(setup_from(&other, &ca, "impostor-server"));
        let client = ep(setup_from(&ca, &ca, "honest-client"));
        let (c, s) = try_connect(&client, &server).await;
        let c = c.expect_err("client must refuse a foreign server certificate");
        assert!(crate::net::is_tls_handshake_failure(&c), "{c:?}");
        let text = crate::net::describe_connection_error(&c);
        assert!(text.contains("TLS handshake failed") && text.contains("UnknownIssuer"), "{text}");
        assert!(s.is_err(), "server side must fail too");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cluster_ca_missing_files_are_clear_errors() {
        let missing = std::env::temp_dir().join("troupe-no-such-dir/ca.pem");
        let tls = TlsSetup::ClusterCa { ca: missing.clone(), cert: missing.clone(), key: missing.clone() };
        let err = make_endpoint("127.0.0.1:0".parse().unwrap(), &NetOptions { tls, ..NetOptions::default() }).expect_err("missing files");
        let text = err.to_string();
        assert!(text.contains(&missing.display().to_string()) && text.contains("init-certs"), "{text}");
    }
}
