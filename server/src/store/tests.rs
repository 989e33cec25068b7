//! Store tests: a proptest conformance run against a `BTreeMap` model, and
//! checksum, space and poison behaviour.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

type Key = Vec<u8>;
/// Versions of an array value: (epoch, first byte, bytes).
type Extents = Vec<(Epoch, u64, Vec<u8>)>;

const CONT: ContId = ContId(0x5eed);

/// A store whose mutations get their checksums filled in, as a client
/// computes them.
struct Store(TargetStore);

impl std::ops::Deref for Store {
    type Target = TargetStore;
    fn deref(&self) -> &TargetStore {
        &self.0
    }
}

/// Fills in each iod's crc32c from its data.
fn crcs(m: Mutation) -> Mutation {
    match m {
        Mutation::Update { cont, oid, dkey, epoch, mut iods, data } => {
            for (i, d) in iods.iter_mut().zip(&data) {
                i.crc = crc32c::crc32c(d);
            }
            Mutation::Update { cont, oid, dkey, epoch, iods, data }
        }
        other => other,
    }
}

impl Store {
    fn apply(&self, m: Mutation) -> Result<Epoch> {
        self.0.apply(crcs(m))
    }

    fn submit(&self, m: Mutation) -> oneshot::Receiver<Result<Epoch>> {
        self.0.submit(crcs(m))
    }

    fn close(self) {
        self.0.close()
    }
}

fn opts(inline: usize) -> StoreOptions {
    StoreOptions { inline_threshold: inline, reserve_bytes: 0, max_group: 8, ..StoreOptions::default() }
}

fn open(dir: &Path, inline: usize) -> Store {
    Store(TargetStore::open(dir, 0, opts(inline)).unwrap())
}

/// The reference model: every version of every value, and every punch.
#[derive(Default)]
struct Model {
    singles: BTreeMap<(Oid, Key, Key), BTreeMap<Epoch, Vec<u8>>>,
    extents: BTreeMap<(Oid, Key, Key), Extents>,
    punches: Vec<(Oid, Epoch, Option<Key>, Option<Key>)>,
}

impl Model {
    fn floor(&self, oid: Oid, d: &[u8], a: &[u8], e: Epoch) -> Epoch {
        self.punches
            .iter()
            .filter(|(o, pe, pd, pa)| {
                *o == oid && *pe <= e && pd.as_deref().is_none_or(|x| x == d) && pa.as_deref().is_none_or(|x| x == a)
            })
            .map(|p| p.1)
            .max()
            .unwrap_or(0)
    }

    /// The newest single version of a value (0 when none).
    fn newest_single(&self, oid: Oid, d: &[u8], a: &[u8]) -> Epoch {
        self.singles.get(&(oid, d.to_vec(), a.to_vec())).and_then(|v| v.keys().next_back().copied()).unwrap_or(0)
    }

    /// The newest extent of a value overlapping [s, e) (0 when none).
    fn newest_extent(&self, oid: Oid, d: &[u8], a: &[u8], s: u64, e: u64) -> Epoch {
        self.extents
            .get(&(oid, d.to_vec(), a.to_vec()))
            .into_iter()
            .flatten()
            .filter(|(_, st, v)| *st < e && st + v.len() as u64 > s)
            .map(|x| x.0)
            .max()
            .unwrap_or(0)
    }

    /// The newest epoch of any update of the object (0 when none).
    fn object_newest(&self, oid: Oid) -> Epoch {
        let singles = self.singles.iter().filter(|(k, _)| k.0 == oid).flat_map(|(_, v)| v.keys().copied());
        let extents = self.extents.iter().filter(|(k, _)| k.0 == oid).flat_map(|(_, v)| v.iter().map(|x| x.0));
        singles.chain(extents).max().unwrap_or(0)
    }

    fn single(&self, oid: Oid, d: &[u8], a: &[u8], e: Epoch) -> Option<Vec<u8>> {
        let f = self.floor(oid, d, a, e);
        let versions = self.singles.get(&(oid, d.to_vec(), a.to_vec()))?;
        let (ve, v) = versions.range(..=e).next_back()?;
        (*ve > f).then(|| v.clone())
    }

    fn array(&self, oid: Oid, d: &[u8], a: &[u8], e: Epoch, s: u64, len: u64) -> Option<Vec<u8>> {
        let f = self.floor(oid, d, a, e);
        let mut out = vec![0u8; len as usize];
        let mut best = vec![0u64; len as usize];
        for (ve, start, data) in self.extents.get(&(oid, d.to_vec(), a.to_vec()))? {
            if *ve > e || *ve <= f {
                continue;
            }
            for (i, b) in data.iter().enumerate() {
                let pos = start + i as u64;
                if pos >= s && pos < s + len && *ve > best[(pos - s) as usize] {
                    best[(pos - s) as usize] = *ve;
                    out[(pos - s) as usize] = *b;
                }
            }
        }
        best.iter().any(|b| *b > 0).then_some(out)
    }

