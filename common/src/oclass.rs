//! Object classes: how an object is spread over targets and protected.
//!
//! A class combines a [`Redundancy`] (none, `n` replicas, or `k + p` erasure
//! code) with a number of redundancy [`Groups`]. Names print and parse
//! exactly as DAOS spells them:
//!
//! - `S1` .. `S32`, `SX`: no redundancy, groups of one shard; `S4` is four
//!   groups of one shard, `SX` as many groups as the pool has targets.
//! - `RP_<n>G<g>`, `RP_<n>GX`: `n` replicas (2..=6) per group.
//! - `EC_<k>P<p>G<g>`, `EC_<k>P<p>GX`: `k` data and `p` parity cells per
//!   group, `k` in {2, 4, 8, 16}, `p` in 1..=3 (every pair but 2+3).
//!
//! `g` is 1..=65535; `GX` means as many groups as the pool can hold.
//!
//! Invariants:
//! - Every valid class round-trips through `Display`/`FromStr` and through
//!   [`ObjectClass::id`]/[`ObjectClass::from_id`]; parsing is case-sensitive
//!   and refuses anything `Display` would not print (leading zeros, `G0`).
//! - Class ids and [`ObjType`] numbers are stored in OIDs and on disk, so
//!   they never change meaning. Id `0` is never a valid class.
//!
//! Key items: [`ObjectClass`], [`ObjType`], [`auto_class`] (the automatic
//! choice for a container's `rd_fac` and fault domains), and the OID encoding
//! ([`make_oid`], [`oid_class`], [`oid_type`], [`oid_seq`]).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::ShoalError;
use crate::ids::Oid;

/// Most groups a class name can state (`G65535`).
pub const MAX_FIXED_GROUPS: u32 = 65535;
/// Largest `n` of `S<n>`.
pub const MAX_STRIPED_GROUPS: u32 = 32;
/// Fewest replicas of an `RP_<n>` class.
pub const MIN_REPLICAS: u8 = 2;
/// Most replicas of an `RP_<n>` class.
pub const MAX_REPLICAS: u8 = 6;
/// The `(k, p)` pairs of every erasure code, widest data first.
pub const EC_CODES: [(u8, u8); 11] =
    [(16, 1), (16, 2), (16, 3), (8, 1), (8, 2), (8, 3), (4, 1), (4, 2), (4, 3), (2, 1), (2, 2)];

/// How the shards of one group protect the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Redundancy {
    /// One shard, no protection.
    None,
    /// `n` full copies.
    Replicas(u8),
    /// `k` data cells and `p` parity cells.
    Ec { k: u8, p: u8 },
}

/// How many redundancy groups an object has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Groups {
    /// Exactly this many groups (`G<n>`), wrapping around the pool's targets
    /// if there are more groups than fit.
    Fixed(u32),
    /// As many groups as the pool can hold (`GX`).
    Max,
}

/// An object class: redundancy and group count.
///
/// Fields are public for matching; build classes from names, ids or
/// [`ObjectClass::new`] so that they are valid. An invalid class (say
/// `Replicas(9)`) never panics anything: [`ObjectClass::validate`] refuses it,
/// its [`ObjectClass::id`] is `0` and placement refuses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ObjectClass {
    pub redundancy: Redundancy,
    pub groups: Groups,
}

/// What an object holds. The numbers are stored in OIDs and never change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum ObjType {
    /// Generic object: dkeys, akeys, single values and arrays.
    Multi = 0,
    /// Key-value object (key = dkey).
    Kv = 1,
    /// Byte array (chunk index = dkey).
    Array = 2,
}

impl ObjType {
    /// Maps a stored number back to a type.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(ObjType::Multi),
            1 => Some(ObjType::Kv),
            2 => Some(ObjType::Array),
            _ => None,
        }
    }
}

impl fmt::Display for ObjType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjType::Multi => "multi",
            ObjType::Kv => "kv",
            ObjType::Array => "array",
        })
    }
}

// Layout of a class id: family in bits 28..32, n or k in 22..28, p in 18..22
// and the fixed group count in 0..18 (0 = GX).
const FAMILY_SHIFT: u32 = 28;
const NK_SHIFT: u32 = 22;
const P_SHIFT: u32 = 18;
const NK_MASK: u32 = 0x3f;
const P_MASK: u32 = 0xf;
const GROUPS_MASK: u32 = (1 << P_SHIFT) - 1;
const FAMILY_S: u32 = 0;
const FAMILY_RP: u32 = 1;
const FAMILY_EC: u32 = 2;

/// What a valid class name looks like, for error messages.
const VALID_NAMES: &str = "valid classes are S1..S32 and SX, RP_<n>G<g> and RP_<n>GX with n 2..6, \
     EC_<k>P<p>G<g> and EC_<k>P<p>GX with k+p one of 2+1, 2+2, 4+1..3, 8+1..3, 16+1..3, and g 1..65535 \
     (e.g. S1, SX, RP_3GX, EC_4P2G1)";

