//! QUIC networking shared by the coordinator and the workers.
//!
//! - [`make_endpoint`]: one `quinn::Endpoint` per process that both accepts and connects,
//!   with TLS 1.3 (rustls) and the transport tuning measured in
//!   `shared/notes/quic-throughput.md`.
//! - [`write_frame`] / [`read_frame`] / [`FrameDecoder`]: the control-channel framing
//!   (u32 little-endian length prefix + postcard body, bounded by a maximum size).
//! - [`join_proof`]: proof of the cluster join token bound to one TLS session, so the token
//!   never crosses the wire and a proof cannot be replayed on another connection.
//! - [`close`]: application close codes and readable descriptions of connection errors.
//! - [`probe`]: notices within a heartbeat that the process behind a peer's port is gone.
//! - [`token_file`]: the join token in a private file, made strong by the coordinator.
//!
//! Authentication model: with [`TlsSetup::SelfSignedUnverified`] (the default) TLS gives
//! confidentiality and integrity, but the client does not verify the server certificate
//! (see [`endpoint::UnverifiedServerCert`]); who may talk to whom is decided by the
//! join-token proof exchanged right after the handshake. With [`TlsSetup::ClusterCa`] every
//! connection is mutual TLS 1.3 against a cluster CA ([`certs`], `troupe init-certs`): a
//! peer without a certificate from that CA fails the handshake. The join token, when set,
//! is still checked on top.

pub mod certs;
pub mod close;
pub mod endpoint;
mod frame;
pub mod probe;
mod proof;
pub mod token_file;

pub use close::{describe_close_code, describe_connection_error, is_tls_handshake_failure};
pub use endpoint::{make_endpoint, CongestionControl, NetOptions, TlsSetup, ALPN, TLS_SERVER_NAME};
pub use frame::{decode_frame, encode_frame, read_frame, read_frame_bytes, write_frame, FrameDecoder, FRAME_HEADER_LEN, MAX_CONTROL_FRAME};
pub use proof::{constant_time_eq, join_proof, peer_join_proof, verify_peer_join_proof, JOIN_PROOF_LABEL};

use std::net::SocketAddr;

/// Everything that can go wrong in this module. Messages say what happened; callers that
/// know the peer (the framing functions only see a stream) add it when they wrap the error.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot bind UDP socket on {addr}: {source} (is the port already in use?)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("no tokio runtime: QUIC endpoints must be created from inside a tokio runtime")]
    NoRuntime,
    #[error("cannot create QUIC endpoint on {addr}: {source}")]
    Endpoint {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("invalid network options: {0}")]
    Config(String),
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: usize, max: usize },
    #[error("cannot decode a {len}-byte frame body (peer speaks another protocol version?): {source}")]
    Decode {
        len: usize,
        #[source]
        source: postcard::Error,
    },
    #[error("cannot encode frame: {0}")]
    Encode(#[source] postcard::Error),
    #[error("stream ended inside a frame: got {got} of {expected} bytes of the {part}")]
    Truncated { part: &'static str, got: usize, expected: usize },
    #[error("reading from stream: {}", close::describe_read_error(.0))]
    Read(#[source] quinn::ReadError),
    #[error("writing to stream: {}", close::describe_write_error(.0))]
    Write(#[source] quinn::WriteError),
    #[error("stream already closed")]
    ClosedStream,
    #[error("cannot export TLS keying material for the join proof (handshake incomplete?)")]
    KeyingMaterial,
}

impl From<quinn::ReadError> for NetError {
    fn from(e: quinn::ReadError) -> Self {
        NetError::Read(e)
    }
}

impl From<quinn::WriteError> for NetError {
    fn from(e: quinn::WriteError) -> Self {
        NetError::Write(e)
    }
}

impl From<quinn::ClosedStream> for NetError {
    fn from(_: quinn::ClosedStream) -> Self {
        NetError::ClosedStream
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::{make_endpoint, NetOptions, TLS_SERVER_NAME};

    pub(crate) fn endpoint() -> quinn::Endpoint {
        make_endpoint("127.0.0.1:0".parse().expect("addr"), &NetOptions::default()).expect("endpoint")
    }

    /// A connection from `a` to `b`: (client side, server side).
    pub(crate) async fn connect(a: &quinn::Endpoint, b: &quinn::Endpoint) -> (quinn::Connection, quinn::Connection) {
        let addr = b.local_addr().expect("local addr");
        let (ca, cb) = tokio::join!(async { a.connect(addr, TLS_SERVER_NAME).expect("connect").await.expect("handshake") }, async {
            b.accept().await.expect("incoming").await.expect("accept")
        });
        (ca, cb)
    }
}