    fn akey_visible(&self, oid: Oid, d: &[u8], a: &[u8], e: Epoch) -> bool {
        let f = self.floor(oid, d, a, e);
        let k = (oid, d.to_vec(), a.to_vec());
        let single = self.singles.get(&k).and_then(|v| v.range(..=e).next_back()).is_some_and(|(ve, _)| *ve > f);
        let ext = self.extents.get(&k).is_some_and(|v| v.iter().any(|(ve, _, _)| *ve <= e && *ve > f));
        single || ext
    }

    fn all_keys(&self, oid: Oid) -> Vec<(Key, Key)> {
        let mut keys: Vec<(Key, Key)> = self
            .singles
            .keys()
            .chain(self.extents.keys())
            .filter(|k| k.0 == oid)
            .map(|k| (k.1.clone(), k.2.clone()))
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }

    fn list(&self, oid: Oid, e: Epoch, dkey: Option<&[u8]>) -> Vec<Key> {
        let mut out: Vec<Key> = self
            .all_keys(oid)
            .into_iter()
            .filter(|(d, a)| dkey.is_none_or(|x| x == d.as_slice()) && self.akey_visible(oid, d, a, e))
            .map(|(d, a)| if dkey.is_some() { a } else { d })
            .collect();
        out.sort_by(|x, y| (x.len(), x).cmp(&(y.len(), y)));
        out.dedup();
        out
    }
}

#[derive(Debug, Clone)]
enum Op {
    Single { oid: u64, d: Key, a: Key, epoch: Epoch, val: Vec<u8> },
    Array { oid: u64, d: Key, a: Key, epoch: Epoch, start: u64, val: Vec<u8> },
    Punch { oid: u64, epoch: Epoch, d: Option<Key>, a: Option<Key> },
    ReadSingle { oid: u64, d: Key, a: Key, epoch: Epoch },
    ReadArray { oid: u64, d: Key, a: Key, epoch: Epoch, start: u64, len: u64 },
    List { oid: u64, epoch: Epoch, d: Option<Key>, page: usize },
    Reopen,
}

fn key(pool: &'static [&'static str]) -> impl Strategy<Value = Key> {
    prop::sample::select(pool).prop_map(|s| s.as_bytes().to_vec())
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..64, (BUCKET_BYTES - 40)..(BUCKET_BYTES + 40)]
}

fn read_epoch() -> impl Strategy<Value = Epoch> {
    prop_oneof![1u64..300, Just(EPOCH_MAX_)]
}

const EPOCH_MAX_: Epoch = shoal_common::EPOCH_MAX;
const DKEYS: &[&str] = &["a", "b", "cc", "d"];
const AKEYS: &[&str] = &["x", "yy", "z"];

fn op() -> impl Strategy<Value = Op> {
    let val = prop::collection::vec(any::<u8>(), 0..40);
    let arr = prop::collection::vec(any::<u8>(), 1..60);
    prop_oneof![
        4 => (0u64..2, key(DKEYS), key(AKEYS), 1u64..300, val)
            .prop_map(|(oid, d, a, epoch, val)| Op::Single { oid, d, a, epoch, val }),
        4 => (0u64..2, key(DKEYS), key(AKEYS), 1u64..300, offset(), arr)
            .prop_map(|(oid, d, a, epoch, start, val)| Op::Array { oid, d, a, epoch, start, val }),
        1 => (0u64..2, 1u64..300, prop::option::of(key(DKEYS)), prop::option::of(key(AKEYS)))
            .prop_map(|(oid, epoch, d, a)| Op::Punch { oid, epoch, a: if d.is_some() { a } else { None }, d }),
        3 => (0u64..2, key(DKEYS), key(AKEYS), read_epoch())
            .prop_map(|(oid, d, a, epoch)| Op::ReadSingle { oid, d, a, epoch }),
        3 => (0u64..2, key(DKEYS), key(AKEYS), read_epoch(), offset(), 1u64..80)
            .prop_map(|(oid, d, a, epoch, start, len)| Op::ReadArray { oid, d, a, epoch, start, len }),
        2 => (0u64..2, read_epoch(), prop::option::of(key(DKEYS)), 1usize..4)
            .prop_map(|(oid, epoch, d, page)| Op::List { oid, epoch, d, page }),
        1 => Just(Op::Reopen),
    ]
}