impl ObjectClass {
    /// `S1`: one shard, no protection.
    pub const S1: ObjectClass = ObjectClass { redundancy: Redundancy::None, groups: Groups::Fixed(1) };
    /// `SX`: one shard on every target, no protection.
    pub const SX: ObjectClass = ObjectClass { redundancy: Redundancy::None, groups: Groups::Max };

    /// A validated class.
    pub fn new(redundancy: Redundancy, groups: Groups) -> Result<Self, ShoalError> {
        let class = ObjectClass { redundancy, groups };
        class.validate()?;
        Ok(class)
    }

    /// Refuses a class whose fields no name can express.
    pub fn validate(&self) -> Result<(), ShoalError> {
        let (family, nk, p) = self.parts();
        from_parts(family, nk, p, self.groups)
            .map(|_| ())
            .map_err(|why| ShoalError::invalid(format!("{why}; {VALID_NAMES}")))
    }

    /// The same redundancy with another group count.
    pub fn with_groups(self, groups: Groups) -> Self {
        ObjectClass { groups, ..self }
    }

    /// Shards per redundancy group: 1, `n` or `k + p`.
    pub fn group_size(&self) -> u32 {
        match self.redundancy {
            Redundancy::None => 1,
            Redundancy::Replicas(n) => u32::from(n),
            Redundancy::Ec { k, p } => u32::from(k) + u32::from(p),
        }
    }

    /// Data cells per group: `k` for erasure codes, 1 otherwise.
    pub fn data_cells(&self) -> u32 {
        match self.redundancy {
            Redundancy::Ec { k, .. } => u32::from(k),
            Redundancy::None | Redundancy::Replicas(_) => 1,
        }
    }

    /// Parity cells per group: `p` for erasure codes, 0 otherwise (replicas
    /// are copies, not parity).
    pub fn parity_cells(&self) -> u32 {
        match self.redundancy {
            Redundancy::Ec { p, .. } => u32::from(p),
            Redundancy::None | Redundancy::Replicas(_) => 0,
        }
    }

    /// How many servers of one group may fail without losing data.
    pub fn tolerated_failures(&self) -> u8 {
        match self.redundancy {
            Redundancy::None => 0,
            Redundancy::Replicas(n) => n.saturating_sub(1),
            Redundancy::Ec { p, .. } => p,
        }
    }

    /// The stable compact encoding stored in OIDs: family in bits 28..32
    /// (0 S, 1 RP, 2 EC), `n` or `k` in 22..28 (1 for S), `p` in 18..22 and
    /// the fixed group count in 0..18 (0 for GX). An invalid class encodes
    /// as `0`, which [`ObjectClass::from_id`] refuses.
    pub fn id(&self) -> u32 {
        if self.validate().is_err() {
            return 0;
        }
        let (family, nk, p) = self.parts();
        let groups = match self.groups {
            Groups::Fixed(g) => g,
            Groups::Max => 0,
        };
        (family << FAMILY_SHIFT) | (nk << NK_SHIFT) | (p << P_SHIFT) | groups
    }

    /// Decodes [`ObjectClass::id`]; `None` for anything no valid class
    /// encodes to.
    pub fn from_id(id: u32) -> Option<ObjectClass> {
        let groups = match id & GROUPS_MASK {
            0 => Groups::Max,
            g => Groups::Fixed(g),
        };
        from_parts(id >> FAMILY_SHIFT, (id >> NK_SHIFT) & NK_MASK, (id >> P_SHIFT) & P_MASK, groups).ok()
    }

    /// Groups an object of this class has in a pool with `targets` targets
    /// in its layout: the fixed count, or for GX as many whole groups as the
    /// targets hold (at least one).
    pub fn groups_in(&self, targets: u32) -> u32 {
        match self.groups {
            Groups::Fixed(g) => g,
            Groups::Max => (targets / self.group_size().max(1)).max(1),
        }
    }

    /// Refuses this class for a container with redundancy factor `rd_fac` in
    /// a pool with `domains` fault domains (servers in service). The error
    /// says why and names classes that would fit. A fixed group count larger
    /// than the pool is fine: groups wrap around the targets.
    pub fn check(&self, rd_fac: u8, domains: u32) -> Result<(), ShoalError> {
        self.validate()?;
        let mut why = Vec::new();
        let tolerated = self.tolerated_failures();
        if tolerated < rd_fac {
            why.push(format!(
                "tolerates {tolerated} server failure{} but the container's rd_fac is {rd_fac}",
                plural(u32::from(tolerated))
            ));
        }
        let size = self.group_size();
        if size > domains {
            why.push(format!("needs {size} fault domain{} (servers) but the pool has {domains}", plural(size)));
        }
        if why.is_empty() {
            return Ok(());
        }
        Err(ShoalError::invalid(format!(
            "class {self} {}; {}",
            why.join(", and "),
            suggest(rd_fac, domains, self.groups)
        )))
    }

