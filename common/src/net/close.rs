//! Application close codes (connection close and stream reset/stop codes share this table)
//! and readable descriptions of quinn errors.
//!
//! A peer that closes a connection sends a code and a short UTF-8 reason; the other side
//! sees it as `ConnectionError::ApplicationClosed`. [`describe_connection_error`] turns that
//! into "closed by peer: AUTH_FAILED (2): join proof did not match" so logs and errors say why.

use quinn::{ConnectionError, ReadError, VarInt, WriteError};

/// Orderly shutdown: the process or the ring is going away on purpose.
pub const SHUTDOWN: VarInt = VarInt::from_u32(0);
/// The peer sent something that violates the troupe protocol (bad header, bad frame order).
pub const PROTOCOL_ERROR: VarInt = VarInt::from_u32(1);
/// The join-token proof did not match.
pub const AUTH_FAILED: VarInt = VarInt::from_u32(2);
/// `PROTOCOL_VERSION` differs between the peers.
pub const VERSION_MISMATCH: VarInt = VarInt::from_u32(3);
/// A frame announced a length above the limit.
pub const FRAME_TOO_LARGE: VarInt = VarInt::from_u32(4);
/// The peer belongs to another cluster generation (stale ring or stale worker).
pub const GENERATION_MISMATCH: VarInt = VarInt::from_u32(5);
/// The peer is not the rank we expected at this position of the ring.
pub const WRONG_RANK: VarInt = VarInt::from_u32(6);
/// A collective or a ring formation was abandoned (timeout or error on this side); also the
/// stream reset code of an abandoned collective stream.
pub const ABORTED: VarInt = VarInt::from_u32(7);

/// Name of a close code, or "UNKNOWN" for codes this version does not define.
pub fn close_code_name(code: VarInt) -> &'static str {
    match code.into_inner() {
        0 => "SHUTDOWN",
        1 => "PROTOCOL_ERROR",
        2 => "AUTH_FAILED",
        3 => "VERSION_MISMATCH",
        4 => "FRAME_TOO_LARGE",
        5 => "GENERATION_MISMATCH",
        6 => "WRONG_RANK",
        7 => "ABORTED",
        _ => "UNKNOWN",
    }
}

/// "AUTH_FAILED (2)".
pub fn describe_close_code(code: VarInt) -> String {
    format!("{} ({})", close_code_name(code), code)
}

/// Close reasons travel in one packet; keep what we send short and printable.
pub fn reason_bytes(reason: &str) -> Vec<u8> {
    const MAX_REASON: usize = 200;
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason.as_bytes()[..end].to_vec()
}

/// A readable description of why a connection ended, including the peer's reason text.
pub fn describe_connection_error(err: &ConnectionError) -> String {
    match err {
        ConnectionError::ApplicationClosed(close) => {
            let reason = String::from_utf8_lossy(&close.reason);
            if reason.is_empty() {
                format!("closed by peer: {}", describe_close_code(close.error_code))
            } else {
                format!("closed by peer: {}: {}", describe_close_code(close.error_code), reason)
            }
        }
        ConnectionError::ConnectionClosed(close) if is_tls_code(close.error_code) => {
            let reason = String::from_utf8_lossy(&close.reason);
            let reason = if reason.is_empty() { String::new() } else { format!(": {reason}") };
            format!("the peer refused the TLS handshake ({}{}){reason}{TLS_HINT}", close.error_code, tls_alert_name(close.error_code))
        }
        ConnectionError::ConnectionClosed(close) => {
            let reason = String::from_utf8_lossy(&close.reason);
            format!("aborted by the peer's QUIC stack: {:?} {}", close.error_code, reason)
        }
        ConnectionError::TransportError(e) if is_tls_code(e.code) => {
            format!("TLS handshake failed: {e}{TLS_HINT}")
        }
        ConnectionError::TransportError(e) => format!("QUIC transport error: {e}"),
        ConnectionError::VersionMismatch => "peer does not support our QUIC version".into(),
        ConnectionError::Reset => {
            "reset by peer: it no longer knows this connection (it restarted, or closed the connection and the close was lost)".into()
        }
        ConnectionError::TimedOut => "timed out: no packets from the peer within the idle timeout (peer down or unreachable)".into(),
        ConnectionError::LocallyClosed => "closed by this process".into(),
        ConnectionError::CidsExhausted => "connection IDs exhausted".into(),
    }
}

/// Appended to TLS handshake failures: the usual cause and the fix.
const TLS_HINT: &str = " [with mutual TLS both sides need certificates from the same cluster CA \
    (`troupe init-certs`, then --tls-dir); without it, both sides must run without TLS flags]";

/// QUIC carries TLS alerts as transport error codes 0x100 + alert.
fn is_tls_code(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

/// The TLS alerts a certificate problem produces, by name.
fn tls_alert_name(code: quinn::TransportErrorCode) -> &'static str {
    match u64::from(code) & 0xff {
        42 => ", bad_certificate",
        43 => ", unsupported_certificate",
        44 => ", certificate_revoked",
        45 => ", certificate_expired",
        46 => ", certificate_unknown",
        48 => ", unknown_ca: the peer does not trust the CA that issued our certificate",
        116 => ", certificate_required: the peer requires a client certificate",
        120 => ", no_application_protocol",
        _ => "",
    }
}

/// Whether the connection failed in the TLS handshake (a certificate refused by either side,
/// no common protocol) rather than on the network: retrying the same connection will not help.
pub fn is_tls_handshake_failure(err: &ConnectionError) -> bool {
    match err {
        ConnectionError::TransportError(e) => is_tls_code(e.code),
        ConnectionError::ConnectionClosed(close) => is_tls_code(close.error_code),
        _ => false,
    }
}

/// A readable description of a stream read failure.
pub fn describe_read_error(err: &ReadError) -> String {
    match err {
        ReadError::Reset(code) => format!("peer reset the stream with {}", describe_close_code(*code)),
        ReadError::ConnectionLost(e) => format!("connection lost: {}", describe_connection_error(e)),
        other => other.to_string(),
    }
}

/// A readable description of a stream write failure.
pub fn describe_write_error(err: &WriteError) -> String {
    match err {
        WriteError::Stopped(code) => {
            format!("peer stopped reading the stream with {}", describe_close_code(*code))
        }
        WriteError::ConnectionLost(e) => format!("connection lost: {}", describe_connection_error(e)),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_distinct_and_known() {
        let codes = [SHUTDOWN, PROTOCOL_ERROR, AUTH_FAILED, VERSION_MISMATCH, FRAME_TOO_LARGE, GENERATION_MISMATCH, WRONG_RANK, ABORTED];
        let names: std::collections::HashSet<_> = codes.iter().map(|c| close_code_name(*c)).collect();
        assert_eq!(names.len(), codes.len());
        assert!(!names.contains("UNKNOWN"));
        assert_eq!(close_code_name(VarInt::from_u32(999)), "UNKNOWN");
    }

    #[test]
    fn reason_is_truncated_on_char_boundary() {
        let s = "é".repeat(150); // 300 bytes
        let r = reason_bytes(&s);
        assert!(r.len() <= 200);
        assert!(std::str::from_utf8(&r).is_ok());
    }
}