fn list_all(s: &TargetStore, oid: Oid, e: Epoch, d: Option<&[u8]>, page: usize) -> Vec<Key> {
    let mut out = Vec::new();
    let mut anchor: Option<Key> = None;
    loop {
        let (keys, next) = s.list(CONT, oid, e, d, anchor.as_deref(), page, usize::MAX).unwrap();
        out.extend(keys);
        match next {
            Some(a) => anchor = Some(a),
            None => return out,
        }
    }
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Some(open(dir.path(), 16));
    let mut model = Model::default();
    let mut used = std::collections::HashSet::new();
    for op in ops {
        let s = store.as_ref().unwrap();
        match op {
            Op::Single { oid, d, a, epoch, val } => {
                if !used.insert(epoch) {
                    continue;
                }
                let iods = vec![UpdateIod { akey: a.clone(), kind: ValueKind::Single, crc: 0, cond: None }];
                let oid = Oid::new(0, oid);
                let r = s.apply(Mutation::Update {
                    cont: CONT,
                    oid,
                    dkey: d.clone(),
                    epoch,
                    iods,
                    data: vec![Bytes::from(val.clone())],
                });
                let newest = model.newest_single(oid, &d, &a).max(model.floor(oid, &d, &a, EPOCH_MAX_));
                if newest >= epoch {
                    assert!(matches!(r, Err(ShoalError::Conflict { .. })), "single at {epoch} over {newest}: {r:?}");
                    continue;
                }
                r.unwrap();
                model.singles.entry((oid, d, a)).or_default().insert(epoch, val);
            }
            Op::Array { oid, d, a, epoch, start, val } => {
                if !used.insert(epoch) {
                    continue;
                }
                let kind = ValueKind::Array { rec_size: 1, start, nr: val.len() as u64 };
                let iods = vec![UpdateIod { akey: a.clone(), kind, crc: 0, cond: None }];
                let oid = Oid::new(0, oid);
                let r = s.apply(Mutation::Update {
                    cont: CONT,
                    oid,
                    dkey: d.clone(),
                    epoch,
                    iods,
                    data: vec![Bytes::from(val.clone())],
                });
                let newest = model
                    .newest_extent(oid, &d, &a, start, start + val.len() as u64)
                    .max(model.floor(oid, &d, &a, EPOCH_MAX_));
                if newest >= epoch {
                    assert!(matches!(r, Err(ShoalError::Conflict { .. })), "extent at {epoch} over {newest}: {r:?}");
                    continue;
                }
                r.unwrap();
                model.extents.entry((oid, d, a)).or_default().push((epoch, start, val));
            }
            Op::Punch { oid, epoch, d, a } => {
                if !used.insert(epoch) {
                    continue;
                }
                let oid = Oid::new(0, oid);
                let r = s.apply(Mutation::Punch { cont: CONT, oid, epoch, dkey: d.clone(), akey: a.clone() });
                let newest = model.object_newest(oid);
                if newest >= epoch {
                    assert!(matches!(r, Err(ShoalError::Conflict { .. })), "punch at {epoch} over {newest}: {r:?}");
                    continue;
                }
                r.unwrap();
                model.punches.push((oid, epoch, d, a));
            }
            Op::ReadSingle { oid, d, a, epoch } => {
                let oid = Oid::new(0, oid);
                let (f, data, crcs) =
                    s.fetch(CONT, oid, &d, epoch, &[FetchIod { akey: a.clone(), kind: ValueKind::Single }]).unwrap();
                assert_eq!(crcs[0], crc32c::crc32c(&data[0]), "reply checksum");
                let got = match f[0] {
                    Fetched::Missing | Fetched::Punched { .. } => None,
                    _ => Some(data[0].to_vec()),
                };
                assert_eq!(got, model.single(oid, &d, &a, epoch), "single {d:?}/{a:?} at {epoch}");
            }
            Op::ReadArray { oid, d, a, epoch, start, len } => {
                let oid = Oid::new(0, oid);
                let kind = ValueKind::Array { rec_size: 1, start, nr: len };
                let (f, data, crcs) = s.fetch(CONT, oid, &d, epoch, &[FetchIod { akey: a.clone(), kind }]).unwrap();
                assert_eq!(crcs[0], crc32c::crc32c(&data[0]), "reply checksum");
                let got = match f[0] {
                    Fetched::Missing | Fetched::Punched { .. } => None,
                    _ => Some(data[0].to_vec()),
                };
                assert_eq!(got, model.array(oid, &d, &a, epoch, start, len), "array {d:?}/{a:?} at {epoch}");
            }
            Op::List { oid, epoch, d, page } => {
                let oid = Oid::new(0, oid);
                assert_eq!(list_all(s, oid, epoch, d.as_deref(), page), model.list(oid, epoch, d.as_deref()));
            }
            Op::Reopen => {
                store.take().unwrap().close();
                store = Some(open(dir.path(), 16));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_the_model(ops in prop::collection::vec(op(), 1..120)) {
        run(ops);
    }
}

#[test]
fn a_corrupted_data_file_gives_a_checksum_error() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 16);
    let val = Bytes::from(vec![7u8; 4096]);
    let iods = vec![UpdateIod { akey: b"a".to_vec(), kind: ValueKind::Single, crc: 0, cond: None }];
    s.apply(Mutation::Update { cont: CONT, oid: Oid::new(0, 1), dkey: b"d".to_vec(), epoch: 5, iods, data: vec![val] })
        .unwrap();
    let file = dir.path().join("data/00000000.dat");
    let mut raw = std::fs::read(&file).unwrap();
    raw[100] ^= 0xff;
    std::fs::write(&file, raw).unwrap();
    let r =
        s.fetch(CONT, Oid::new(0, 1), b"d", EPOCH_MAX_, &[FetchIod { akey: b"a".to_vec(), kind: ValueKind::Single }]);
    assert!(matches!(r, Err(ShoalError::Checksum(_))), "{r:?}");
}

#[test]
fn a_write_that_does_not_fit_is_refused_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store(
        TargetStore::open(dir.path(), 0, StoreOptions { reserve_bytes: u64::MAX / 2, ..StoreOptions::default() })
            .unwrap(),
    );
    let iods = vec![UpdateIod { akey: b"a".to_vec(), kind: ValueKind::Single, crc: 0, cond: None }];
    let r = s.apply(Mutation::Update {
        cont: CONT,
        oid: Oid::new(0, 1),
        dkey: b"d".to_vec(),
        epoch: 5,
        iods,
        data: vec![Bytes::from_static(b"v")],
    });
    assert!(matches!(r, Err(ShoalError::NoSpace(_))), "{r:?}");
    let (f, _, _) = s
        .fetch(CONT, Oid::new(0, 1), b"d", EPOCH_MAX_, &[FetchIod { akey: b"a".to_vec(), kind: ValueKind::Single }])
        .unwrap();
    assert_eq!(f[0], Fetched::Missing);
    assert!(!s.is_poisoned());
}

