//! The framed, versioned wire format.
//!
//! Every message, request or reply, is one frame:
//!
//! ```text
//! offset size  field
//!  0      4    magic            b"SHOL"
//!  4      1    protocol version (WIRE_VERSION)
//!  5      1    flags            bit 0: reply; bit 1: transport ping;
//!                                other bits must be 0
//!  6      2    opcode           u16 LE (see msg::Opcode)
//!  8      8    request id       u64 LE, echoed by the reply
//! 16      4    pool-map version u32 LE, the sender's
//! 20      4    body length      u32 LE, <= MAX_BODY
//! 24     16    handle token     u128 LE (pool/container/permissions)
//! 40      2    segment count    u16 LE, <= MAX_SEGMENTS
//! 42      2    reserved         must be 0
//! 44      4    payload length   u32 LE, sum of segment lengths
//! 48   4*n     segment lengths  u32 LE each, <= MAX_SEGMENT
//!  ..  body    metadata body    postcard-encoded message
//!  ..  payload bulk segments    raw bytes, back to back
//! ```
//!
//! The decoder checks every length against [`crate::limits`] before it
//! reserves memory, and returns [`ShoalError::Protocol`] on anything
//! malformed; it never panics. Bulk segments are handed out as
//! [`bytes::Bytes`] slices of the received buffer, never copied, and the
//! encoder writes them after the header without copying them either.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{Result, ShoalError};
use crate::limits::{MAX_BODY, MAX_FRAME, MAX_SEGMENT, MAX_SEGMENTS};

/// The four bytes that open every frame.
pub const MAGIC: [u8; 4] = *b"SHOL";
/// The protocol version this build speaks.
pub const WIRE_VERSION: u8 = 4;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 48;
/// Flag bit: this frame is a reply.
pub const FLAG_REPLY: u8 = 1;
/// Flag bit: a transport-level liveness probe (no body, no segments); the
/// peer answers it at once with the same request id and `FLAG_REPLY` set,
/// whatever else it is doing.
pub const FLAG_PING: u8 = 2;

/// The token of requests servers send each other for rebuild: not a
/// client's I/O, so rebuild does not yield to it.
pub const TOKEN_REBUILD: u128 = u128::MAX;

/// The fixed-width fields of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    pub flags: u8,
    pub opcode: u16,
    pub request_id: u64,
    pub map_version: u32,
    /// I/O: the container handle's token ([`TOKEN_REBUILD`] between
    /// servers for rebuild). Management requests: the operation id, the
    /// same for every try of one change, so it is applied once.
    pub token: u128,
}

impl Header {
    /// Whether this frame is a reply.
    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_REPLY != 0
    }

    /// Whether this frame is a transport ping (or its answer).
    pub fn is_ping(&self) -> bool {
        self.flags & FLAG_PING != 0
    }
}

/// One decoded frame: header, metadata body and bulk segments.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Frame {
    pub header: Header,
    pub body: Bytes,
    pub segments: Vec<Bytes>,
}

impl Frame {
    /// Total encoded length of this frame.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + 4 * self.segments.len() + self.body.len() + self.segments.iter().map(Bytes::len).sum::<usize>()
    }

    /// Checks this frame against the caps, so a sender learns of an
    /// oversized request before it is sent.
    pub fn check_limits(&self) -> Result<()> {
        if self.body.len() > MAX_BODY as usize {
            return Err(ShoalError::invalid(format!(
                "message body of {} bytes exceeds the cap of {MAX_BODY}",
                self.body.len()
            )));
        }
        if self.segments.len() > MAX_SEGMENTS as usize {
            return Err(ShoalError::invalid(format!(
                "{} bulk segments exceed the cap of {MAX_SEGMENTS}",
                self.segments.len()
            )));
        }
        if let Some(s) = self.segments.iter().find(|s| s.len() > MAX_SEGMENT as usize) {
            return Err(ShoalError::invalid(format!(
                "bulk segment of {} bytes exceeds the cap of {MAX_SEGMENT}",
                s.len()
            )));
        }
        if self.encoded_len() > MAX_FRAME as usize {
            return Err(ShoalError::invalid(format!(
                "frame of {} bytes exceeds the cap of {MAX_FRAME}",
                self.encoded_len()
            )));
        }
        Ok(())
    }

    /// Encodes the header, segment table and body. The caller sends the
    /// returned bytes followed by each of `self.segments` in order.
    pub fn encode_head(&self) -> Result<Bytes> {
        self.check_limits()?;
        let payload: usize = self.segments.iter().map(Bytes::len).sum();
        let mut b = BytesMut::with_capacity(HEADER_LEN + 4 * self.segments.len() + self.body.len());
        b.put_slice(&MAGIC);
        b.put_u8(WIRE_VERSION);
        b.put_u8(self.header.flags);
        b.put_u16_le(self.header.opcode);
        b.put_u64_le(self.header.request_id);
        b.put_u32_le(self.header.map_version);
        b.put_u32_le(self.body.len() as u32);
        b.put_u128_le(self.header.token);
        b.put_u16_le(self.segments.len() as u16);
        b.put_u16_le(0);
        b.put_u32_le(payload as u32);
        for s in &self.segments {
            b.put_u32_le(s.len() as u32);
        }
        b.put_slice(&self.body);
        Ok(b.freeze())
    }

    /// Encodes the whole frame into one buffer (copies the segments; for
    /// tests and tools, not for the data path).
    pub fn encode_to_vec(&self) -> Result<Vec<u8>> {
        let mut v = self.encode_head()?.to_vec();
        for s in &self.segments {
            v.extend_from_slice(s);
        }
        Ok(v)
    }
}

