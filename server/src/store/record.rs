//! The value record stored in RocksDB for every version of a value.
//!
//! ```text
//! offset size field
//!  0      1   format version (RECORD_V1)
//!  1      1   location: 0 inline, 1 external (data file)
//!  2      4   record size u32 LE (0 for single values)
//!  6      8   value length in bytes, u64 LE
//! 14      4   crc32c of the value bytes, u32 LE
//! 18     ..   inline: the value bytes
//!             external: data file number u32 LE, offset u64 LE
//! ```
//!
//! Decoding checks every field and returns an error rather than panicking,
//! because a record is read back from disk.

use bytes::Bytes;
use shoal_common::{Result, ShoalError};

pub const RECORD_V1: u8 = 1;
const HEAD: usize = 18;

/// Where a value's bytes live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Inline(Bytes),
    External { file: u32, offset: u64 },
}

/// One stored version of a value or an extent piece.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub rec_size: u32,
    pub len: u64,
    pub crc: u32,
    pub loc: Location,
}

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEAD + 12);
        v.push(RECORD_V1);
        v.push(matches!(self.loc, Location::External { .. }) as u8);
        v.extend_from_slice(&self.rec_size.to_le_bytes());
        v.extend_from_slice(&self.len.to_le_bytes());
        v.extend_from_slice(&self.crc.to_le_bytes());
        match &self.loc {
            Location::Inline(b) => v.extend_from_slice(b),
            Location::External { file, offset } => {
                v.extend_from_slice(&file.to_le_bytes());
                v.extend_from_slice(&offset.to_le_bytes());
            }
        }
        v
    }

    pub fn decode(raw: &[u8]) -> Result<Record> {
        let bad = |what: &str| ShoalError::Io(format!("corrupt value record: {what}"));
        if raw.len() < HEAD {
            return Err(bad("too short"));
        }
        if raw[0] != RECORD_V1 {
            return Err(bad(&format!("unknown format version {}", raw[0])));
        }
        let rec_size = u32::from_le_bytes(raw[2..6].try_into().expect("4 bytes"));
        let len = u64::from_le_bytes(raw[6..14].try_into().expect("8 bytes"));
        let crc = u32::from_le_bytes(raw[14..18].try_into().expect("4 bytes"));
        let rest = &raw[HEAD..];
        let loc = match raw[1] {
            0 => {
                if rest.len() as u64 != len {
                    return Err(bad("inline length mismatch"));
                }
                Location::Inline(Bytes::copy_from_slice(rest))
            }
            1 => {
                if rest.len() != 12 {
                    return Err(bad("external location length"));
                }
                Location::External {
                    file: u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")),
                    offset: u64::from_le_bytes(rest[4..].try_into().expect("8 bytes")),
                }
            }
            other => return Err(bad(&format!("unknown location {other}"))),
        };
        Ok(Record { rec_size, len, crc, loc })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records as format version 1 writes them. These bytes must keep
    /// decoding for as long as version 1 data can exist on disk.
    #[test]
    fn version_1_fixtures_decode() {
        let inline = [1u8, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0xb7, 0x3f, 0x4b, 0x36, b'a', b'b', b'c'];
        let r = Record::decode(&inline).unwrap();
        assert_eq!(r.loc, Location::Inline(Bytes::from_static(b"abc")));
        assert_eq!(r.crc, crc32c::crc32c(b"abc"));
        let external = [1u8, 1, 4, 0, 0, 0, 0, 0, 16, 0, 0, 0, 0, 0, 1, 2, 3, 4, 7, 0, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0];
        let r = Record::decode(&external).unwrap();
        assert_eq!(
            r,
            Record { rec_size: 4, len: 1 << 20, crc: 0x0403_0201, loc: Location::External { file: 7, offset: 4096 } }
        );
        assert_eq!(r.encode(), external);
    }

    #[test]
    fn records_round_trip_and_garbage_is_an_error() {
        for r in [
            Record { rec_size: 0, len: 3, crc: 9, loc: Location::Inline(Bytes::from_static(b"abc")) },
            Record { rec_size: 4, len: 1 << 20, crc: 1, loc: Location::External { file: 2, offset: 4096 } },
        ] {
            assert_eq!(Record::decode(&r.encode()).unwrap(), r);
        }
        assert!(Record::decode(b"").is_err());
        assert!(Record::decode(&[9; 40]).is_err());
        let mut raw =
            Record { rec_size: 0, len: 3, crc: 9, loc: Location::Inline(Bytes::from_static(b"abc")) }.encode();
        raw.pop();
        assert!(Record::decode(&raw).is_err());
    }
}