#[test]
fn overlapping_extents_in_one_update_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 16);
    let kind = ValueKind::Array { rec_size: 1, start: 0, nr: 4 };
    let iods = vec![
        UpdateIod { akey: b"a".to_vec(), kind, crc: 0, cond: None },
        UpdateIod { akey: b"a".to_vec(), kind, crc: 0, cond: None },
    ];
    let data = vec![Bytes::from_static(b"abcd"), Bytes::from_static(b"efgh")];
    let r = s.apply(Mutation::Update { cont: CONT, oid: Oid::new(0, 1), dkey: b"d".to_vec(), epoch: 5, iods, data });
    assert!(matches!(r, Err(ShoalError::InvalidArgument(_))), "{r:?}");
}

#[test]
fn max_u64_values_only_grow_even_within_one_group() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 16);
    let put = |epoch: Epoch, v: u64| {
        let iods = vec![UpdateIod { akey: b"size".to_vec(), kind: ValueKind::MaxU64, crc: 0, cond: None }];
        let data = vec![Bytes::copy_from_slice(&v.to_le_bytes())];
        s.submit(Mutation::Update { cont: CONT, oid: Oid::new(0, 1), dkey: b"m".to_vec(), epoch, iods, data })
    };
    // Submitted together so that they likely share a group commit.
    let rx: Vec<_> = [(1, 50), (2, 70), (3, 60)].into_iter().map(|(e, v)| put(e, v)).collect();
    for r in rx {
        r.blocking_recv().unwrap().unwrap();
    }
    let get = || {
        let (f, d, _) = s
            .fetch(
                CONT,
                Oid::new(0, 1),
                b"m",
                EPOCH_MAX_,
                &[FetchIod { akey: b"size".to_vec(), kind: ValueKind::MaxU64 }],
            )
            .unwrap();
        assert_ne!(f[0], Fetched::Missing);
        u64::from_le_bytes(d[0][..].try_into().unwrap())
    };
    assert_eq!(get(), 70);
    // A plain single value may lower it (truncation); max applies from there.
    let iods = vec![UpdateIod { akey: b"size".to_vec(), kind: ValueKind::Single, crc: 0, cond: None }];
    s.apply(Mutation::Update {
        cont: CONT,
        oid: Oid::new(0, 1),
        dkey: b"m".to_vec(),
        epoch: 4,
        iods,
        data: vec![Bytes::copy_from_slice(&10u64.to_le_bytes())],
    })
    .unwrap();
    assert_eq!(get(), 10);
    put(5, 5).blocking_recv().unwrap().unwrap();
    assert_eq!(get(), 10);
    // A larger value stamped with an older epoch than the newest version
    // still shows in the latest read.
    put(3, 99).blocking_recv().unwrap().unwrap();
    assert_eq!(get(), 99);

    // A truncation and a smaller max submitted together: the max reads the
    // truncated value, not the one before it.
    let iods = vec![UpdateIod { akey: b"size".to_vec(), kind: ValueKind::Single, crc: 0, cond: None }];
    let cut = s.submit(Mutation::Update {
        cont: CONT,
        oid: Oid::new(0, 1),
        dkey: b"m".to_vec(),
        epoch: 10,
        iods,
        data: vec![Bytes::copy_from_slice(&20u64.to_le_bytes())],
    });
    let raise = put(11, 30);
    cut.blocking_recv().unwrap().unwrap();
    raise.blocking_recv().unwrap().unwrap();
    assert_eq!(get(), 30);
    // And after a punch in the same group, the max starts from nothing.
    let gone = s.submit(Mutation::Punch { cont: CONT, oid: Oid::new(0, 1), epoch: 12, dkey: None, akey: None });
    let raise = put(13, 7);
    gone.blocking_recv().unwrap().unwrap();
    raise.blocking_recv().unwrap().unwrap();
    assert_eq!(get(), 7);
}

