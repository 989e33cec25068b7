//! The POSIX namespace from Rust (no FUSE): what POSIX says each call does,
//! its error codes, and two mounts of one container changing it at once.

use bytes::Bytes;
use shoal_client::fs::{Fs, FsError, Kind, NewNode, RenameFlags, SetAttr, XattrMode};
use shoal_common::mgmt::ContProps;
use shoal_tests::TestCluster;

fn file(perm: u32) -> NewNode {
    NewNode { kind: Kind::File, perm, uid: 1000, gid: 1000, rdev: 0, target: None }
}

fn dir() -> NewNode {
    NewNode { kind: Kind::Dir, perm: 0o755, uid: 1000, gid: 1000, rdev: 0, target: None }
}

#[track_caller]
fn errno<T: std::fmt::Debug>(r: Result<T, FsError>, want: i32) {
    match r {
        Err(e) => assert_eq!(e.errno(), want, "wrong errno for: {e}"),
        Ok(v) => panic!("expected errno {want}, got {v:?}"),
    }
}

/// Ten 1000-byte appends of `a`s from handle `a` and of `b`s from `b`, at
/// once.
async fn append_from_both(a: &Fs, b: &Fs, oid: shoal_common::Oid) {
    let rec = |c: u8| Bytes::from(vec![c; 1000]);
    let wa = async {
        for _ in 0..10 {
            a.append(oid, rec(b'a')).await.unwrap();
        }
    };
    let wb = async {
        for _ in 0..10 {
            b.append(oid, rec(b'b')).await.unwrap();
        }
    };
    futures::join!(wa, wb);
}