    /// The family, `n` or `k`, and `p` fields of the id.
    fn parts(&self) -> (u32, u32, u32) {
        match self.redundancy {
            Redundancy::None => (FAMILY_S, 1, 0),
            Redundancy::Replicas(n) => (FAMILY_RP, u32::from(n), 0),
            Redundancy::Ec { k, p } => (FAMILY_EC, u32::from(k), u32::from(p)),
        }
    }
}

/// Builds a class from id-sized fields, or says which field is out of range.
/// The one place that defines which classes exist.
fn from_parts(family: u32, nk: u32, p: u32, groups: Groups) -> Result<ObjectClass, String> {
    let fixed_max = if family == FAMILY_S { MAX_STRIPED_GROUPS } else { MAX_FIXED_GROUPS };
    if let Groups::Fixed(g) = groups {
        if g == 0 || g > fixed_max {
            let what = if family == FAMILY_S { "S<n> takes n" } else { "G<g> takes g" };
            return Err(format!("{what} in 1..={fixed_max}, not {g}"));
        }
    }
    let redundancy = match family {
        FAMILY_S if nk == 1 && p == 0 => Redundancy::None,
        FAMILY_RP if p == 0 => match u8::try_from(nk) {
            Ok(n) if (MIN_REPLICAS..=MAX_REPLICAS).contains(&n) => Redundancy::Replicas(n),
            _ => return Err(format!("RP_<n> takes n in {MIN_REPLICAS}..={MAX_REPLICAS}, not {nk}")),
        },
        FAMILY_EC => match EC_CODES.iter().find(|&&(k, pp)| u32::from(k) == nk && u32::from(pp) == p) {
            Some(&(k, p)) => Redundancy::Ec { k, p },
            None => return Err(format!("EC_{nk}P{p} is not an erasure code")),
        },
        _ => return Err(format!("no class has family {family}, n/k {nk} and p {p}")),
    };
    Ok(ObjectClass { redundancy, groups })
}

fn plural(n: u32) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// "classes that fit: ..." for a container's `rd_fac` and the pool's fault
/// domains, keeping the group count the user asked for; or why none fits.
fn suggest(rd_fac: u8, domains: u32, groups: Groups) -> String {
    let fits = fitting_classes(rd_fac, domains, groups);
    if fits.is_empty() {
        return format!("no class fits: {}", no_fit_reason(rd_fac, domains));
    }
    let names: Vec<String> = fits.iter().map(ToString::to_string).collect();
    format!("classes that fit: {}", names.join(", "))
}

/// A few concrete classes that meet `rd_fac` on `domains` servers: for each
/// parity count from `rd_fac` up, the widest erasure code that fits, then the
/// fewest replicas that suffice, then (for `rd_fac` 0) striping.
fn fitting_classes(rd_fac: u8, domains: u32, groups: Groups) -> Vec<ObjectClass> {
    let fits = |c: &ObjectClass| c.group_size() <= domains && c.tolerated_failures() >= rd_fac;
    let mut out = Vec::new();
    for p in rd_fac.max(1)..=3 {
        let widest = EC_CODES
            .iter()
            .filter(|&&(_, pp)| pp == p)
            .map(|&(k, p)| ObjectClass { redundancy: Redundancy::Ec { k, p }, groups })
            .find(|c| fits(c));
        out.extend(widest);
    }
    let replicas = rd_fac.saturating_add(1).max(MIN_REPLICAS);
    if replicas <= MAX_REPLICAS {
        out.push(ObjectClass { redundancy: Redundancy::Replicas(replicas), groups });
    }
    if rd_fac == 0 {
        let striped = match groups {
            Groups::Fixed(g) if g <= MAX_STRIPED_GROUPS => ObjectClass::S1.with_groups(groups),
            _ => ObjectClass::SX,
        };
        out.push(striped);
    }
    out.retain(|c| fits(c));
    out.truncate(4);
    out
}

/// Why no class meets `rd_fac` on `domains` servers.
fn no_fit_reason(rd_fac: u8, domains: u32) -> String {
    let most = MAX_REPLICAS - 1;
    if rd_fac > most {
        format!("rd_fac {rd_fac} is more than any class tolerates (RP_{MAX_REPLICAS} tolerates {most} server failures)")
    } else if domains == 0 {
        "the pool has no servers in service".to_string()
    } else {
        format!("rd_fac {rd_fac} needs at least {} servers; the pool has {domains}", u32::from(rd_fac) + 1)
    }
}