#[cfg(feature = "failpoints")]
#[test]
fn a_failed_fdatasync_poisons_the_target() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 16);
    let write = |epoch: Epoch| {
        let iods = vec![UpdateIod { akey: b"a".to_vec(), kind: ValueKind::Single, crc: 0, cond: None }];
        s.apply(Mutation::Update {
            cont: CONT,
            oid: Oid::new(0, 1),
            dkey: b"d".to_vec(),
            epoch,
            iods,
            data: vec![Bytes::from(vec![1u8; 100])],
        })
    };
    write(1).unwrap();
    fail::cfg("store::data_sync", "return").unwrap();
    assert_eq!(write(2), Err(ShoalError::Poisoned(0)));
    fail::remove("store::data_sync");
    assert_eq!(write(3), Err(ShoalError::Poisoned(0)), "poison must stick");
    let r =
        s.fetch(CONT, Oid::new(0, 1), b"d", EPOCH_MAX_, &[FetchIod { akey: b"a".to_vec(), kind: ValueKind::Single }]);
    assert_eq!(r, Err(ShoalError::Poisoned(0)));
    drop(s);
    // A restart replays and serves what was acknowledged.
    let s = open(dir.path(), 16);
    let (f, _, _) = s
        .fetch(CONT, Oid::new(0, 1), b"d", EPOCH_MAX_, &[FetchIod { akey: b"a".to_vec(), kind: ValueKind::Single }])
        .unwrap();
    assert_eq!(f[0], Fetched::Single { epoch: 1 });
    scenario.teardown();
}

/// Writes `data` as an extent at `start` of ("d", "a") of object 1.
fn put_extent(s: &Store, epoch: Epoch, start: u64, data: Vec<u8>) -> Result<Epoch> {
    let kind = ValueKind::Array { rec_size: 1, start, nr: data.len() as u64 };
    let iods = vec![UpdateIod { akey: b"a".to_vec(), kind, crc: 0, cond: None }];
    s.apply(Mutation::Update {
        cont: CONT,
        oid: Oid::new(0, 1),
        dkey: b"d".to_vec(),
        epoch,
        iods,
        data: vec![Bytes::from(data)],
    })
}

fn read_extent(s: &TargetStore, epoch: Epoch, start: u64, len: u64) -> Vec<u8> {
    let kind = ValueKind::Array { rec_size: 1, start, nr: len };
    let (f, d, _) = s.fetch(CONT, Oid::new(0, 1), b"d", epoch, &[FetchIod { akey: b"a".to_vec(), kind }]).unwrap();
    match f[0] {
        Fetched::Array { .. } => d[0].to_vec(),
        _ => vec![0; len as usize],
    }
}

#[test]
fn aggregation_keeps_what_reads_at_the_horizon_see_and_gives_space_back() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 16);
    for e in 1..=40u64 {
        put_extent(&s, e, 0, vec![e as u8; 256 << 10]).unwrap();
    }
    // A newer version of part of the range, past the horizon.
    put_extent(&s, 100, 1000, vec![0xee; 10]).unwrap();
    let before = s.usage().data_bytes;
    assert!(before >= 40 * (256 << 10), "{before}");
    let stats = s.aggregate(50).unwrap();
    assert_eq!(stats.removed, 39, "{stats:?}");
    let after = s.usage().data_bytes;
    assert!(after < before / 10, "{before} -> {after}");
    // Reads at and after the horizon see what they saw before.
    let mut want = vec![40u8; 256 << 10];
    assert_eq!(read_extent(&s, 50, 0, 256 << 10), want);
    want[1000..1010].fill(0xee);
    assert_eq!(read_extent(&s, EPOCH_MAX_, 0, 256 << 10), want);
    // A second pass has nothing left to do; the data survives a reopen.
    assert_eq!(s.aggregate(50).unwrap().removed, 0);
    s.close();
    let s = open(dir.path(), 16);
    assert_eq!(read_extent(&s, EPOCH_MAX_, 0, 256 << 10), want);
}

fn lossy_opts(fs: &lossy::LossyFs) -> StoreOptions {
    StoreOptions { file_roll_bytes: 32 << 10, vfs: Arc::new(fs.clone()), ..opts(16) }
}