async fn setup(tmp: &std::path::Path, servers: usize) -> (TestCluster, Fs) {
    let cluster = TestCluster::start(tmp, servers, 1).await.unwrap();
    let props = ContProps { rd_fac: 1, ..Default::default() };
    let (_, _, cont) = shoal_tests::tank(&cluster, props).await;
    let fs = Fs::mount(cont).await.unwrap();
    (cluster, fs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_namespace_does_what_posix_says() {
    let tmp = tempfile::tempdir().unwrap();
    let (cluster, fs) = setup(tmp.path(), 3).await;
    let root = fs.root();

    // Create, look up, write, read back; O_EXCL and plain O_CREAT.
    let (a, created) = fs.create(root, b"a.txt", &file(0o644), true).await.unwrap();
    assert!(created);
    assert_eq!((a.kind, a.perm, a.nlink, a.size, a.uid), (Kind::File, 0o644, 1, 0, 1000));
    errno(fs.create(root, b"a.txt", &file(0o644), true).await, libc::EEXIST);
    let (again, created) = fs.create(root, b"a.txt", &file(0o600), false).await.unwrap();
    assert!(!created);
    assert_eq!(again.oid, a.oid);
    fs.write(a.oid, 0, Bytes::from_static(b"hello world")).await.unwrap();
    assert_eq!(&fs.read(a.oid, 6, 100).await.unwrap()[..], b"world");
    assert_eq!(fs.lookup(root, b"a.txt").await.unwrap().size, 11);

    // Names: too long, invalid, missing.
    errno(fs.create(root, &[b'x'; 256], &file(0o644), true).await, libc::ENAMETOOLONG);
    fs.create(root, &[b'y'; 255], &file(0o644), true).await.unwrap();
    errno(fs.create(root, b"a/b", &file(0o644), true).await, libc::EINVAL);
    errno(fs.lookup(root, b"missing").await, libc::ENOENT);

    // Directories: mkdir, ENOTDIR, EISDIR, ENOTEMPTY, rmdir.
    let d = fs.create(root, b"d", &dir(), true).await.unwrap().0;
    assert_eq!(d.kind, Kind::Dir);
    errno(fs.resolve("/a.txt/x").await, libc::ENOTDIR);
    errno(fs.unlink(root, b"d").await, libc::EISDIR);
    errno(fs.rmdir(root, b"a.txt").await, libc::ENOTDIR);
    fs.create(d.oid, b"inner", &file(0o644), true).await.unwrap();
    errno(fs.rmdir(root, b"d").await, libc::ENOTEMPTY);

    // Hard links count their names; a directory cannot have one.
    let l = fs.link(a.oid, d.oid, b"link").await.unwrap();
    assert_eq!(l.nlink, 2);
    errno(fs.link(d.oid, root, b"dlink").await, libc::EPERM);
    errno(fs.link(a.oid, d.oid, b"link").await, libc::EEXIST);
    assert_eq!(fs.unlink(root, b"a.txt").await.unwrap(), None, "one name is left");
    let l = fs.lookup(d.oid, b"link").await.unwrap();
    assert_eq!((l.nlink, l.size), (1, 11));
    assert_eq!(&fs.read(l.oid, 0, 5).await.unwrap()[..], b"hello");

    // Rename: over a file (the old target's last name goes), into a
    // descendant (EINVAL), NOREPLACE, EXCHANGE, file over directory.
    let b = fs.create(root, b"b", &file(0o644), true).await.unwrap().0;
    fs.write(b.oid, 0, Bytes::from_static(b"bbb")).await.unwrap();
    let gone = fs.rename(d.oid, b"link", root, b"b", RenameFlags::default()).await.unwrap();
    assert_eq!(gone, Some(b.oid), "the replaced file lost its last name");
    fs.reclaim(b.oid).await.unwrap();
    assert_eq!(&fs.read(fs.lookup(root, b"b").await.unwrap().oid, 0, 5).await.unwrap()[..], b"hello");
    errno(fs.lookup(d.oid, b"link").await, libc::ENOENT);
    let sub = fs.create(d.oid, b"sub", &dir(), true).await.unwrap().0;
    errno(fs.rename(root, b"d", sub.oid, b"d2", RenameFlags::default()).await, libc::EINVAL);
    errno(fs.rename(root, b"d", d.oid, b"self", RenameFlags::default()).await, libc::EINVAL);
    let noreplace = RenameFlags { noreplace: true, exchange: false };
    errno(fs.rename(root, b"b", d.oid, b"inner", noreplace).await, libc::EEXIST);
    let exchange = RenameFlags { noreplace: false, exchange: true };
    fs.rename(root, b"b", d.oid, b"sub", exchange).await.unwrap();
    assert_eq!(fs.lookup(root, b"b").await.unwrap().kind, Kind::Dir);
    assert_eq!(fs.lookup(d.oid, b"sub").await.unwrap().kind, Kind::File);
    errno(fs.rename(d.oid, b"sub", root, b"b", RenameFlags::default()).await, libc::EISDIR);
    errno(fs.rename(root, b"b", d.oid, b"sub", RenameFlags::default()).await, libc::ENOTDIR);
    // The exchanged directory's parent moved with it: moving root's "b"
    // below itself is refused, moving it under d is fine.
    fs.rename(root, b"b", d.oid, b"b", RenameFlags::default()).await.unwrap();

    // Symlinks, FIFOs, sockets.
    let s = NewNode { kind: Kind::Symlink, perm: 0o777, uid: 0, gid: 0, rdev: 0, target: Some(b"d/inner".to_vec()) };
    let s = fs.create(root, b"sym", &s, true).await.unwrap().0;
    assert_eq!((s.kind, s.size), (Kind::Symlink, 7));
    assert_eq!(fs.readlink(s.oid).await.unwrap(), b"d/inner");
    errno(fs.readlink(d.oid).await, libc::EINVAL);
    for (name, kind) in [(&b"fifo"[..], Kind::Fifo), (b"sock", Kind::Socket)] {
        let n = NewNode { kind, perm: 0o600, uid: 0, gid: 0, rdev: 0, target: None };
        assert_eq!(fs.create(root, name, &n, true).await.unwrap().0.kind, kind);
    }

    // Attributes: chmod, chown, times, truncate, setgid directories.
    let t = SetAttr { perm: Some(0o4755), uid: Some(7), mtime: Some(1_000_000_000), ..Default::default() };
    let inner = fs.lookup(d.oid, b"inner").await.unwrap();
    let after = fs.setattr(inner.oid, &t).await.unwrap();
    assert_eq!((after.perm, after.uid, after.mtime), (0o4755, 7, 1_000_000_000));
    assert!(after.ctime > inner.ctime);
    fs.write(inner.oid, 0, Bytes::from(vec![9u8; 10_000])).await.unwrap();
    let cut = fs.setattr(inner.oid, &SetAttr { size: Some(100), ..Default::default() }).await.unwrap();
    assert_eq!(cut.size, 100);
    let grown = fs.setattr(inner.oid, &SetAttr { size: Some(5000), ..Default::default() }).await.unwrap();
    assert_eq!(grown.size, 5000);
    assert!(fs.read(inner.oid, 100, 4900).await.unwrap().iter().all(|b| *b == 0), "truncated bytes come back as zeros");
    let sg = fs.create(root, b"sg", &dir(), true).await.unwrap().0;
    fs.setattr(sg.oid, &SetAttr { perm: Some(0o2775), gid: Some(55), ..Default::default() }).await.unwrap();
    let child = fs.create(sg.oid, b"child", &dir(), true).await.unwrap().0;
    assert_eq!((child.gid, child.perm & 0o2000), (55, 0o2000), "setgid directories pass on their group");

    // Directory times change when entries do.
    let before = fs.getattr(root).await.unwrap().mtime;
    fs.create(root, b"new", &file(0o644), true).await.unwrap();
    assert!(fs.getattr(root).await.unwrap().mtime > before);

    // Extended attributes.
    fs.setxattr(inner.oid, b"user.color", b"blue", XattrMode::Create).await.unwrap();
    errno(fs.setxattr(inner.oid, b"user.color", b"red", XattrMode::Create).await, libc::EEXIST);
    errno(fs.setxattr(inner.oid, b"user.none", b"x", XattrMode::Replace).await, libc::ENODATA);
    errno(fs.setxattr(inner.oid, b"bogus.x", b"x", XattrMode::Any).await, libc::EOPNOTSUPP);
    assert_eq!(fs.getxattr(inner.oid, b"user.color").await.unwrap(), b"blue");
    assert_eq!(fs.listxattr(inner.oid).await.unwrap(), vec![b"user.color".to_vec()]);
    fs.removexattr(inner.oid, b"user.color").await.unwrap();
    errno(fs.getxattr(inner.oid, b"user.color").await, libc::ENODATA);

    // Layout hints on a directory: checked, inherited, applied.
    errno(fs.setxattr(d.oid, b"user.shoal.oclass", b"NOPE", XattrMode::Any).await, libc::EINVAL);
    fs.setxattr(d.oid, b"user.shoal.oclass", b"RP_3G1", XattrMode::Any).await.unwrap();
    fs.setxattr(d.oid, b"user.shoal.chunk_size", b"64KiB", XattrMode::Any).await.unwrap();
    let below = fs.create(d.oid, b"deep", &dir(), true).await.unwrap().0;
    let f = fs.create(below.oid, b"f", &file(0o644), true).await.unwrap().0;
    assert!(fs.layout(f.oid).await.unwrap().is_none(), "no class before the first write");
    fs.write(f.oid, 0, Bytes::from_static(b"x")).await.unwrap();
    let layout = fs.layout(f.oid).await.unwrap().unwrap();
    assert_eq!((layout.class.to_string().as_str(), layout.chunk_size), ("RP_3G1", 64 << 10));
    assert_eq!(layout.ranks.len(), 3);

    // fallocate: extend, punch a hole.
    fs.fallocate(f.oid, 0, 0, 300_000).await.unwrap();
    assert_eq!(fs.getattr(f.oid).await.unwrap().size, 300_000);
    fs.write(f.oid, 0, Bytes::from(vec![1u8; 300_000])).await.unwrap();
    fs.fallocate(f.oid, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 1000, 200_000).await.unwrap();
    let back = fs.read(f.oid, 0, 300_000).await.unwrap();
    assert_eq!(back.len(), 300_000);
    assert!(back[..1000].iter().all(|b| *b == 1) && back[1000..201_000].iter().all(|b| *b == 0));
    assert!(back[201_000..].iter().all(|b| *b == 1));
    errno(fs.fallocate(f.oid, libc::FALLOC_FL_PUNCH_HOLE, 0, 10).await, libc::EINVAL);

    // Without hints the class follows the file: a file that starts small
    // is replicated, one whose first write or size is large is encoded.
    let class = |oid| {
        let fs = fs.clone();
        async move { fs.layout(oid).await.unwrap().unwrap().class.to_string() }
    };
    let small = fs.create(sg.oid, b"small", &file(0o644), true).await.unwrap().0;
    fs.write(small.oid, 0, Bytes::from(vec![1u8; 4096])).await.unwrap();
    assert_eq!(class(small.oid).await, "RP_2GX");
    let big = fs.create(sg.oid, b"big", &file(0o644), true).await.unwrap().0;
    fs.write(big.oid, 0, Bytes::from(vec![1u8; 1 << 20])).await.unwrap();
    assert_eq!(class(big.oid).await, "EC_2P1GX");
    let pre = fs.create(sg.oid, b"pre", &file(0o644), true).await.unwrap().0;
    fs.fallocate(pre.oid, 0, 0, 8 << 20).await.unwrap();
    assert_eq!(fs.read(pre.oid, (8 << 20) - 10, 100).await.unwrap(), vec![0u8; 10]);
    fs.write(pre.oid, 0, Bytes::from(vec![1u8; 4096])).await.unwrap();
    assert_eq!(class(pre.oid).await, "EC_2P1GX");
    assert_eq!(fs.getattr(pre.oid).await.unwrap().size, 8 << 20);

    // A directory's link count is 2 + its subdirectories, through mkdir,
    // rmdir, rename across directories, replacement and exchange.
    let nl = |o| {
        let fs = &fs;
        async move { fs.getattr(o).await.unwrap().nlink }
    };
    let p = fs.create(root, b"links", &dir(), true).await.unwrap().0.oid;
    let q = fs.create(root, b"links2", &dir(), true).await.unwrap().0.oid;
    let root_links = nl(root).await;
    for n in [&b"s1"[..], b"s2", b"s3"] {
        fs.create(p, n, &dir(), true).await.unwrap();
    }
    fs.create(p, b"f", &file(0o644), true).await.unwrap();
    assert_eq!(nl(p).await, 5);
    fs.rmdir(p, b"s3").await.unwrap();
    assert_eq!(nl(p).await, 4);
    fs.rename(p, b"s2", q, b"s2", RenameFlags::default()).await.unwrap();
    assert_eq!((nl(p).await, nl(q).await), (3, 3));
    // A directory replacing an empty one in another directory.
    fs.create(q, b"s1", &dir(), true).await.unwrap();
    fs.rename(p, b"s1", q, b"s1", RenameFlags::default()).await.unwrap();
    assert_eq!((nl(p).await, nl(q).await), (2, 4));
    // Exchanging a file and a directory moves a link count.
    fs.create(p, b"g", &file(0o644), true).await.unwrap();
    let xchg = RenameFlags { exchange: true, ..Default::default() };
    fs.rename(p, b"g", q, b"s1", xchg).await.unwrap();
    assert_eq!((nl(p).await, nl(q).await), (3, 3));
    // Renames within one directory change nothing.
    fs.rename(q, b"s2", q, b"s9", RenameFlags::default()).await.unwrap();
    assert_eq!(nl(q).await, 3);
    assert_eq!(nl(root).await, root_links);

    // statfs shows the pool's real space: the test's servers share one
    // disk, whose free space counts once, not once per target.
    let st = fs.statfs().await.unwrap();
    assert!(st.blocks > 0 && st.blocks_free > 0 && st.blocks_free <= st.blocks);
    // SAFETY: all-zero bytes are a valid statvfs; the path is NUL-terminated.
    let disk_free = unsafe {
        let mut v: libc::statvfs = std::mem::zeroed();
        let path = std::ffi::CString::new(tmp.path().as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(libc::statvfs(path.as_ptr(), &mut v), 0);
        v.f_bavail as u64 * v.f_frsize as u64
    };
    let pool_free = st.blocks_free * st.block_size as u64;
    assert!(pool_free < disk_free + disk_free / 2, "the pool shows {pool_free} bytes free on a disk with {disk_free}");

    // A listing holds every entry once.
    let mut names: Vec<String> =
        fs.readdir(root).await.unwrap().into_iter().map(|e| String::from_utf8(e.name).unwrap()).collect();
    names.sort();
    let want = ["d", "fifo", "links", "links2", "new", "sg", "sock", "sym"];
    assert_eq!(names.iter().filter(|n| n.len() < 255).cloned().collect::<Vec<_>>(), want);
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlinked_open_file_lives_until_reclaimed_also_after_its_mount_died() {
    let tmp = tempfile::tempdir().unwrap();
    let (cluster, fs) = setup(tmp.path(), 3).await;
    let root = fs.root();
    let f = fs.create(root, b"tmp", &file(0o600), true).await.unwrap().0;
    fs.write(f.oid, 0, Bytes::from(vec![5u8; 100_000])).await.unwrap();
    let gone = fs.unlink(root, b"tmp").await.unwrap();
    assert_eq!(gone, Some(f.oid));
    // Still readable and writable through the inode.
    fs.write(f.oid, 100_000, Bytes::from_static(b"more")).await.unwrap();
    assert_eq!(fs.getattr(f.oid).await.unwrap().nlink, 0);
    assert_eq!(fs.read(f.oid, 99_998, 10).await.unwrap().len(), 6);

    // Another mount does not free what a live mount holds...
    let other = Fs::mount(fs.container().clone()).await.unwrap();
    assert_eq!(other.clean_orphans(false).await.unwrap(), 0);
    assert_eq!(fs.getattr(f.oid).await.unwrap().size, 100_004);
    // ...not even when the clocks disagree: the live mount's heartbeats
    // carry times ten minutes old (its clock is behind), which must not
    // make it look dead.
    let rd_fac = fs.container().info().props.rd_fac;
    let meta: shoal_common::oclass::ObjectClass = format!("RP_{}G1", rd_fac + 1).parse().unwrap();
    let sb =
        fs.container().object(shoal_common::oclass::make_oid(2, meta, shoal_common::oclass::ObjType::Multi)).unwrap();
    let old =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64 - 600_000_000_000;
    for m in sb.list_akeys(b"mounts").await.unwrap() {
        sb.update_single(b"mounts", &m, Bytes::copy_from_slice(&old.to_le_bytes())).await.unwrap();
    }
    assert_eq!(other.clean_orphans(false).await.unwrap(), 0, "a live mount's orphan was freed");
    assert_eq!(fs.read(f.oid, 0, 10).await.unwrap(), vec![5u8; 10]);
    // ...but once that mount is gone, the next cleaning frees it.
    fs.unmount().await.unwrap();
    assert_eq!(other.clean_orphans(false).await.unwrap(), 1);
    errno(other.getattr(f.oid).await, libc::ENOENT);

    // A file open through one handle ([`Fs::open_file`]) whose last name
    // another removes: not freed by the remover, readable by the opener,
    // freed by the opener's last release.
    let third = Fs::mount(other.container().clone()).await.unwrap();
    let g = other.create(root, b"held", &file(0o600), true).await.unwrap().0;
    other.write(g.oid, 0, Bytes::from(vec![6u8; 5000])).await.unwrap();
    other.open_file(g.oid, false).await.unwrap();
    other.open_file(g.oid, false).await.unwrap();
    assert_eq!(third.unlink(root, b"held").await.unwrap(), Some(g.oid));
    assert!(!third.reclaim(g.oid).await.unwrap(), "freed while open through another handle");
    assert_eq!(third.clean_orphans(true).await.unwrap(), 0);
    other.release_file(g.oid).await.unwrap();
    assert_eq!(&other.read(g.oid, 4990, 100).await.unwrap()[..], &[6u8; 10]);
    other.release_file(g.oid).await.unwrap();
    errno(third.getattr(g.oid).await, libc::ENOENT);
    // An open that comes after the name went (a stale handle) fails.
    errno(third.open_file(g.oid, false).await, libc::ENOENT);
    // Open through a handle that then ends without releasing it (its mark
    // stays): freed once that handle's mount is gone.
    let h = other.create(root, b"held2", &file(0o600), true).await.unwrap().0;
    other.open_file(h.oid, false).await.unwrap();
    third.unlink(root, b"held2").await.unwrap();
    assert!(!third.reclaim(h.oid).await.unwrap());
    other.unmount().await.unwrap();
    assert_eq!(third.clean_orphans(true).await.unwrap(), 1);
    errno(third.getattr(h.oid).await, libc::ENOENT);
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_mounts_racing_on_one_name_never_both_win_or_lose_a_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (cluster, a) = setup(tmp.path(), 3).await;
    let b = Fs::mount(a.container().clone()).await.unwrap();
    let root = a.root();

    // Exclusive creates of one name: exactly one wins each round.
    for round in 0..20 {
        let name = format!("x{round}");
        let node = file(0o644);
        let (ra, rb) =
            futures::join!(a.create(root, name.as_bytes(), &node, true), b.create(root, name.as_bytes(), &node, true));
        let wins = [ra.is_ok(), rb.is_ok()].iter().filter(|w| **w).count();
        assert_eq!(wins, 1, "round {round}: {ra:?} / {rb:?}");
        for r in [ra, rb] {
            if let Err(e) = r {
                assert_eq!(e.errno(), libc::EEXIST);
            }
        }
    }

    // Renames of two files onto one name at once: the name ends up naming
    // one of them, the other is gone, nothing is named twice.
    for round in 0..10 {
        let (p, q) = (format!("p{round}"), format!("q{round}"));
        let fp = a.create(root, p.as_bytes(), &file(0o644), true).await.unwrap().0;
        let fq = a.create(root, q.as_bytes(), &file(0o644), true).await.unwrap().0;
        let (ra, rb) = futures::join!(
            a.rename(root, p.as_bytes(), root, b"target", RenameFlags::default()),
            b.rename(root, q.as_bytes(), root, b"target", RenameFlags::default())
        );
        ra.unwrap();
        rb.unwrap();
        let t = a.lookup(root, b"target").await.unwrap();
        assert!(t.oid == fp.oid || t.oid == fq.oid);
        errno(a.lookup(root, p.as_bytes()).await, libc::ENOENT);
        errno(a.lookup(root, q.as_bytes()).await, libc::ENOENT);
    }

    // Two mounts moving two directories into each other: one move wins,
    // no loop forms.
    let d1 = a.create(root, b"d1", &dir(), true).await.unwrap().0;
    let d2 = a.create(root, b"d2", &dir(), true).await.unwrap().0;
    let (ra, rb) = futures::join!(
        a.rename(root, b"d1", d2.oid, b"d1", RenameFlags::default()),
        b.rename(root, b"d2", d1.oid, b"d2", RenameFlags::default())
    );
    let oks = [ra.is_ok(), rb.is_ok()].iter().filter(|w| **w).count();
    assert_eq!(oks, 1, "{ra:?} / {rb:?}");
    for r in [ra, rb] {
        if let Err(e) = r {
            assert!(e.errno() == libc::EINVAL || e.errno() == libc::ENOENT, "{e}");
        }
    }

    // Appends from two mounts interleave whole.
    let log = a.create(root, b"log", &file(0o644), true).await.unwrap().0;
    append_from_both(&a, &b, log.oid).await;
    let all = a.read(log.oid, 0, 1 << 20).await.unwrap();
    assert_eq!(all.len(), 20_000);
    for r in all.chunks(1000) {
        assert!(r.iter().all(|c| *c == r[0]), "an append was torn or overwritten");
    }
    drop(cluster);
}

/// Write gathering ([`Fs::gather_writes`]) seen from another handle: the
/// size never covers bytes that are not on the servers yet, appends are
/// placed at the true end whoever buffers what, growing a file never
/// brings back bytes past its end, and all the files of a handle together
/// hold a bounded number of bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gathering_handle_raises_the_size_only_as_its_bytes_land() {
    let tmp = tempfile::tempdir().unwrap();
    let (cluster, a) = setup(tmp.path(), 3).await;
    let max_dirty = 256 << 10;
    a.gather_writes(shoal_client::WriteBack {
        max_dirty,
        max_age: std::time::Duration::from_secs(600),
        max_in_flight: 4,
    });
    let b = Fs::mount(a.container().clone()).await.unwrap();
    let root = a.root();
    let pattern = |off: u64, len: usize| -> Bytes { (off..off + len as u64).map(|i| (i % 251) as u8 + 1).collect() };

    // A small write stays buffered: this handle sees it, the other does
    // not, not even as a size.
    let f = a.create(root, b"f", &file(0o644), true).await.unwrap().0;
    a.write(f.oid, 0, pattern(0, 1000)).await.unwrap();
    assert_eq!(a.getattr(f.oid).await.unwrap().size, 1000);
    assert_eq!(&a.read(f.oid, 0, 4096).await.unwrap()[..], &pattern(0, 1000)[..]);
    assert_eq!(b.getattr(f.oid).await.unwrap().size, 0, "the size covers bytes still in the other client's buffer");
    assert!(b.read(f.oid, 0, 4096).await.unwrap().is_empty());

    // Whole units are sent at once; the other handle's size follows them
    // as they land, and every byte it covers is the writer's.
    let unit = a.layout(f.oid).await.unwrap().expect("data").chunk_size;
    let more = 2 * unit as usize;
    a.write(f.oid, 1000, pattern(1000, more)).await.unwrap();
    let landed = 2 * unit;
    let t0 = std::time::Instant::now();
    loop {
        let size = b.getattr(f.oid).await.unwrap().size;
        assert!(size <= landed, "size {size} covers buffered bytes (whole units end at {landed})");
        let got = b.read(f.oid, 0, size).await.unwrap();
        assert!(got[..] == pattern(0, got.len())[..], "the other handle reads bytes that were not written");
        if size == landed {
            break;
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(30), "whole units did not land");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    a.flush_file(f.oid).await.unwrap();
    let end = 1000 + more as u64;
    assert_eq!(b.getattr(f.oid).await.unwrap().size, end);
    assert!(b.read(f.oid, 0, end).await.unwrap()[..] == pattern(0, end as usize)[..]);

    // Appends from both handles, one of them gathering its other writes:
    // each lands whole at the end, none overwrites another. (Bytes still
    // buffered are another matter: an append elsewhere does not see them.)
    let log = a.create(root, b"log", &file(0o644), true).await.unwrap().0;
    a.write(log.oid, 0, Bytes::from(vec![b'w'; 100])).await.unwrap();
    a.flush_file(log.oid).await.unwrap();
    append_from_both(&a, &b, log.oid).await;
    a.flush_file(log.oid).await.unwrap();
    let all = b.read(log.oid, 0, 1 << 20).await.unwrap();
    assert_eq!(all.len(), 20_100);
    assert!(all[..100].iter().all(|c| *c == b'w'));
    for r in all[100..].chunks(1000) {
        assert!(r.iter().all(|c| *c == r[0]), "an append was torn or overwritten");
    }

    // An append lands after what this handle buffered, which lands first:
    // the other handle never sees the size cover bytes it cannot read.
    let q = a.create(root, b"q", &file(0o644), true).await.unwrap().0;
    a.write(q.oid, 0, Bytes::from(vec![b'q'; 100])).await.unwrap();
    assert_eq!(a.append(q.oid, Bytes::from_static(b"x")).await.unwrap(), 100);
    assert_eq!(&b.read(q.oid, 0, 1000).await.unwrap()[..], &[&[b'q'; 100][..], b"x"].concat()[..]);

    // Bytes past a file's end (as a client that died between writing them
    // and raising the size leaves them) read as zeros when it grows.
    let g = b.create(root, b"g", &file(0o644), true).await.unwrap().0;
    b.write(g.oid, 0, Bytes::from(vec![b'x'; 4096])).await.unwrap();
    let arr = a.container().array_open(b.layout(g.oid).await.unwrap().unwrap().array).await.unwrap();
    arr.write(1 << 20, Bytes::from(vec![b'S'; 4096])).await.unwrap();
    assert_eq!(b.getattr(g.oid).await.unwrap().size, 4096);
    b.setattr(g.oid, &SetAttr { size: Some(2 << 20), ..SetAttr::default() }).await.unwrap();
    let grown = a.read(g.oid, 0, 2 << 20).await.unwrap();
    assert_eq!(grown.len(), 2 << 20);
    assert!(grown[..4096].iter().all(|c| *c == b'x'));
    assert!(grown[4096..].iter().all(|c| *c == 0), "bytes past the old end came back");

    // Times: a buffered write shows its time on its own handle at once;
    // the landing stamps it for everyone; times set after buffered writes
    // (`touch -d`, `cp -p`) stand after those writes land.
    let t = a.create(root, b"t", &file(0o644), true).await.unwrap().0;
    let old = SetAttr { mtime: Some(1_000_000_000), atime: Some(1_000_000_000), ..SetAttr::default() };
    a.setattr(t.oid, &old).await.unwrap();
    let before = shoal_client::fs::now_ns();
    a.write(t.oid, 0, Bytes::from_static(b"buffered")).await.unwrap();
    assert!(a.getattr(t.oid).await.unwrap().mtime >= before, "the writer's handle shows the old mtime");
    assert_eq!(b.getattr(t.oid).await.unwrap().mtime, 1_000_000_000, "a time for bytes not landed");
    a.flush_file(t.oid).await.unwrap();
    let landed = b.getattr(t.oid).await.unwrap();
    assert!(landed.mtime >= before && landed.ctime >= before, "the landing did not stamp the times");
    a.write(t.oid, 8, Bytes::from_static(b" more")).await.unwrap();
    a.setattr(t.oid, &old).await.unwrap();
    a.flush_file(t.oid).await.unwrap();
    let set = b.getattr(t.oid).await.unwrap();
    assert_eq!((set.mtime, set.size), (1_000_000_000, 13), "a write landing after utimens overwrote its time");
    assert_eq!(a.getattr(t.oid).await.unwrap().mtime, 1_000_000_000);

    // Many files each below its own limit: the handle's total stays bounded.
    let cap = max_dirty * shoal_client::fs::DIRTY_FILES_MAX;
    for i in 0..(2 * shoal_client::fs::DIRTY_FILES_MAX + 4) {
        let h = a.create(root, format!("many{i}").as_bytes(), &file(0o644), true).await.unwrap().0;
        a.write(h.oid, 1, Bytes::from(vec![7u8; max_dirty as usize - 4096])).await.unwrap();
        assert!(a.dirty_bytes() <= cap + max_dirty, "{} bytes buffered, cap {cap}", a.dirty_bytes());
    }
    drop(cluster);
}

/// A server that restarts loses its lock table: the mount that held a lock
/// takes it again during the server's grace period, and no other mount
/// gets it in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_locks_survive_a_restart_of_every_server() {
    use shoal_client::fs::LockKind;
    let tmp = tempfile::tempdir().unwrap();
    let (mut cluster, a) = setup(tmp.path(), 3).await;
    let b = Fs::mount(a.container().clone()).await.unwrap();
    let root = a.root();
    let f = a.create(root, b"locked", &file(0o644), true).await.unwrap().0;
    a.write(f.oid, 0, Bytes::from_static(b"data")).await.unwrap();
    a.setlk(f.oid, 1, 4242, 0, 99, LockKind::Write, false, || false).await.unwrap();
    a.setlk(f.oid, 1, 4242, 200, 299, LockKind::Read, false, || false).await.unwrap();
    errno(b.setlk(f.oid, 7, 77, 50, 50, LockKind::Write, false, || false).await, libc::EAGAIN);
    // Another process on the holder's mount waits for the lock all along
    // (its retries must not keep the holder from reclaiming).
    let a2 = a.clone();
    let waiter = tokio::spawn(async move { a2.setlk(f.oid, 2, 5151, 0, 0, LockKind::Write, true, || false).await });

    for s in cluster.servers.iter_mut() {
        s.restart().await.unwrap();
    }
    // Until the holder has taken its locks again (its renewal every 10 s
    // finds them gone), and after: never granted to the other mount.
    let t0 = std::time::Instant::now();
    let mut reclaimed = false;
    while t0.elapsed() < std::time::Duration::from_secs(45) {
        match b.setlk(f.oid, 7, 77, 50, 50, LockKind::Write, false, || false).await {
            Ok(()) => panic!("another mount took a held lock after the server restarted ({:?} after)", t0.elapsed()),
            Err(e) => assert!(
                [libc::EAGAIN, libc::EIO, libc::ETIMEDOUT].contains(&e.errno()),
                "unexpected error while the servers come back: {e}"
            ),
        }
        if let Ok(Some(c)) = b.getlk(f.oid, 7, 77, 250, 250, true).await {
            assert_eq!((c.pid, c.write), (4242, false));
            reclaimed = b.getlk(f.oid, 7, 77, 10, 10, false).await.unwrap().is_some_and(|c| c.write);
        }
        if reclaimed && t0.elapsed() > std::time::Duration::from_secs(32) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(reclaimed, "the holder did not take its locks again");
    assert!(!waiter.is_finished(), "a waiter got a lock its holder still holds: {:?}", waiter.await);
    // The holder lets go: the waiter gets it, then the other mount.
    a.setlk(f.oid, 1, 4242, 0, u64::MAX, LockKind::Unlock, false, || false).await.unwrap();
    waiter.await.unwrap().unwrap();
    a.setlk(f.oid, 2, 5151, 0, u64::MAX, LockKind::Unlock, false, || false).await.unwrap();
    b.setlk(f.oid, 7, 77, 50, 50, LockKind::Write, true, || false).await.unwrap();
    drop(cluster);
}
