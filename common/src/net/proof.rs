//! Join-token proof bound to one TLS session.
//!
//! Both ends of a QUIC connection can derive the same secret bytes from the TLS session
//! (RFC 5705 keying material exporter); nobody else can, not even a man in the middle, who
//! would hold two different sessions. Hashing those bytes with the cluster join token proves
//! knowledge of the token without sending it, and the proof is worthless on any other
//! connection.
//!
//! The proof also covers which side of the connection produced it, so a peer cannot pass
//! our own proof back to us as its answer: each side sends [`join_proof`] and checks the
//! other's with [`verify_peer_join_proof`].

use sha2::{Digest, Sha256};

use super::NetError;

/// Exporter label (RFC 5705); versioned so a future proof format cannot be confused with it.
pub const JOIN_PROOF_LABEL: &[u8] = b"troupe join v1";

fn proof_for_side(conn: &quinn::Connection, token: &str, side: quinn::Side) -> Result<[u8; 32], NetError> {
    let mut ekm = [0u8; 32];
    conn.export_keying_material(&mut ekm, JOIN_PROOF_LABEL, b"").map_err(|_| NetError::KeyingMaterial)?;
    let side_tag: &[u8] = match side {
        quinn::Side::Client => b"client",
        quinn::Side::Server => b"server",
    };
    let mut h = Sha256::new();
    // Length-prefix each variable field so no two inputs hash the same byte string.
    h.update(JOIN_PROOF_LABEL);
    h.update(ekm);
    h.update((side_tag.len() as u64).to_le_bytes());
    h.update(side_tag);
    h.update((token.len() as u64).to_le_bytes());
    h.update(token.as_bytes());
    Ok(h.finalize().into())
}

/// The proof this process sends on `conn`: sha256 over the session's exported keying
/// material (label [`JOIN_PROOF_LABEL`], 32 bytes), this side's role and the token.
pub fn join_proof(conn: &quinn::Connection, token: &str) -> Result<[u8; 32], NetError> {
    proof_for_side(conn, token, conn.side())
}

/// The proof the peer must send on `conn` if it knows `token`.
pub fn peer_join_proof(conn: &quinn::Connection, token: &str) -> Result<[u8; 32], NetError> {
    let peer_side = match conn.side() {
        quinn::Side::Client => quinn::Side::Server,
        quinn::Side::Server => quinn::Side::Client,
    };
    proof_for_side(conn, token, peer_side)
}

/// Whether `proof` is the peer's valid proof for `token` on this connection (constant time).
pub fn verify_peer_join_proof(conn: &quinn::Connection, token: &str, proof: &[u8]) -> Result<bool, NetError> {
    Ok(constant_time_eq(&peer_join_proof(conn, token)?, proof))
}

/// Equality whose running time does not depend on where the inputs differ, so an attacker
/// cannot find a valid proof byte by byte by timing refusals. Lengths are not secret.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from turning the fold into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::test_util::{connect as pair, endpoint};

    #[test]
    fn constant_time_eq_basics() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn proofs_match_across_sides_and_differ_across_connections() {
        let a = endpoint();
        let b = endpoint();
        let (ca, cb) = pair(&a, &b).await;
        let (ca2, _cb2) = pair(&a, &b).await;

        let client_proof = join_proof(&ca, "secret").unwrap();
        assert!(verify_peer_join_proof(&cb, "secret", &client_proof).unwrap());
        assert!(!verify_peer_join_proof(&cb, "wrong", &client_proof).unwrap());
        // A proof cannot be reflected: the server's own proof differs from the client's.
        assert_ne!(join_proof(&cb, "secret").unwrap(), client_proof);
        assert!(verify_peer_join_proof(&ca, "secret", &join_proof(&cb, "secret").unwrap()).unwrap());
        // Replay on another connection fails.
        assert_ne!(join_proof(&ca2, "secret").unwrap(), client_proof);
    }
}
