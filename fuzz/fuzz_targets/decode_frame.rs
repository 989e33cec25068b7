//! Feeds arbitrary bytes to the frame decoder and every request decoder.
//! Neither may panic; a decoded frame must re-encode to bytes that decode
//! to the same frame.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use shoal_common::msg::{decode_request, FetchReq, ListReq, PingReq, PunchReq, TargetQueryReq, UpdateReq};
use shoal_common::wire::FrameDecoder;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let mut dec = FrameDecoder;
    while let Ok(Some(frame)) = dec.decode(&mut buf) {
        let again = frame.encode_to_vec().expect("a decoded frame is within the caps");
        let mut b2 = BytesMut::from(&again[..]);
        assert_eq!(dec.decode(&mut b2).unwrap().unwrap(), frame);
        let _ = decode_request::<PingReq>(&frame);
        let _ = decode_request::<UpdateReq>(&frame);
        let _ = decode_request::<FetchReq>(&frame);
        let _ = decode_request::<PunchReq>(&frame);
        let _ = decode_request::<ListReq>(&frame);
        let _ = decode_request::<TargetQueryReq>(&frame);
    }
});