/// Chooses the class of a new object of type `ty` in a container with
/// redundancy factor `rd_fac`, in a pool with `domains` fault domains.
/// Returns the class and a sentence saying why.
///
/// Policy:
/// - `rd_fac` 0: `SX` for arrays and KV objects (bandwidth, and many small
///   values spread over every target), `S1` for multi objects (small,
///   one target).
/// - `rd_fac` r >= 1, arrays: the widest erasure code with `p = r` that fits
///   (`k + p <= domains`, `k` tried 16, 8, 4, 2), with `GX`; so 6 servers
///   give `EC_4P1GX` (r 1) or `EC_4P2GX` (r 2) and 3 servers `EC_2P1GX`
///   (r 1). If no code fits, `RP_<r+1>GX`.
/// - `rd_fac` r >= 1, KV and multi objects: `RP_<r+1>GX`, because small
///   values replicate more cheaply than they encode.
///
/// Errors when even `RP_<r+1>` needs more servers than the pool has.
pub fn auto_class(rd_fac: u8, domains: u32, ty: ObjType) -> Result<(ObjectClass, String), ShoalError> {
    let replicas = u32::from(rd_fac) + 1;
    if domains == 0 || (rd_fac > 0 && (replicas > u32::from(MAX_REPLICAS) || replicas > domains)) {
        return Err(ShoalError::invalid(format!("cannot choose an object class: {}", no_fit_reason(rd_fac, domains))));
    }
    if rd_fac == 0 {
        return Ok(match ty {
            ObjType::Array => {
                (ObjectClass::SX, "rd_fac 0: no redundancy; SX stripes the array over every target".into())
            }
            ObjType::Kv => (ObjectClass::SX, "rd_fac 0: no redundancy; SX spreads the keys over every target".into()),
            ObjType::Multi => {
                (ObjectClass::S1, "rd_fac 0: no redundancy; S1 keeps a small object on one target".into())
            }
        });
    }
    // Checked above: 2 <= replicas <= MAX_REPLICAS.
    let rp = ObjectClass { redundancy: Redundancy::Replicas(rd_fac + 1), groups: Groups::Max };
    if ty != ObjType::Array {
        return Ok((
            rp,
            format!(
                "rd_fac {rd_fac}: {rp} keeps {replicas} replicas; small values replicate more cheaply than they encode"
            ),
        ));
    }
    let ec = EC_CODES
        .iter()
        .filter(|&&(k, p)| p == rd_fac && u32::from(k) + u32::from(p) <= domains)
        .map(|&(k, p)| ObjectClass { redundancy: Redundancy::Ec { k, p }, groups: Groups::Max })
        .next();
    Ok(match ec {
        Some(c) => {
            let overhead = f64::from(c.group_size()) / f64::from(c.data_cells());
            let why = format!(
                "rd_fac {rd_fac} on {domains} servers: {c} is the widest erasure code with {rd_fac} parity cell{} that fits \
                 ({} shards per group, {overhead:.2}x space)",
                plural(u32::from(rd_fac)),
                c.group_size()
            );
            (c, why)
        }
        None => {
            let why = format!(
                "rd_fac {rd_fac} on {domains} servers: no erasure code with {rd_fac} parity cell{} fits, so {rp} keeps {replicas} replicas",
                plural(u32::from(rd_fac))
            );
            (rp, why)
        }
    })
}

impl fmt::Display for ObjectClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = |f: &mut fmt::Formatter<'_>| match self.groups {
            Groups::Fixed(g) => write!(f, "G{g}"),
            Groups::Max => f.write_str("GX"),
        };
        match self.redundancy {
            Redundancy::None => match self.groups {
                Groups::Fixed(n) => write!(f, "S{n}"),
                Groups::Max => f.write_str("SX"),
            },
            Redundancy::Replicas(n) => {
                write!(f, "RP_{n}")?;
                g(f)
            }
            Redundancy::Ec { k, p } => {
                write!(f, "EC_{k}P{p}")?;
                g(f)
            }
        }
    }
}

impl FromStr for ObjectClass {
    type Err = ShoalError;

    /// Parses a class name exactly as `Display` prints it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| ShoalError::invalid(format!("bad object class {s:?}: {why}; {VALID_NAMES}"));
        let (family, nk, p, groups) = split_name(s).ok_or_else(|| bad("not a class name"))?;
        from_parts(family, nk, p, groups).map_err(|why| bad(&why))
    }
}

/// Splits a class name into id fields, checking only its syntax.
fn split_name(s: &str) -> Option<(u32, u32, u32, Groups)> {
    if let Some(rest) = s.strip_prefix("RP_") {
        let (n, groups) = rest.split_once('G')?;
        Some((FAMILY_RP, decimal(n)?, 0, group_suffix(groups)?))
    } else if let Some(rest) = s.strip_prefix("EC_") {
        let (k, rest) = rest.split_once('P')?;
        let (p, groups) = rest.split_once('G')?;
        Some((FAMILY_EC, decimal(k)?, decimal(p)?, group_suffix(groups)?))
    } else {
        let n = s.strip_prefix('S')?;
        Some((FAMILY_S, 1, 0, group_suffix(n)?))
    }
}

