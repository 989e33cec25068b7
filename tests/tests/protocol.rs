//! Hostile and malformed frames against a live server: each gets an error
//! reply or a closed connection, and the server keeps serving others.

use std::time::Duration;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use shoal_common::msg::{decode_reply, PingReply, UpdateIod, UpdateReply, ValueKind};
use shoal_common::wire::{Frame, FrameDecoder, Header, HEADER_LEN};
use shoal_common::{ContId, Oid, ShoalError};
use shoal_tests::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends raw bytes and returns the reply frame, or `None` when the server
/// closed the connection without one.
async fn send_raw(addr: &str, bytes: &[u8], half_close: bool) -> Option<Frame> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    if half_close {
        let _ = s.shutdown().await;
    }
    let mut buf = bytes::BytesMut::new();
    let read = async {
        loop {
            if let Ok(Some(f)) = FrameDecoder.decode(&mut buf) {
                return Some(f);
            }
            match s.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read).await.expect("server neither replied nor closed")
}

async fn still_serves(srv: &TestServer) {
    let c = srv.client();
    c.ping().await.expect("ping after abuse");
    let iods = vec![UpdateIod::new(b"a", ValueKind::Single, b"ok")];
    c.update(0, ContId(1), Oid::new(0, 1), b"d", iods, vec![Bytes::from_static(b"ok")]).await.unwrap();
}

fn frame(opcode: u16, body: &[u8], segs: Vec<Bytes>) -> Vec<u8> {
    Frame {
        header: Header { opcode, request_id: 77, ..Header::default() },
        body: Bytes::copy_from_slice(body),
        segments: segs,
    }
    .encode_to_vec()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_errors_or_closed_connections() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = TestServer::start(&tmp.path().join("s0"), 1).await.unwrap();
    let addr = srv.addr.clone();

    // A valid frame with an unknown opcode: an error reply.
    let r = send_raw(&addr, &frame(999, b"", vec![]), false).await.expect("reply");
    assert_eq!(r.header.request_id, 77);
    assert!(matches!(decode_reply::<()>(&r), Err(ShoalError::Protocol(_))));

    // A known opcode with a garbage body: an error reply.
    let r = send_raw(&addr, &frame(2, &[0xff; 33], vec![]), false).await.expect("reply");
    assert!(matches!(decode_reply::<UpdateReply>(&r), Err(ShoalError::Protocol(_))));

    // A ping works on a raw connection too.
    let r = send_raw(&addr, &frame(1, &[], vec![]), false).await.expect("reply");
    assert!(decode_reply::<PingReply>(&r).is_ok());

    // Truncated: half a header, then the client closes its side.
    let full = frame(1, b"", vec![]);
    assert!(send_raw(&addr, &full[..HEADER_LEN / 2], true).await.is_none());
    // Truncated inside the payload.
    let big = frame(2, b"", vec![Bytes::from(vec![1u8; 4096])]);
    assert!(send_raw(&addr, &big[..big.len() - 100], true).await.is_none());

    // Oversized lengths in the header: closed without reading the payload.
    let mut over = frame(1, b"", vec![]);
    over[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(send_raw(&addr, &over, false).await.is_none());
    let mut over = frame(1, b"", vec![]);
    over[44..48].copy_from_slice(&(1u32 << 31).to_le_bytes());
    assert!(send_raw(&addr, &over, false).await.is_none());

    // A reply frame sent as a request: closed.
    let mut rep = frame(1, b"", vec![]);
    rep[5] = 1;
    assert!(send_raw(&addr, &rep, false).await.is_none());

    still_serves(&srv).await;

    // Random garbage, many times (bounded).
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for i in 0..40 {
        let len = rng.random_range(1..4096);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if i % 2 == 0 && bytes.len() >= 5 {
            // A valid magic and version make the decoder look further.
            bytes[..5].copy_from_slice(b"SHOL\x01");
        }
        let _ = send_raw(&addr, &bytes, true).await;
    }
    still_serves(&srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = TestServer::start(&tmp.path().join("s0"), 1).await.unwrap();
    let c = srv.client();
    let single = || vec![UpdateIod::new(b"a", ValueKind::Single, b"x")];
    // No such target.
    let r = c.update(5, ContId(1), Oid::new(0, 1), b"d", single(), vec![Bytes::from_static(b"x")]).await;
    assert!(matches!(r, Err(ShoalError::NotFound { .. })), "{r:?}");
    // Key too long.
    let r = c.update(0, ContId(1), Oid::new(0, 1), &[b'k'; 5000], single(), vec![Bytes::from_static(b"x")]).await;
    assert!(matches!(r, Err(ShoalError::InvalidArgument(_))), "{r:?}");
    // Data and descriptor disagree.
    let kind = ValueKind::Array { rec_size: 8, start: 0, nr: 4 };
    let r = c
        .update(
            0,
            ContId(1),
            Oid::new(0, 1),
            b"d",
            vec![UpdateIod::new(b"a", kind, b"x")],
            vec![Bytes::from_static(b"x")],
        )
        .await;
    assert!(matches!(r, Err(ShoalError::InvalidArgument(_))), "{r:?}");
    still_serves(&srv).await;
}