/// Power cuts at random points of random workloads: after each, every
/// acknowledged update reads back, and nothing else is visible, even when
/// the cut lost a data file's name or its unsynced bytes.
#[test]
fn acknowledged_updates_survive_power_cuts_at_random_points() {
    use rand::{Rng, SeedableRng};
    for seed in 0..24u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let dir = tempfile::tempdir().unwrap();
        let fs = lossy::LossyFs::new();
        let mut model = Model::default();
        let mut epoch = 0u64;
        for round in 0..3 {
            let s = Store(TargetStore::open(dir.path(), 0, lossy_opts(&fs)).unwrap());
            let cut_at = rng.random_range(0..60u64);
            let mut n = 0;
            'work: loop {
                if n == cut_at {
                    fs.cut_after(rng.random_range(0..6));
                }
                let batch: Vec<(Mutation, Op)> = (0..rng.random_range(1..6))
                    .map(|_| {
                        epoch += 1;
                        let oid = rng.random_range(0..2u64);
                        let d = DKEYS[rng.random_range(0..DKEYS.len())].as_bytes().to_vec();
                        let a = AKEYS[rng.random_range(0..AKEYS.len())].as_bytes().to_vec();
                        match rng.random_range(0..10) {
                            0 => (
                                Mutation::Punch {
                                    cont: CONT,
                                    oid: Oid::new(0, oid),
                                    epoch,
                                    dkey: Some(d.clone()),
                                    akey: None,
                                },
                                Op::Punch { oid, epoch, d: Some(d), a: None },
                            ),
                            1..=2 => {
                                let val: Vec<u8> = (0..rng.random_range(0..40)).map(|_| rng.random()).collect();
                                let iods =
                                    vec![UpdateIod { akey: a.clone(), kind: ValueKind::Single, crc: 0, cond: None }];
                                (
                                    Mutation::Update {
                                        cont: CONT,
                                        oid: Oid::new(0, oid),
                                        dkey: d.clone(),
                                        epoch,
                                        iods,
                                        data: vec![Bytes::from(val.clone())],
                                    },
                                    Op::Single { oid, d, a, epoch, val },
                                )
                            }
                            _ => {
                                let start = rng.random_range(0..20_000u64);
                                let val: Vec<u8> = (0..rng.random_range(1..12_000)).map(|_| rng.random()).collect();
                                let kind = ValueKind::Array { rec_size: 1, start, nr: val.len() as u64 };
                                let iods = vec![UpdateIod { akey: a.clone(), kind, crc: 0, cond: None }];
                                (
                                    Mutation::Update {
                                        cont: CONT,
                                        oid: Oid::new(0, oid),
                                        dkey: d.clone(),
                                        epoch,
                                        iods,
                                        data: vec![Bytes::from(val.clone())],
                                    },
                                    Op::Array { oid, d, a, epoch, start, val },
                                )
                            }
                        }
                    })
                    .collect();
                let (ms, ops): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                let rx: Vec<_> = ms.into_iter().map(|m| s.submit(m)).collect();
                let mut failed = false;
                for (r, op) in rx.into_iter().zip(ops) {
                    match r.blocking_recv().unwrap() {
                        Ok(_) => match op {
                            Op::Single { oid, d, a, epoch, val } => {
                                model.singles.entry((Oid::new(0, oid), d, a)).or_default().insert(epoch, val);
                            }
                            Op::Array { oid, d, a, epoch, start, val } => {
                                model.extents.entry((Oid::new(0, oid), d, a)).or_default().push((epoch, start, val));
                            }
                            Op::Punch { oid, epoch, d, a } => model.punches.push((Oid::new(0, oid), epoch, d, a)),
                            _ => unreachable!(),
                        },
                        Err(_) => failed = true,
                    }
                }
                n += 1;
                if failed {
                    // Only the power cut fails writes here (a failed append
                    // fails its update; a failed sync poisons the target).
                    assert!(n > cut_at, "seed {seed}: a write failed before the power cut");
                    break 'work;
                }
                if n > cut_at + 40 {
                    break 'work;
                }
            }
            s.close();
            fs.crash();
            // Back on: everything acknowledged reads back, nothing else shows.
            let s = TargetStore::open(dir.path(), 0, lossy_opts(&fs)).unwrap();
            for oid in 0..2u64 {
                let oid = Oid::new(0, oid);
                for d in DKEYS {
                    for a in AKEYS {
                        let (d, a) = (d.as_bytes(), a.as_bytes());
                        let iod = FetchIod { akey: a.to_vec(), kind: ValueKind::Single };
                        let (f, data, _) = s.fetch(CONT, oid, d, EPOCH_MAX_, &[iod]).unwrap();
                        let got = matches!(f[0], Fetched::Single { .. }).then(|| data[0].to_vec());
                        assert_eq!(
                            got,
                            model.single(oid, d, a, EPOCH_MAX_),
                            "seed {seed} round {round}: single {d:?}/{a:?}"
                        );
                        let kind = ValueKind::Array { rec_size: 1, start: 0, nr: 32_000 };
                        let (f, data, _) = s
                            .fetch(CONT, oid, d, EPOCH_MAX_, &[FetchIod { akey: a.to_vec(), kind }])
                            .unwrap_or_else(|e| panic!("seed {seed} round {round}: extent {d:?}/{a:?}: {e}"));
                        let got = matches!(f[0], Fetched::Array { .. }).then(|| data[0].to_vec());
                        let want = model.array(oid, d, a, EPOCH_MAX_, 0, 32_000);
                        assert!(got == want, "seed {seed} round {round}: extent {d:?}/{a:?} differs");
                    }
                }
            }
            s.close();
        }
        assert!(fs.file_count() > 1, "seed {seed}: the workload never rolled over to a new data file");
    }
}