/// A checked frame header and the frame's whole length.
struct Head {
    header: Header,
    body_len: u32,
    nsegs: u16,
    payload_len: u32,
    total: usize,
}

/// Parses and checks the header that opens `buf` (`Ok(None)` while fewer
/// than [`HEADER_LEN`] bytes are there).
fn parse_head(buf: &[u8]) -> Result<Option<Head>> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let mut h = &buf[..HEADER_LEN];
    let mut magic = [0u8; 4];
    h.copy_to_slice(&mut magic);
    if magic != MAGIC {
        return Err(ShoalError::protocol(format!("bad magic {magic:02x?}")));
    }
    let version = h.get_u8();
    if version != WIRE_VERSION {
        return Err(ShoalError::protocol(format!(
            "unsupported protocol version {version} (this peer speaks {WIRE_VERSION})"
        )));
    }
    let flags = h.get_u8();
    if flags & !(FLAG_REPLY | FLAG_PING) != 0 {
        return Err(ShoalError::protocol(format!("unknown flags {flags:#x}")));
    }
    let opcode = h.get_u16_le();
    let request_id = h.get_u64_le();
    let map_version = h.get_u32_le();
    let body_len = h.get_u32_le();
    let token = h.get_u128_le();
    let nsegs = h.get_u16_le();
    let reserved = h.get_u16_le();
    let payload_len = h.get_u32_le();
    if reserved != 0 {
        return Err(ShoalError::protocol("reserved header field is not zero"));
    }
    if body_len > MAX_BODY {
        return Err(ShoalError::protocol(format!("body of {body_len} bytes exceeds {MAX_BODY}")));
    }
    if nsegs > MAX_SEGMENTS {
        return Err(ShoalError::protocol(format!("{nsegs} segments exceed {MAX_SEGMENTS}")));
    }
    let total = HEADER_LEN as u64 + 4 * nsegs as u64 + body_len as u64 + payload_len as u64;
    if total > MAX_FRAME as u64 {
        return Err(ShoalError::protocol(format!("frame of {total} bytes exceeds {MAX_FRAME}")));
    }
    let header = Header { flags, opcode, request_id, map_version, token };
    Ok(Some(Head { header, body_len, nsegs, payload_len, total: total as usize }))
}

/// The whole length of the frame whose header opens `buf`, once the header
/// is there (`Ok(None)` before), after checking it as [`FrameDecoder::decode`]
/// does; lets a receiver reserve memory for the frame before it reads it.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>> {
    Ok(parse_head(buf)?.map(|h| h.total))
}

/// Incremental frame decoder over a receive buffer.
#[derive(Debug, Default)]
pub struct FrameDecoder;

impl FrameDecoder {
    /// Decodes one frame from the front of `buf`.
    ///
    /// Returns `Ok(None)` when more bytes are needed (after reserving room
    /// for the rest of the frame, bounded by [`MAX_FRAME`]), `Ok(Some)` with
    /// the frame removed from `buf`, or an error for malformed input, after
    /// which the stream cannot be resynchronised and should be closed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>> {
        let Some(Head { header, body_len, nsegs, payload_len, total }) = parse_head(buf)? else {
            return Ok(None);
        };
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let table_end = HEADER_LEN + 4 * nsegs as usize;
        let mut lens = Vec::with_capacity(nsegs as usize);
        let mut sum = 0u64;
        let mut t = &buf[HEADER_LEN..table_end];
        for _ in 0..nsegs {
            let l = t.get_u32_le();
            if l > MAX_SEGMENT {
                return Err(ShoalError::protocol(format!("segment of {l} bytes exceeds {MAX_SEGMENT}")));
            }
            sum += l as u64;
            lens.push(l as usize);
        }
        if sum != payload_len as u64 {
            return Err(ShoalError::protocol(format!("segment lengths add up to {sum}, header says {payload_len}")));
        }
        let frame = buf.split_to(total).freeze();
        let body_end = table_end + body_len as usize;
        let body = frame.slice(table_end..body_end);
        let mut at = body_end;
        let segments = lens
            .into_iter()
            .map(|l| {
                let s = frame.slice(at..at + l);
                at += l;
                s
            })
            .collect();
        Ok(Some(Frame { header, body, segments }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_frame() -> impl Strategy<Value = Frame> {
        (
            0u8..2,
            any::<u16>(),
            any::<u64>(),
            any::<u32>(),
            any::<u128>(),
            proptest::collection::vec(any::<u8>(), 0..512),
            proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..2048), 0..8),
        )
            .prop_map(|(flags, opcode, request_id, map_version, token, body, segs)| Frame {
                header: Header { flags, opcode, request_id, map_version, token },
                body: Bytes::from(body),
                segments: segs.into_iter().map(Bytes::from).collect(),
            })
    }