/// `X` or a group count.
fn group_suffix(s: &str) -> Option<Groups> {
    if s == "X" {
        Some(Groups::Max)
    } else {
        decimal(s).map(Groups::Fixed)
    }
}

/// A decimal number spelled as `Display` spells it: digits only, no sign,
/// no leading zero.
fn decimal(s: &str) -> Option<u32> {
    let canonical = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if canonical {
        s.parse().ok()
    } else {
        None
    }
}

/// Human-readable formats (JSON, TOML) carry the name; binary formats the
/// compact id. Both refuse invalid classes on the way in.
impl Serialize for ObjectClass {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            s.serialize_u32(self.id())
        }
    }
}

impl<'de> Deserialize<'de> for ObjectClass {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        if d.is_human_readable() {
            let name = String::deserialize(d)?;
            name.parse().map_err(D::Error::custom)
        } else {
            let id = u32::deserialize(d)?;
            ObjectClass::from_id(id).ok_or_else(|| D::Error::custom(format!("unknown object class id {id:#x}")))
        }
    }
}

/// Bits of an OID's unique sequence number.
pub const OID_SEQ_BITS: u32 = 88;
/// The largest sequence number an OID holds.
pub const OID_SEQ_MAX: u128 = (1 << OID_SEQ_BITS) - 1;
const OID_TYPE_SHIFT: u32 = 56;
const OID_CLASS_SHIFT: u32 = 24;
const OID_SEQ_HI_MASK: u64 = (1 << OID_CLASS_SHIFT) - 1;

/// Builds an OID: `hi` bits 56..64 hold the type, 24..56 the class id and
/// 0..24 the top of the 88-bit sequence; `lo` holds the sequence's low 64
/// bits. Only the low [`OID_SEQ_BITS`] bits of `seq` are kept.
pub fn make_oid(seq: u128, class: ObjectClass, ty: ObjType) -> Oid {
    let seq = seq & OID_SEQ_MAX;
    let hi = (u64::from(ty as u8) << OID_TYPE_SHIFT)
        | (u64::from(class.id()) << OID_CLASS_SHIFT)
        | ((seq >> 64) as u64 & OID_SEQ_HI_MASK);
    Oid::new(hi, seq as u64)
}

/// The class encoded in an OID, if it is a valid one.
pub fn oid_class(oid: Oid) -> Option<ObjectClass> {
    ObjectClass::from_id((oid.hi >> OID_CLASS_SHIFT) as u32)
}

/// The object type encoded in an OID, if it is a known one.
pub fn oid_type(oid: Oid) -> Option<ObjType> {
    ObjType::from_u8((oid.hi >> OID_TYPE_SHIFT) as u8)
}