#[test]
fn a_failed_directory_sync_poisons_and_a_new_file_is_never_pointed_into_before_its_name_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let fs = lossy::LossyFs::new();
    let s = Store(TargetStore::open(dir.path(), 0, lossy_opts(&fs)).unwrap());
    let mut e = 0;
    let mut put = |s: &Store| {
        e += 1;
        put_extent(s, e, e * 100, vec![e as u8; 20 << 10])
    };
    put(&s).unwrap();
    put(&s).unwrap(); // the first file is full now
    fs.fail_next_dir_sync();
    // The next write rolls over to a new file, whose name cannot be made
    // durable: the target poisons rather than acknowledge.
    assert_eq!(put(&s), Err(ShoalError::Poisoned(0)));
    assert_eq!(put(&s), Err(ShoalError::Poisoned(0)), "poison sticks");
    s.close();
    fs.crash();
    let s = Store(TargetStore::open(dir.path(), 0, lossy_opts(&fs)).unwrap());
    assert_eq!(read_extent(&s, EPOCH_MAX_, 200, 10), vec![2u8; 10]);
    // Writing on rolls over again and syncs the name before committing.
    put(&s).unwrap();
    put(&s).unwrap();
    s.close();
    fs.crash();
    let s = TargetStore::open(dir.path(), 0, lossy_opts(&fs)).unwrap();
    assert_eq!(read_extent(&s, EPOCH_MAX_, 500, 10), vec![5u8; 10]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Aggregation at a horizon changes no read at or after it.
    #[test]
    fn aggregation_changes_no_read_at_or_after_the_horizon(
        ops in prop::collection::vec(op(), 1..80),
        horizon in 1u64..300,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 16);
        let mut used = std::collections::HashSet::new();
        for op in ops {
            let m = match op {
                Op::Single { oid, d, a, epoch, val } if used.insert(epoch) => Mutation::Update {
                    cont: CONT,
                    oid: Oid::new(0, oid),
                    dkey: d,
                    epoch,
                    iods: vec![UpdateIod { akey: a, kind: ValueKind::Single, crc: 0, cond: None }],
                    data: vec![Bytes::from(val)],
                },
                Op::Array { oid, d, a, epoch, start, val } if used.insert(epoch) => Mutation::Update {
                    cont: CONT,
                    oid: Oid::new(0, oid),
                    dkey: d,
                    epoch,
                    iods: vec![UpdateIod {
                        akey: a,
                        kind: ValueKind::Array { rec_size: 1, start, nr: val.len() as u64 },
                        crc: 0,
                        cond: None,
                    }],
                    data: vec![Bytes::from(val)],
                },
                Op::Punch { oid, epoch, d, a } if used.insert(epoch) => {
                    Mutation::Punch { cont: CONT, oid: Oid::new(0, oid), epoch, dkey: d, akey: a }
                }
                _ => continue,
            };
            // Refused (out-of-order) updates are simply not there.
            let _ = s.apply(m);
        }
        let snapshot = |s: &TargetStore| -> Vec<Vec<u8>> {
            let mut out = Vec::new();
            for oid in 0..2u64 {
                for d in DKEYS {
                    for a in AKEYS {
                        for e in [horizon, horizon + 7, horizon + 50, EPOCH_MAX_] {
                            let (f, data, _) = s
                                .fetch(CONT, Oid::new(0, oid), d.as_bytes(), e, &[FetchIod { akey: a.as_bytes().to_vec(), kind: ValueKind::Single }])
                                .unwrap();
                            out.push(format!("{:?}", f[0].clone()).into_bytes());
                            out.push(data[0].to_vec());
                            let kind = ValueKind::Array { rec_size: 1, start: 0, nr: 300 };
                            let (f, data, _) =
                                s.fetch(CONT, Oid::new(0, oid), d.as_bytes(), e, &[FetchIod { akey: a.as_bytes().to_vec(), kind }]).unwrap();
                            out.push(vec![matches!(f[0], Fetched::Array { .. }) as u8]);
                            out.push(data[0].to_vec());
                        }
                    }
                }
            }
            out
        };
        let before = snapshot(&s);
        s.aggregate(horizon).unwrap();
        prop_assert!(snapshot(&s) == before);
    }
}

