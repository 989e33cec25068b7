//! Object, container and pool identities.
//!
//! An [`Oid`] is 128 bits: the object type (8 bits) and object class id
//! (32 bits) at the top, then an 88-bit sequence number unique within its
//! container (see [`crate::oclass::make_oid`]). [`ContId`] and [`PoolId`]
//! are UUIDs.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::ShoalError;

/// A 128-bit object identifier: `hi` holds type and class bits and the top
/// of the unique part, `lo` the rest of the unique part.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Oid {
    pub hi: u64,
    pub lo: u64,
}

impl Oid {
    /// Builds an OID from its two halves.
    pub const fn new(hi: u64, lo: u64) -> Self {
        Oid { hi, lo }
    }

    /// The 16 big-endian bytes of this OID (ordered like the OID itself).
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.hi.to_be_bytes());
        b[8..].copy_from_slice(&self.lo.to_be_bytes());
        b
    }

    /// Reads an OID from 16 big-endian bytes.
    pub fn from_bytes(b: [u8; 16]) -> Self {
        let (hi, lo) = b.split_at(8);
        Oid {
            hi: u64::from_be_bytes(hi.try_into().expect("8 bytes")),
            lo: u64::from_be_bytes(lo.try_into().expect("8 bytes")),
        }
    }
}

impl fmt::Display for Oid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}.{:016x}", self.hi, self.lo)
    }
}

impl FromStr for Oid {
    type Err = ShoalError;

    /// Parses `HI.LO` in hexadecimal, as [`Oid`]'s `Display` prints it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ShoalError::invalid(format!("bad object id {s:?}: expected HEX.HEX"));
        let (hi, lo) = s.split_once('.').ok_or_else(bad)?;
        Ok(Oid {
            hi: u64::from_str_radix(hi, 16).map_err(|_| bad())?,
            lo: u64::from_str_radix(lo, 16).map_err(|_| bad())?,
        })
    }
}

/// Serde for a raw u128 identity: a hyphenated UUID string in
/// human-readable formats (JSON tools round 128-bit integers), the number in
/// binary ones (`#[serde(with = "crate::ids::uuid_u128")]`).
pub mod uuid_u128 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u128, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            let h = format!("{v:032x}");
            s.collect_str(&format_args!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32]))
        } else {
            s.serialize_u128(*v)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            u128::from_str_radix(&s.replace('-', ""), 16).map_err(serde::de::Error::custom)
        } else {
            u128::deserialize(d)
        }
    }
}

/// Declares a 128-bit UUID-like identity type that prints and parses in
/// the canonical 8-4-4-4-12 form.
macro_rules! uuid_id {
    ($(#[$m:meta])* $name:ident, $what:literal) => {
        $(#[$m])*
        ///
        /// Serialized as a UUID string in human-readable formats (JSON) and
        /// as a u128 in binary ones (the wire, the MS log).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub u128);

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.collect_str(self)
                } else {
                    s.serialize_u128(self.0)
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                if d.is_human_readable() {
                    let s = String::deserialize(d)?;
                    s.parse().map_err(serde::de::Error::custom)
                } else {
                    u128::deserialize(d).map($name)
                }
            }
        }

        impl $name {
            /// The 16 big-endian bytes of this id.
            pub fn to_bytes(self) -> [u8; 16] {
                self.0.to_be_bytes()
            }
        }

        impl fmt::Display for $name {
            /// Prints the canonical 8-4-4-4-12 UUID form.
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let h = format!("{:032x}", self.0);
                write!(f, "{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
            }
        }

        impl FromStr for $name {
            type Err = ShoalError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let bad = || ShoalError::invalid(format!(concat!("bad ", $what, " uuid {:?}"), s));
                let b = s.as_bytes();
                let canonical = b.len() == 36
                    && b.iter().enumerate().all(|(i, c)| match i {
                        8 | 13 | 18 | 23 => *c == b'-',
                        _ => c.is_ascii_hexdigit(),
                    });
                if !canonical {
                    return Err(bad());
                }
                let hex: String = s.chars().filter(|c| *c != '-').collect();
                u128::from_str_radix(&hex, 16).map($name).map_err(|_| bad())
            }
        }
    };
}

uuid_id!(
    /// A container identity (UUID as 128 bits).
    ContId,
    "container"
);
uuid_id!(
    /// A pool identity (UUID as 128 bits).
    PoolId,
    "pool"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oid_round_trips_through_text_and_bytes() {
        let oid = Oid::new(0xdead_beef, 42);
        assert_eq!(oid.to_string().parse::<Oid>().unwrap(), oid);
        assert_eq!(Oid::from_bytes(oid.to_bytes()), oid);
        assert!("nope".parse::<Oid>().is_err());
    }

    #[test]
    fn cont_id_prints_as_uuid() {
        let c = ContId(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        assert_eq!(c.to_string(), "01234567-89ab-cdef-0123-456789abcdef");
        assert_eq!(c.to_string().parse::<ContId>().unwrap(), c);
        assert!("0123456789ab-cdef-0123-4567-89abcdef".parse::<ContId>().is_err(), "hyphens in the wrong places");
        assert!("+1234567-89ab-cdef-0123-456789abcdef".parse::<ContId>().is_err(), "a sign is not hex");
    }
}
