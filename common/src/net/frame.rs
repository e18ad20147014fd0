//! Control-channel framing: `u32` little-endian body length, then a postcard body.
//!
//! The length is checked against a limit before anything is allocated for the body, so a
//! peer cannot make us reserve gigabytes by announcing them. [`read_frame`] reads exactly one
//! frame from a QUIC stream (never past it, so the next call finds the next frame);
//! [`FrameDecoder`] is the same logic without I/O, for byte sources that arrive in arbitrary
//! pieces. Both share [`parse_header`], so they enforce the limit identically.

use bytes::{Buf, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::NetError;

/// Size of the length prefix.
pub const FRAME_HEADER_LEN: usize = 4;

/// Largest control frame body. Control messages are small (tensors never ride in them); a
/// megabyte leaves room for e.g. a run config while bounding what a peer can make us buffer.
pub const MAX_CONTROL_FRAME: usize = 1 << 20;

/// Body length announced by a header, if it is within `max_len`.
fn parse_header(header: [u8; FRAME_HEADER_LEN], max_len: usize) -> Result<usize, NetError> {
    let len = u32::from_le_bytes(header);
    // u32 -> usize cannot fail on the 32/64-bit targets troupe supports; saturate otherwise so
    // the limit check still rejects it.
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if len > max_len {
        return Err(NetError::FrameTooLarge { len, max: max_len });
    }
    Ok(len)
}

/// Encode `msg` as one frame (header + body), refusing bodies above [`MAX_CONTROL_FRAME`]
/// so we never send what a peer would refuse.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, NetError> {
    // Serialize after a placeholder header so the frame is built in one buffer.
    let buf = postcard::to_extend(msg, vec![0u8; FRAME_HEADER_LEN]).map_err(NetError::Encode)?;
    let body_len = buf.len() - FRAME_HEADER_LEN;
    if body_len > MAX_CONTROL_FRAME {
        return Err(NetError::FrameTooLarge { len: body_len, max: MAX_CONTROL_FRAME });
    }
    let mut buf = buf;
    // body_len <= MAX_CONTROL_FRAME < u32::MAX, so the cast is exact.
    buf[..FRAME_HEADER_LEN].copy_from_slice(&(body_len as u32).to_le_bytes());
    Ok(buf)
}

/// Decode a frame body.
pub fn decode_frame<T: DeserializeOwned>(body: &[u8]) -> Result<T, NetError> {
    postcard::from_bytes(body).map_err(|source| NetError::Decode { len: body.len(), source })
}

/// Write one frame to a stream.
pub async fn write_frame<T: Serialize>(send: &mut quinn::SendStream, msg: &T) -> Result<(), NetError> {
    let frame = encode_frame(msg)?;
    send.write_all(&frame).await?;
    Ok(())
}

/// Read one frame of at most `max_len` body bytes.
///
/// `Ok(None)`: the stream ended cleanly before a frame started. A stream that ends inside a
/// frame is [`NetError::Truncated`]; an over-long announcement is [`NetError::FrameTooLarge`]
/// (nothing allocated); a body postcard cannot decode is [`NetError::Decode`].
pub async fn read_frame<T: DeserializeOwned>(recv: &mut quinn::RecvStream, max_len: usize) -> Result<Option<T>, NetError> {
    match read_frame_bytes(recv, max_len).await? {
        Some(body) => decode_frame(&body).map(Some),
        None => Ok(None),
    }
}

/// Like [`read_frame`] but returns the undecoded body, for callers that must look at a frame
/// before trusting its layout (the handshake checks the protocol version first).
/// Largest piece of a frame body read (and allocated) at once.
const BODY_PIECE: usize = 64 << 10;

pub async fn read_frame_bytes(recv: &mut quinn::RecvStream, max_len: usize) -> Result<Option<Vec<u8>>, NetError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(got)) => {
            return Err(NetError::Truncated { part: "length prefix", got, expected: FRAME_HEADER_LEN })
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    let len = parse_header(header, max_len)?;
    // The body grows as it arrives: an announced length costs nothing until its bytes come.
    let mut body = Vec::with_capacity(len.min(BODY_PIECE));
    while body.len() < len {
        match recv.read_chunk((len - body.len()).min(BODY_PIECE), true).await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk.bytes),
            Ok(None) => return Err(NetError::Truncated { part: "frame body", got: body.len(), expected: len }),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Some(body))
}

/// Sans-IO frame splitter: push bytes as they arrive, pop complete frame bodies.
///
/// After a [`NetError::FrameTooLarge`] the decoder stays failed (the byte stream has no
/// resynchronisation point), and every later [`FrameDecoder::next_frame`] repeats the error.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max_len: usize,
    failed: Option<(usize, usize)>,
}

