//! Hard caps on every length that crosses the wire or reaches the store.
//!
//! Decoders check these before they allocate, so hostile input can never
//! make a peer allocate more than the cap.

/// Largest whole frame (header + segment table + body + payload), in bytes.
pub const MAX_FRAME: u32 = 72 << 20;
/// Largest metadata body, in bytes.
pub const MAX_BODY: u32 = 1 << 20;
/// Largest single bulk segment, in bytes.
pub const MAX_SEGMENT: u32 = 64 << 20;
/// Most bulk segments in one frame.
pub const MAX_SEGMENTS: u16 = 1024;
/// Longest distribution or attribute key, in bytes.
pub const MAX_KEY_LEN: usize = 4096;
/// Longest label or name (pool, container, file name), in bytes.
pub const MAX_NAME_LEN: usize = 255;
/// Most I/O descriptors (akeys) in one update or fetch.
pub const MAX_IODS: usize = 1024;
/// Most keys returned by one list call.
pub const MAX_LIST: u32 = 4096;
/// Largest record size of an array value, in bytes.
pub const MAX_REC_SIZE: u32 = 1 << 20;
