//! Join-token proof bound to one TLS session.
//!
//! Both ends of a QUIC connection can derive the same secret bytes from the TLS session
//! (RFC 5705 keying material exporter); nobody else can, not even a man in the middle, who
//! would hold two different sessions. A MAC of those bytes under a key derived from the
//! cluster join token proves knowledge of the token without sending it, and the proof is
//! worthless on any other connection.
//!
//! The proof also covers which side of the connection produced it, so a peer cannot pass
//! our own proof back to us as its answer: each side sends [`join_proof`] and checks the
//! other's with [`verify_peer_join_proof`]. Both directions are checked: the coordinator
//! checks a worker's proof, the worker the coordinator's, and each ring link both ways.
//!
//! Whoever terminates a connection (an impostor included) sees the other side's proof and the
//! keying material, and could try tokens offline. The key is therefore derived with PBKDF2
//! (`PROOF_KEY_ITERATIONS` rounds of HMAC-SHA256), so each guess costs what deriving it
//! costs, and the coordinator refuses tokens shorter than `config::MIN_TOKEN_CHARS`. The key
//! is derived once per token per process, not per connection, so unauthenticated peers
//! cannot make a process spend it.

use std::num::NonZeroU32;
use std::sync::Mutex;

use ring::{hmac, pbkdf2};
use sha2::{Digest, Sha256};

use super::NetError;

/// Exporter label (RFC 5705); versioned so a future proof format cannot be confused with it.
pub const JOIN_PROOF_LABEL: &[u8] = b"troupe join v2";

/// PBKDF2 rounds of the proof key: tens of milliseconds once per process, the same for each
/// offline guess of the token.
const PROOF_KEY_ITERATIONS: u32 = 200_000;

/// Salt of the proof key: fixed (both sides must agree before they have exchanged anything),
/// versioned with the label.
const PROOF_KEY_SALT: &[u8] = b"troupe join key v2";

/// The proof key of `token`, derived once and remembered (keyed by the token's hash).
fn proof_key(token: &str) -> hmac::Key {
    static LAST: Mutex<Option<([u8; 32], [u8; 32])>> = Mutex::new(None);
    let id: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    let mut last = LAST.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let key = match *last {
        Some((known, key)) if known == id => key,
        _ => {
            let mut key = [0u8; 32];
            let rounds = NonZeroU32::new(PROOF_KEY_ITERATIONS).expect("non-zero");
            pbkdf2::derive(pbkdf2::PBKDF2_HMAC_SHA256, rounds, PROOF_KEY_SALT, token.as_bytes(), &mut key);
            *last = Some((id, key));
            key
        }
    };
    hmac::Key::new(hmac::HMAC_SHA256, &key)
}

fn proof_for_side(conn: &quinn::Connection, token: &str, side: quinn::Side) -> Result<[u8; 32], NetError> {
    let mut ekm = [0u8; 32];
    conn.export_keying_material(&mut ekm, JOIN_PROOF_LABEL, b"").map_err(|_| NetError::KeyingMaterial)?;
    let side_tag: &[u8] = match side {
        quinn::Side::Client => b"client",
        quinn::Side::Server => b"server",
    };
    let mut mac = hmac::Context::with_key(&proof_key(token));
    // Fixed-length fields, then the one variable field last: no two inputs collide.
    mac.update(&ekm);
    mac.update(side_tag);
    let mut proof = [0u8; 32];
    proof.copy_from_slice(mac.sign().as_ref());
    Ok(proof)
}

/// The proof this process sends on `conn`: HMAC-SHA256, under the token's proof key, of the
/// session's exported keying material (label [`JOIN_PROOF_LABEL`], 32 bytes) and this side's
/// role.
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
