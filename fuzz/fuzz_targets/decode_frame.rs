//! Feeds arbitrary bytes to the frame decoder and every request decoder.
//! Neither may panic; a decoded frame must re-encode to bytes that decode
//! to the same frame.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use shoal_common::mgmt::{
    ClientHelloReq, ContCreateReq, ContDestroyReq, ContListReq, ContQueryReq, HeartbeatReq, JoinReq, OidAllocReq, PoolCreateReq,
    PoolDestroyReq, PoolExtendReq, PoolListReq, PoolQueryReq, SystemQueryReq,
};
use shoal_common::msg::{
    decode_reply, decode_request, FetchReq, ListReq, PingReq, PunchReq, StripeLockReq, StripeUnlockReq,
    TargetQueryReq, UpdateReq,
};
use shoal_common::wire::{frame_len, FrameDecoder};

fuzz_target!(|data: &[u8]| {
    let _ = frame_len(data);
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
        let _ = decode_request::<JoinReq>(&frame);
        let _ = decode_request::<HeartbeatReq>(&frame);
        let _ = decode_request::<SystemQueryReq>(&frame);
        let _ = decode_request::<PoolCreateReq>(&frame);
        let _ = decode_request::<PoolDestroyReq>(&frame);
        let _ = decode_request::<PoolExtendReq>(&frame);
        let _ = decode_request::<PoolListReq>(&frame);
        let _ = decode_request::<PoolQueryReq>(&frame);
        let _ = decode_request::<ContCreateReq>(&frame);
        let _ = decode_request::<ContDestroyReq>(&frame);
        let _ = decode_request::<ContListReq>(&frame);
        let _ = decode_request::<ContQueryReq>(&frame);
        let _ = decode_request::<OidAllocReq>(&frame);
        let _ = decode_request::<ClientHelloReq>(&frame);
        let _ = decode_request::<StripeLockReq>(&frame);
        let _ = decode_request::<StripeUnlockReq>(&frame);
        let _ = decode_reply::<shoal_common::mgmt::PoolInfo>(&frame);
        let _ = decode_reply::<shoal_common::msg::FetchReply>(&frame);
    }
});