impl FrameDecoder {
    pub fn new(max_len: usize) -> Self {
        FrameDecoder { buf: BytesMut::new(), max_len, failed: None }
    }

    /// Append received bytes. Once failed, input is dropped instead of buffered.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The next complete frame body, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, NetError> {
        if let Some((len, max)) = self.failed {
            return Err(NetError::FrameTooLarge { len, max });
        }
        let Some(header) = self.buf.get(..FRAME_HEADER_LEN) else {
            return Ok(None);
        };
        let mut h = [0u8; FRAME_HEADER_LEN];
        h.copy_from_slice(header);
        let len = match parse_header(h, self.max_len) {
            Ok(len) => len,
            Err(e) => {
                if let NetError::FrameTooLarge { len, max } = e {
                    self.failed = Some((len, max));
                }
                // Nothing after a bad header can be trusted; free it.
                self.buf = BytesMut::new();
                return Err(e);
            }
        };
        if self.buf.len() - FRAME_HEADER_LEN < len {
            return Ok(None);
        }
        self.buf.advance(FRAME_HEADER_LEN);
        Ok(Some(self.buf.split_to(len).to_vec()))
    }

    /// Bytes buffered but not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Call at end of input: an error if a partial frame is left.
    pub fn finish(&self) -> Result<(), NetError> {
        if let Some((len, max)) = self.failed {
            return Err(NetError::FrameTooLarge { len, max });
        }
        match self.buf.len() {
            0 => Ok(()),
            n if n < FRAME_HEADER_LEN => Err(NetError::Truncated { part: "length prefix", got: n, expected: FRAME_HEADER_LEN }),
            n => {
                let mut h = [0u8; FRAME_HEADER_LEN];
                h.copy_from_slice(&self.buf[..FRAME_HEADER_LEN]);
                let expected = parse_header(h, self.max_len)?;
                Err(NetError::Truncated { part: "frame body", got: n - FRAME_HEADER_LEN, expected })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Msg {
        Hello { version: u32, name: String, proof: [u8; 32] },
        Step(u64, Vec<f32>),
        Bye,
    }

    fn sample() -> Vec<Msg> {
        vec![
            Msg::Hello { version: 1, name: "worker-0".into(), proof: [7; 32] },
            Msg::Step(42, vec![1.0, -2.5, 3.25]),
            Msg::Bye,
            Msg::Step(u64::MAX, vec![]),
        ]
    }

    #[test]
    fn round_trip_through_decoder_in_any_split() {
        let msgs = sample();
        let mut wire = Vec::new();
        for m in &msgs {
            wire.extend(encode_frame(m).unwrap());
        }
        for split in [1, 2, 3, 5, 7, wire.len()] {
            let mut d = FrameDecoder::new(MAX_CONTROL_FRAME);
            let mut out = Vec::new();
            for piece in wire.chunks(split) {
                d.push(piece);
                while let Some(f) = d.next_frame().unwrap() {
                    out.push(decode_frame::<Msg>(&f).unwrap());
                }
            }
            d.finish().unwrap();
            assert_eq!(out, msgs, "split {split}");
        }
    }

    #[test]
    fn oversized_length_is_rejected_without_buffering() {
        let mut d = FrameDecoder::new(16);
        d.push(&u32::MAX.to_le_bytes());
        match d.next_frame() {
            Err(NetError::FrameTooLarge { len, max }) => {
                assert_eq!(len, u32::MAX as usize);
                assert_eq!(max, 16);
            }
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        d.push(&[0; 100]);
        assert_eq!(d.buffered(), 0);
        assert!(matches!(d.next_frame(), Err(NetError::FrameTooLarge { .. })));
    }

    #[test]
    fn truncated_input_reported_at_finish() {
        let frame = encode_frame(&Msg::Bye).unwrap();
        let mut d = FrameDecoder::new(MAX_CONTROL_FRAME);
        d.push(&frame[..2]);
        assert!(d.next_frame().unwrap().is_none());
        assert!(matches!(d.finish(), Err(NetError::Truncated { part: "length prefix", .. })));

        let frame = encode_frame(&sample()[0]).unwrap();
        let mut d = FrameDecoder::new(MAX_CONTROL_FRAME);
        d.push(&frame[..frame.len() - 1]);
        assert!(d.next_frame().unwrap().is_none());
        assert!(matches!(d.finish(), Err(NetError::Truncated { part: "frame body", .. })));
    }

    #[test]
    fn garbage_body_is_decode_error() {
        // 0xFF is not a valid variant index of Msg.
        assert!(matches!(decode_frame::<Msg>(&[0xff, 0xff, 0xff]), Err(NetError::Decode { .. })));
    }

    #[test]
    fn encoder_refuses_oversized_messages() {
        let big = Msg::Step(1, vec![0.0; MAX_CONTROL_FRAME / 4 + 1]);
        assert!(matches!(encode_frame(&big), Err(NetError::FrameTooLarge { .. })));
    }

    /// read_frame/write_frame over a real QUIC stream: round trip, clean end, and the
    /// same failures the decoder reports.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stream_round_trip_and_failures() {
        use crate::net::test_util::{connect, endpoint};
        let (a, b) = (endpoint(), endpoint());
        let (ca, cb) = connect(&a, &b).await;

        // Round trip of several frames, then a clean end.
        let mut send = ca.open_uni().await.unwrap();
        for m in sample() {
            write_frame(&mut send, &m).await.unwrap();
        }
        send.finish().unwrap();
        let mut recv = cb.accept_uni().await.unwrap();
        for m in sample() {
            assert_eq!(read_frame::<Msg>(&mut recv, MAX_CONTROL_FRAME).await.unwrap(), Some(m));
        }
        assert_eq!(read_frame::<Msg>(&mut recv, MAX_CONTROL_FRAME).await.unwrap(), None);

        // Oversized announcement: refused from the header alone (the body never arrives, so
        // a reader that tried to allocate and read it would hang instead).
        let mut send = ca.open_uni().await.unwrap();
        send.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
        let mut recv = cb.accept_uni().await.unwrap();
        let r = read_frame::<Msg>(&mut recv, MAX_CONTROL_FRAME).await;
        assert!(matches!(r, Err(NetError::FrameTooLarge { len, max }) if len == u32::MAX as usize && max == MAX_CONTROL_FRAME), "{r:?}");
        drop(send);

        // Truncated prefix and truncated body.
        for (bytes, part) in [(vec![1u8, 0], "length prefix"), (vec![10u8, 0, 0, 0, 1, 2], "frame body")] {
            let mut send = ca.open_uni().await.unwrap();
            send.write_all(&bytes).await.unwrap();
            send.finish().unwrap();
            let mut recv = cb.accept_uni().await.unwrap();
            let r = read_frame::<Msg>(&mut recv, MAX_CONTROL_FRAME).await;
            assert!(matches!(r, Err(NetError::Truncated { part: p, .. }) if p == part), "{r:?}");
        }

        // Undecodable body.
        let mut send = ca.open_uni().await.unwrap();
        send.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).await.unwrap();
        send.finish().unwrap();
        let mut recv = cb.accept_uni().await.unwrap();
        let r = read_frame::<Msg>(&mut recv, MAX_CONTROL_FRAME).await;
        assert!(matches!(r, Err(NetError::Decode { len: 3, .. })), "{r:?}");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Arbitrary bytes in arbitrary pieces: never panics, never yields a frame above the
        /// limit, and everything it yields is exactly what the stream announced.
        #[test]
        fn decoder_never_panics_or_exceeds_limit(
            data in proptest::collection::vec(any::<u8>(), 0..4096),
            cuts in proptest::collection::vec(1usize..64, 0..64),
            max_len in 0usize..512,
        ) {
            let mut d = FrameDecoder::new(max_len);
            let mut rest: &[u8] = &data;
            let mut cuts = cuts.into_iter().cycle();
            let mut yielded = 0usize;
            loop {
                let n = cuts.next().unwrap_or(rest.len()).min(rest.len());
                d.push(&rest[..n]);
                rest = &rest[n..];
                loop {
                    match d.next_frame() {
                        Ok(Some(f)) => {
                            prop_assert!(f.len() <= max_len);
                            yielded += FRAME_HEADER_LEN + f.len();
                        }
                        Ok(None) => break,
                        Err(NetError::FrameTooLarge { len, max }) => {
                            prop_assert!(len > max);
                            prop_assert_eq!(d.buffered(), 0);
                            break;
                        }
                        Err(e) => prop_assert!(false, "unexpected error {e}"),
                    }
                }
                if rest.is_empty() { break; }
            }
            prop_assert!(yielded <= data.len());
            let _ = d.finish();
        }

        /// Valid frames interleaved with arbitrary splits come back unchanged.
        #[test]
        fn decoder_round_trips_valid_frames(
            bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20),
            split in 1usize..97,
        ) {
            let mut wire = Vec::new();
            for b in &bodies {
                wire.extend_from_slice(&(b.len() as u32).to_le_bytes());
                wire.extend_from_slice(b);
            }
            let mut d = FrameDecoder::new(300);
            let mut out = Vec::new();
            for piece in wire.chunks(split) {
                d.push(piece);
                while let Some(f) = d.next_frame().unwrap() { out.push(f); }
            }
            prop_assert!(d.finish().is_ok());
            prop_assert_eq!(out, bodies);
        }
    }
}