    proptest! {
        #[test]
        fn frames_round_trip_even_when_split_anywhere(f in arb_frame(), cut in any::<prop::sample::Index>()) {
            let bytes = f.encode_to_vec().unwrap();
            let cut = cut.index(bytes.len() + 1);
            let mut buf = BytesMut::from(&bytes[..cut]);
            let mut d = FrameDecoder;
            if cut < bytes.len() {
                prop_assert_eq!(d.decode(&mut buf).unwrap(), None);
            }
            buf.extend_from_slice(&bytes[cut..]);
            let got = d.decode(&mut buf).unwrap().unwrap();
            prop_assert_eq!(got, f);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn random_bytes_never_panic_or_overallocate(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let mut d = FrameDecoder;
            let _ = d.decode(&mut buf);
            prop_assert!(buf.capacity() <= MAX_FRAME as usize + bytes.len());
        }

        #[test]
        fn corrupted_headers_are_errors_or_incomplete(f in arb_frame(), pos in 0usize..HEADER_LEN, val in any::<u8>()) {
            let mut bytes = f.encode_to_vec().unwrap();
            bytes[pos] = val;
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = FrameDecoder.decode(&mut buf);
        }
    }

    #[test]
    fn oversized_lengths_are_refused_before_allocation() {
        let f = Frame::default();
        let mut bytes = f.encode_to_vec().unwrap();
        bytes[20..24].copy_from_slice(&(MAX_BODY + 1).to_le_bytes());
        let mut buf = BytesMut::from(&bytes[..]);
        assert!(matches!(FrameDecoder.decode(&mut buf), Err(ShoalError::Protocol(_))));

        let mut bytes = f.encode_to_vec().unwrap();
        bytes[44..48].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut buf = BytesMut::from(&bytes[..]);
        assert!(matches!(FrameDecoder.decode(&mut buf), Err(ShoalError::Protocol(_))));
        assert!(buf.capacity() < 4096);
    }

    #[test]
    fn frame_len_agrees_with_the_encoder() {
        let f = Frame {
            body: Bytes::from_static(b"body"),
            segments: vec![Bytes::from(vec![1u8; 300])],
            ..Frame::default()
        };
        let bytes = f.encode_to_vec().unwrap();
        assert_eq!(frame_len(&bytes[..10]).unwrap(), None);
        assert_eq!(frame_len(&bytes).unwrap(), Some(bytes.len()));
        let mut bad = bytes.clone();
        bad[44..48].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(frame_len(&bad).is_err());
    }

    #[test]
    fn bad_magic_and_version_are_refused() {
        let mut bytes = Frame::default().encode_to_vec().unwrap();
        bytes[0] = b'X';
        assert!(FrameDecoder.decode(&mut BytesMut::from(&bytes[..])).is_err());
        let mut bytes = Frame::default().encode_to_vec().unwrap();
        bytes[4] = 99;
        assert!(FrameDecoder.decode(&mut BytesMut::from(&bytes[..])).is_err());
    }

    #[test]
    fn segment_table_must_match_payload_length() {
        let f = Frame { segments: vec![Bytes::from_static(b"abc")], ..Frame::default() };
        let mut bytes = f.encode_to_vec().unwrap();
        bytes[48..52].copy_from_slice(&2u32.to_le_bytes());
        assert!(FrameDecoder.decode(&mut BytesMut::from(&bytes[..])).is_err());
    }

    #[test]
    fn oversized_frames_are_refused_by_the_sender() {
        let f = Frame { body: Bytes::from(vec![0; MAX_BODY as usize + 1]), ..Frame::default() };
        assert!(matches!(f.encode_head(), Err(ShoalError::InvalidArgument(_))));
    }
}