/// The 88-bit unique sequence number of an OID.
pub fn oid_seq(oid: Oid) -> u128 {
    (u128::from(oid.hi & OID_SEQ_HI_MASK) << 64) | u128::from(oid.lo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::de::IntoDeserializer;

    fn class(name: &str) -> ObjectClass {
        name.parse().unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// Every redundancy a valid class can have.
    fn all_redundancies() -> Vec<Redundancy> {
        let mut out = vec![Redundancy::None];
        out.extend((MIN_REPLICAS..=MAX_REPLICAS).map(Redundancy::Replicas));
        out.extend(EC_CODES.iter().map(|&(k, p)| Redundancy::Ec { k, p }));
        out
    }

    fn assert_round_trips(c: ObjectClass) {
        let name = c.to_string();
        assert_eq!(name.parse::<ObjectClass>(), Ok(c), "{name}");
        let id = c.id();
        assert_ne!(id, 0, "{name}");
        assert_eq!(ObjectClass::from_id(id), Some(c), "{name} id {id:#x}");
        assert!(c.validate().is_ok(), "{name}");
    }

    #[test]
    fn every_valid_class_round_trips() {
        let mut count = 0;
        for r in all_redundancies() {
            let max = if r == Redundancy::None { MAX_STRIPED_GROUPS } else { MAX_FIXED_GROUPS };
            let groups = (1..=max).map(Groups::Fixed).chain([Groups::Max]);
            for g in groups {
                assert_round_trips(ObjectClass { redundancy: r, groups: g });
                count += 1;
            }
        }
        // 33 striped, 5 replica and 11 EC redundancies with 65536 group settings.
        assert_eq!(count, 33 + 16 * 65536);
    }

    #[test]
    fn names_print_as_daos_prints_them() {
        let cases = [
            ("S1", Redundancy::None, Groups::Fixed(1)),
            ("S32", Redundancy::None, Groups::Fixed(32)),
            ("SX", Redundancy::None, Groups::Max),
            ("RP_2G1", Redundancy::Replicas(2), Groups::Fixed(1)),
            ("RP_3GX", Redundancy::Replicas(3), Groups::Max),
            ("RP_6G65535", Redundancy::Replicas(6), Groups::Fixed(65535)),
            ("EC_4P2G1", Redundancy::Ec { k: 4, p: 2 }, Groups::Fixed(1)),
            ("EC_16P3GX", Redundancy::Ec { k: 16, p: 3 }, Groups::Max),
            ("EC_2P2G8", Redundancy::Ec { k: 2, p: 2 }, Groups::Fixed(8)),
        ];
        for (name, redundancy, groups) in cases {
            let c = ObjectClass { redundancy, groups };
            assert_eq!(c.to_string(), name);
            assert_eq!(class(name), c);
        }
    }

    #[test]
    fn invalid_names_are_refused_with_the_valid_forms() {
        let bad = [
            "S0",
            "S33",
            "S01",
            "SX1",
            "S",
            "RP_1G1",
            "RP_7G1",
            "RP_0G1",
            "RP_2G0",
            "RP_2G65536",
            "RP_2G01",
            "RP_02G1",
            "RP_2",
            "RP_2G",
            "RP_G1",
            "RP_+2G1",
            "RP_2G+1",
            "RP_2Gx",
            "rp_2G1",
            "EC_3P1G1",
            "EC_2P3G1",
            "EC_4P4G1",
            "EC_4P0G1",
            "EC_32P1G1",
            "EC_4P2",
            "EC_4P2G0",
            "EC_4PG1",
            "EC_P2G1",
            "ec_4p2g1",
            "s1",
            "sx",
            "",
            "garbage",
            "RP_2G1 ",
            " S1",
            "S1\n",
            "EC_4P2GX1",
            "RP_99999999999G1",
            "S99999999999",
        ];
        for name in bad {
            let err = name.parse::<ObjectClass>().expect_err(name);
            assert!(matches!(err, ShoalError::InvalidArgument(_)), "{name}: {err}");
            let msg = err.to_string();
            assert!(msg.contains("valid classes are S1..S32"), "{name}: {msg}");
        }
        let msg = "RP_7G1".parse::<ObjectClass>().expect_err("RP_7").to_string();
        assert!(msg.contains("RP_<n> takes n in 2..=6"), "{msg}");
    }

    #[test]
    fn invalid_fields_are_refused_everywhere() {
        let bad = [
            ObjectClass { redundancy: Redundancy::Replicas(9), groups: Groups::Fixed(1) },
            ObjectClass { redundancy: Redundancy::Replicas(1), groups: Groups::Fixed(1) },
            ObjectClass { redundancy: Redundancy::Ec { k: 3, p: 1 }, groups: Groups::Max },
            ObjectClass { redundancy: Redundancy::Ec { k: 255, p: 255 }, groups: Groups::Max },
            ObjectClass { redundancy: Redundancy::None, groups: Groups::Fixed(33) },
            ObjectClass { redundancy: Redundancy::Replicas(2), groups: Groups::Fixed(0) },
            ObjectClass { redundancy: Redundancy::Replicas(2), groups: Groups::Fixed(1 << 18) },
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?}");
            assert!(ObjectClass::new(c.redundancy, c.groups).is_err(), "{c:?}");
            assert_eq!(c.id(), 0, "{c:?}");
            assert!(c.check(0, 100).is_err(), "{c:?}");
            // Nothing panics on an invalid class.
            let _ = (c.group_size(), c.data_cells(), c.parity_cells(), c.tolerated_failures(), c.groups_in(10));
        }
        assert_eq!(ObjectClass::from_id(0), None);
        assert_eq!(ObjectClass { redundancy: Redundancy::Replicas(0), groups: Groups::Max }.groups_in(10), 10);
    }

    #[test]
    fn shapes_and_tolerance() {
        let shape = |n: &str| {
            let c = class(n);
            (c.group_size(), c.data_cells(), c.parity_cells(), c.tolerated_failures())
        };
        assert_eq!(shape("S4"), (1, 1, 0, 0));
        assert_eq!(shape("SX"), (1, 1, 0, 0));
        assert_eq!(shape("RP_3G2"), (3, 1, 0, 2));
        assert_eq!(shape("EC_4P2G1"), (6, 4, 2, 2));
        assert_eq!(shape("EC_16P3GX"), (19, 16, 3, 3));
    }

    #[test]
    fn groups_in_pool() {
        assert_eq!(class("S4").groups_in(1000), 4);
        assert_eq!(class("SX").groups_in(1000), 1000);
        assert_eq!(class("RP_3GX").groups_in(1000), 333);
        assert_eq!(class("EC_4P2GX").groups_in(5), 1);
        assert_eq!(class("EC_4P2GX").groups_in(0), 1);
        assert_eq!(class("RP_2G7").groups_in(3), 7);
    }

    #[test]
    fn ids_are_stable() {
        // Ids are stored in OIDs: these values must never change.
        assert_eq!(class("S1").id(), 0x0040_0001);
        assert_eq!(class("SX").id(), 0x0040_0000);
        assert_eq!(class("RP_3GX").id(), 0x10c0_0000);
        assert_eq!(class("RP_2G1").id(), 0x1080_0001);
        assert_eq!(class("EC_4P2G1").id(), 0x2108_0001);
        assert_eq!(class("EC_16P3GX").id(), 0x240c_0000);
    }

    #[test]
    fn check_refuses_with_reason_and_alternatives() {
        assert!(class("RP_3G1").check(2, 3).is_ok());
        assert!(class("EC_4P2GX").check(2, 6).is_ok());
        assert!(class("S1").check(0, 1).is_ok());
        // Many fixed groups on a small pool wrap around; that is fine.
        assert!(class("RP_2G1000").check(1, 2).is_ok());

        let msg = class("RP_2G1").check(2, 6).expect_err("rd_fac").to_string();
        assert!(msg.contains("class RP_2G1 tolerates 1 server failure but the container's rd_fac is 2"), "{msg}");
        assert!(msg.contains("classes that fit: EC_4P2G1, RP_3G1"), "{msg}");

        let msg = class("EC_8P2G1").check(1, 6).expect_err("domains").to_string();
        assert!(msg.contains("class EC_8P2G1 needs 10 fault domains (servers) but the pool has 6"), "{msg}");
        assert!(msg.contains("classes that fit: EC_4P1G1, EC_4P2G1, RP_2G1"), "{msg}");

        let msg = class("EC_8P1GX").check(2, 6).expect_err("both").to_string();
        assert!(msg.contains("tolerates 1 server failure") && msg.contains("needs 9 fault domains"), "{msg}");
        assert!(msg.contains("classes that fit: EC_4P2GX, RP_3GX"), "{msg}");

        let msg = class("EC_4P1G1").check(0, 3).expect_err("rd_fac 0").to_string();
        assert!(msg.contains("classes that fit: EC_2P1G1, RP_2G1, S1"), "{msg}");

        let msg = class("RP_2G1").check(2, 2).expect_err("too few").to_string();
        assert!(msg.contains("rd_fac 2 needs at least 3 servers; the pool has 2"), "{msg}");

        let msg = class("RP_6G1").check(6, 10).expect_err("rd_fac 6").to_string();
        assert!(msg.contains("no class fits: rd_fac 6 is more than any class tolerates"), "{msg}");

        let msg = class("S1").check(0, 0).expect_err("empty pool").to_string();
        assert!(msg.contains("no servers in service"), "{msg}");

        // Every suggestion really fits.
        for rd_fac in 0..=5 {
            for domains in 0..=24 {
                for g in [Groups::Fixed(1), Groups::Fixed(40), Groups::Max] {
                    for c in fitting_classes(rd_fac, domains, g) {
                        assert!(c.check(rd_fac, domains).is_ok(), "{c} for rd_fac {rd_fac} on {domains}");
                    }
                }
            }
        }
    }

    #[test]
    fn auto_class_policy() {
        let auto = |r, d, ty| auto_class(r, d, ty).map(|(c, _)| c.to_string());
        assert_eq!(auto(0, 5, ObjType::Array).as_deref(), Ok("SX"));
        assert_eq!(auto(0, 5, ObjType::Kv).as_deref(), Ok("SX"));
        assert_eq!(auto(0, 5, ObjType::Multi).as_deref(), Ok("S1"));
        assert_eq!(auto(1, 6, ObjType::Array).as_deref(), Ok("EC_4P1GX"));
        assert_eq!(auto(2, 6, ObjType::Array).as_deref(), Ok("EC_4P2GX"));
        assert_eq!(auto(1, 3, ObjType::Array).as_deref(), Ok("EC_2P1GX"));
        assert_eq!(auto(1, 100, ObjType::Array).as_deref(), Ok("EC_16P1GX"));
        assert_eq!(auto(3, 11, ObjType::Array).as_deref(), Ok("EC_8P3GX"));
        assert_eq!(auto(2, 3, ObjType::Array).as_deref(), Ok("RP_3GX"));
        assert_eq!(auto(1, 2, ObjType::Array).as_deref(), Ok("RP_2GX"));
        assert_eq!(auto(4, 5, ObjType::Array).as_deref(), Ok("RP_5GX"));
        assert_eq!(auto(2, 100, ObjType::Kv).as_deref(), Ok("RP_3GX"));
        assert_eq!(auto(1, 100, ObjType::Multi).as_deref(), Ok("RP_2GX"));

        let err = auto_class(2, 2, ObjType::Array).expect_err("too few").to_string();
        assert!(err.contains("rd_fac 2 needs at least 3 servers; the pool has 2"), "{err}");
        assert!(auto_class(6, 100, ObjType::Kv).is_err());
        assert!(auto_class(0, 0, ObjType::Kv).is_err());

        let (_, why) = auto_class(2, 6, ObjType::Array).expect("fits");
        assert!(why.contains("EC_4P2GX") && why.contains("1.50x"), "{why}");

        // The choice always passes its own check.
        for rd_fac in 0..=6 {
            for domains in 0..=40 {
                for ty in [ObjType::Multi, ObjType::Kv, ObjType::Array] {
                    if let Ok((c, _)) = auto_class(rd_fac, domains, ty) {
                        assert!(c.check(rd_fac, domains).is_ok(), "{c} for rd_fac {rd_fac} on {domains}");
                    }
                }
            }
        }
    }

    #[test]
    fn serde_uses_ids_in_binary_and_names_in_text() {
        let c = class("EC_8P2G3");
        let bytes = postcard::to_stdvec(&c).expect("encode");
        assert_eq!(postcard::from_bytes::<ObjectClass>(&bytes), Ok(c));
        let zero = postcard::to_stdvec(&0u32).expect("encode");
        assert!(postcard::from_bytes::<ObjectClass>(&zero).is_err());

        let de: serde::de::value::StrDeserializer<'_, serde::de::value::Error> = "RP_3GX".into_deserializer();
        assert_eq!(ObjectClass::deserialize(de), Ok(class("RP_3GX")));
        let de: serde::de::value::StrDeserializer<'_, serde::de::value::Error> = "RP_1GX".into_deserializer();
        assert!(ObjectClass::deserialize(de).is_err());
    }

    #[test]
    fn obj_type_numbers_are_stable() {
        for (ty, n) in [(ObjType::Multi, 0), (ObjType::Kv, 1), (ObjType::Array, 2)] {
            assert_eq!(ty as u8, n);
            assert_eq!(ObjType::from_u8(n), Some(ty));
        }
        assert_eq!(ObjType::from_u8(3), None);
    }

    #[test]
    fn oid_layout_is_stable() {
        let oid = make_oid((0xab_cdef << 64) | 0x1234, class("RP_3GX"), ObjType::Array);
        assert_eq!(oid.hi, 0x0210_c000_00ab_cdef);
        assert_eq!(oid.lo, 0x1234);
        // Bits above the 88-bit sequence are dropped, never spilled into the class.
        let oid = make_oid(u128::MAX, ObjectClass::S1, ObjType::Kv);
        assert_eq!(oid_seq(oid), OID_SEQ_MAX);
        assert_eq!(oid_class(oid), Some(ObjectClass::S1));
        assert_eq!(oid_type(oid), Some(ObjType::Kv));
        assert_eq!(oid_class(Oid::new(0, 7)), None);
        assert_eq!(oid_type(Oid::new(u64::MAX, 7)), None);
    }

    fn any_valid_class() -> impl Strategy<Value = ObjectClass> {
        let groups = prop_oneof![Just(Groups::Max), (1..=MAX_FIXED_GROUPS).prop_map(Groups::Fixed)];
        (proptest::sample::select(all_redundancies()), groups, 1..=MAX_STRIPED_GROUPS).prop_map(|(r, g, s)| {
            match (r, g) {
                (Redundancy::None, Groups::Fixed(_)) => ObjectClass { redundancy: r, groups: Groups::Fixed(s) },
                _ => ObjectClass { redundancy: r, groups: g },
            }
        })
    }

    fn any_obj_type() -> impl Strategy<Value = ObjType> {
        proptest::sample::select(vec![ObjType::Multi, ObjType::Kv, ObjType::Array])
    }

    proptest! {
        #[test]
        fn oid_fields_round_trip(seq in 0..=OID_SEQ_MAX, c in any_valid_class(), ty in any_obj_type()) {
            let oid = make_oid(seq, c, ty);
            prop_assert_eq!(oid_seq(oid), seq);
            prop_assert_eq!(oid_class(oid), Some(c));
            prop_assert_eq!(oid_type(oid), Some(ty));
        }

        #[test]
        fn any_id_that_decodes_re_encodes(id in any::<u32>()) {
            if let Some(c) = ObjectClass::from_id(id) {
                prop_assert_eq!(c.id(), id);
            }
        }

        #[test]
        fn any_name_that_parses_prints_back(s in "(S|SX|RP_|EC_)?[0-9PGX_]{0,8}") {
            if let Ok(c) = s.parse::<ObjectClass>() {
                prop_assert_eq!(c.to_string(), s);
            }
        }
    }
}