#[test]
fn ec_cells_are_aggregated_only_beneath_stable_versions() {
    use shoal_common::oclass::{make_oid, ObjType};
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 16);
    let oid = make_oid(20, "EC_4P2G1".parse().unwrap(), ObjType::Array);
    let put = |epoch: Epoch, byte: u8| {
        let kind = ValueKind::Array { rec_size: 1, start: 0, nr: 8192 };
        let iods = vec![UpdateIod { akey: b"a".to_vec(), kind, crc: 0, cond: None }];
        s.apply(Mutation::Update {
            cont: CONT,
            oid,
            dkey: b"d".to_vec(),
            epoch,
            iods,
            data: vec![Bytes::from(vec![byte; 8192])],
        })
        .unwrap();
    };
    let read = |epoch: Epoch| {
        let kind = ValueKind::Array { rec_size: 1, start: 0, nr: 8192 };
        let (f, d, _) = s.fetch(CONT, oid, b"d", epoch, &[FetchIod { akey: b"a".to_vec(), kind }]).unwrap();
        (f[0].clone(), d[0].first().copied())
    };
    put(10, 1);
    put(20, 2);
    // A punch that reached only some cells (never marked stable).
    s.apply(Mutation::Punch { cont: CONT, oid, epoch: 30, dkey: Some(b"d".to_vec()), akey: None }).unwrap();
    s.aggregate(100).unwrap();
    // A reader falling back beneath the punch still finds the last write.
    assert_eq!(read(29).1, Some(2), "the version under an unconfirmed punch must stay");
    assert_eq!(read(19).1, Some(1), "and so must what the unconfirmed write at 20 covers");
    // Once write 20 is confirmed stable, what it covers may go.
    s.mark_stable(CONT, oid, Some(b"d"), 20).unwrap();
    let st = s.aggregate(100).unwrap();
    assert_eq!(st.removed, 1, "{st:?}");
    assert_eq!(read(29).1, Some(2));
    // Once the punch is confirmed, everything beneath it goes.
    s.mark_stable(CONT, oid, Some(b"d"), 30).unwrap();
    let st = s.aggregate(100).unwrap();
    assert_eq!(st.removed, 1, "{st:?}");
    assert!(matches!(read(100).0, Fetched::Punched { epoch: 30 }));
}

/// Dropping the shards of some dkeys of an object (they live elsewhere
/// now) removes exactly those and gives their space back; dropping the
/// whole object removes it from the object index too.
#[test]
fn dropped_shards_are_gone_and_their_space_given_back() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 16);
    let oid = Oid::new(0, 1);
    for (e, dkey) in [(1u64, b"d"), (2, b"e")] {
        let iods = vec![UpdateIod {
            akey: b"a".to_vec(),
            kind: ValueKind::Array { rec_size: 1, start: 0, nr: 4096 },
            crc: 0,
            cond: None,
        }];
        let data = vec![Bytes::from(vec![e as u8; 4096])];
        s.apply(crcs(Mutation::Update { cont: CONT, oid, dkey: dkey.to_vec(), epoch: e, iods, data })).unwrap();
    }
    s.apply(Mutation::Punch { cont: CONT, oid, dkey: Some(b"d".to_vec()), akey: Some(b"x".to_vec()), epoch: 3 })
        .unwrap();
    assert_eq!(s.dkeys_of(CONT, oid).unwrap(), vec![b"d".to_vec(), b"e".to_vec()]);
    let freed = s.drop_shards(CONT, oid, Some(&[b"d".to_vec()])).unwrap();
    assert_eq!(freed, 4096);
    assert_eq!(s.dkeys_of(CONT, oid).unwrap(), vec![b"e".to_vec()]);
    assert!(s.versions_of(CONT, oid, b"d").unwrap().is_empty(), "values and punches of d are gone");
    assert_eq!(s.versions_of(CONT, oid, b"e").unwrap().len(), 1);
    assert_eq!(s.objects_after(None, 10).unwrap(), vec![(CONT, oid)]);
    assert_eq!(s.drop_shards(CONT, oid, None).unwrap(), 4096);
    assert!(s.objects_after(None, 10).unwrap().is_empty());
    s.close();
}

/// A resync asks which versions a target holds: an extent or punch by its
/// key and epoch, a single value only if its bytes are the same too (a
/// max-value update rewrites one in place at its epoch).
#[test]
fn holds_tells_which_versions_a_target_has() {
    use shoal_common::msg::{RestoreItem, RestoreKind};
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), 16);
    let oid = Oid::new(0, 1);
    let iods = vec![UpdateIod { akey: b"a".to_vec(), kind: ValueKind::Single, crc: 0, cond: None }];
    let update =
        Mutation::Update { cont: CONT, oid, dkey: b"d".to_vec(), epoch: 5, iods, data: vec![Bytes::from("ten")] };
    s.apply(crcs(update)).unwrap();
    put_extent(&s, 6, 0, vec![1; 100]).unwrap();
    let mine = s.versions_of(CONT, oid, b"d").unwrap();
    let single = mine.iter().find(|v| v.item.kind == RestoreKind::Single).unwrap().item.clone();
    let extent = mine.iter().find(|v| v.item.kind != RestoreKind::Single).unwrap().item.clone();
    let other = RestoreItem { crc: crc32c::crc32c(b"twenty"), ..single.clone() };
    let later = RestoreItem { epoch: 7, ..extent.clone() };
    let items = [single, other, extent, later];
    assert_eq!(s.holds(CONT, oid, b"d", &items).unwrap(), vec![true, false, true, false]);
    s.close();
}
