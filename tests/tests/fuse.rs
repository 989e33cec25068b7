//! A container mounted with FUSE (`shoal mount`) on a 6-server loopback
//! cluster, used by ordinary tools: coreutils, tar, rsync, several
//! processes at once, and POSIX error codes checked from Python as other
//! users. What the mount wrote is read back through the native API.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shoal_client::fs::Fs;
use shoal_common::mgmt::ContProps;
use shoal_tests::TestCluster;

fn shoal_bin() -> PathBuf {
    shoal_tests::server_bin().with_file_name("shoal")
}

fn mounted(dir: &Path) -> bool {
    let canon = dir.canonicalize().unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|m| Path::new(m) == canon))
}

/// A `shoal mount --foreground` process of our own, so a test can kill it.
struct Mount {
    dir: PathBuf,
    child: Child,
    log: PathBuf,
}

impl Mount {
    fn start(ms: &str, target: &str, dir: &Path, extra: &[&str]) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        let log = dir.with_extension("log");
        let child = Command::new(shoal_bin())
            .args(["--ms", ms, "mount", target])
            .arg(dir)
            .arg("--foreground")
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let m = Mount { dir: dir.to_path_buf(), child, log };
        let give_up = Instant::now() + Duration::from_secs(30);
        while !mounted(dir) {
            assert!(Instant::now() < give_up, "no mount after 30s: {}", m.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        m
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new(shoal_bin()).args(["umount", "--lazy"]).arg(&self.dir).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a bash script (with `-euo pipefail`) in `cwd`; returns stdout.
#[track_caller]
fn sh(cwd: &Path, env: &[(&str, &Path)], script: &str) -> String {
    let mut c = Command::new("bash");
    c.args(["-euo", "pipefail", "-c", script]).current_dir(cwd);
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "script failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

async fn cluster(tmp: &Path) -> TestCluster {
    let cluster = TestCluster::start(tmp, 6, 1).await.unwrap();
    let props = ContProps { rd_fac: 1, ..Default::default() };
    shoal_tests::tank(&cluster, props).await;
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordinary_tools_work_on_a_mounted_container() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = cluster(tmp.path()).await;
    let mnt = tmp.path().join("mnt");
    let m = Mount::start(&cluster.ms(), "tank/c", &mnt, &["--allow-other"]);
    let local = tmp.path().join("local");
    std::fs::create_dir_all(&local).unwrap();
    let env = [("M", mnt.as_path()), ("T", local.as_path())];

    // coreutils.
    sh(
        &mnt,
        &env,
        r#"
        echo hello > a.txt
        cp a.txt b.txt
        cmp a.txt b.txt
        mv b.txt c.txt
        test ! -e b.txt
        test "$(cat c.txt)" = hello
        ln c.txt hard
        test "$(stat -c %h c.txt)" = 2
        test "$(stat -c %i c.txt)" = "$(stat -c %i hard)"
        ln -s a.txt sym
        test "$(readlink sym)" = a.txt
        test "$(cat sym)" = hello
        ls -l > /dev/null
        touch -d '2001-02-03 04:05:06' a.txt
        test "$(stat -c %Y a.txt)" = "$(date -d '2001-02-03 04:05:06' +%s)"
        chmod 640 a.txt
        test "$(stat -c %a a.txt)" = 640
        chown 1234:5678 a.txt
        test "$(stat -c %u:%g a.txt)" = 1234:5678
        mkdir -p x/y/z
        echo deep > x/y/z/f
        rm -r x
        test ! -e x
        truncate -s 1M big
        test "$(stat -c %s big)" = 1048576
        truncate -s 10 big
        test "$(stat -c %s big)" = 10
        fallocate -l 2M big2
        test "$(stat -c %s big2)" = 2097152
        head -c 100000 /dev/urandom > holes
        fallocate -p -o 4096 -l 8192 holes
        test "$(stat -c %s holes)" = 100000
        test "$(dd if=holes bs=4096 skip=1 count=2 status=none | tr -d '\0' | wc -c)" = 0
        du -s . > /dev/null
        df . | grep -q shoal
        test "$(stat -f -c %l .)" = 255
        mkfifo fifo
        test -p fifo
        mkdir -p nl/a nl/b
        test "$(stat -c %h nl)" = 4
        rmdir nl/a
        test "$(stat -c %h nl)" = 3
        setfattr -n user.note -v hi a.txt
        test "$(getfattr --only-values -n user.note a.txt)" = hi
        rm hard c.txt
        test ! -e c.txt
    "#,
    );

    // tar in and out, byte for byte; rsync -a with its metadata.
    sh(
        &mnt,
        &env,
        r#"
        tar -C /usr/include -cf - linux | tar -C "$M" -xf -
        diff -r /usr/include/linux "$M/linux"
        tar -C "$M" -cf "$T/out.tar" linux
        mkdir "$T/back"
        tar -C "$T/back" -xf "$T/out.tar"
        diff -r /usr/include/linux "$T/back/linux"
        rsync -a /usr/include/asm-generic "$M/"
        diff -r /usr/include/asm-generic "$M/asm-generic"
        # rsync kept modes and times: a second run has nothing to send.
        test -z "$(rsync -ai /usr/include/asm-generic "$M/")"
        rm -r "$M/linux" "$M/asm-generic"
    "#,
    );

    // Several processes: one file each, and one file at disjoint offsets.
    sh(
        &mnt,
        &env,
        r#"
        head -c 8M /dev/urandom > "$T/r"
        for i in 0 1 2 3; do cp "$T/r" "$M/w$i" & done; wait
        for i in 0 1 2 3; do cmp "$T/r" "$M/w$i"; done
        for i in 0 1 2 3 4 5 6 7; do
            dd if="$T/r" of="$M/shared" bs=1M count=1 skip=$i seek=$i conv=notrunc status=none &
        done; wait
        cmp "$T/r" "$M/shared"
    "#,
    );

    // A sparse file far past its data, and an unlinked file kept open.
    sh(
        &mnt,
        &env,
        r#"
        printf 'end' | dd of=sparse bs=1 seek=$((10 << 30)) status=none
        test "$(stat -c %s sparse)" = $(((10 << 30) + 3))
        test "$(tail -c 3 sparse)" = end
        test "$(dd if=sparse bs=1M skip=5000 count=1 status=none | tr -d '\0' | wc -c)" = 0
        echo secret > open.txt
        exec 3< open.txt 4>> open.txt
        rm open.txt
        test ! -e open.txt
        echo more >&4
        test "$(cat <&3)" = "$(printf 'secret\nmore')"
        exec 3<&- 4>&-
    "#,
    );

    // O_APPEND from two processes: every line whole.
    sh(
        &mnt,
        &env,
        r#"
        for p in a b; do (for i in $(seq 50); do echo "$p-$i-xxxxxxxxxxxxxxxxxxxx" >> log; done) & done; wait
        test "$(wc -l < log)" = 100
        test "$(grep -c -E '^[ab]-[0-9]+-x{20}$' log)" = 100
    "#,
    );

    // The native API reads what the mount wrote.
    let client = cluster.client().await.unwrap();
    let cont = client.pool_connect("tank").await.unwrap().cont_open("c").await.unwrap();
    let fs = Fs::mount(cont).await.unwrap();
    let w0 = fs.resolve("/w0").await.unwrap();
    let want = std::fs::read(local.join("r")).unwrap();
    assert_eq!(w0.size, want.len() as u64);
    assert!(fs.read(w0.oid, 0, w0.size).await.unwrap() == want[..], "native read differs from what the mount wrote");
    fs.unmount().await.unwrap();
    drop(m);
    assert!(!mounted(&mnt));
}

/// POSIX error codes, permissions, sticky directories and setuid clearing,
/// checked from Python as root and as other users.
const POSIX_PY: &str = r#"
import errno, os, sys
M = sys.argv[1]
def expect(code, f, *a):
    try:
        f(*a)
    except OSError as e:
        assert e.errno == code, f"{f.__name__}{a}: {errno.errorcode[e.errno]}, not {errno.errorcode[code]}"
        return
    raise AssertionError(f"{f.__name__}{a} did not fail with {errno.errorcode[code]}")
def as_user(uid, f):
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([]); os.setgid(uid); os.setuid(uid); f(); os._exit(0)
        except BaseException as e:
            print(f"as uid {uid}: {e!r}", file=sys.stderr); os._exit(1)
    assert os.waitpid(pid, 0)[1] == 0, f"check as uid {uid} failed"
os.chdir(M)
os.mkdir("e"); os.chdir("e")
expect(errno.ENOENT, os.stat, "missing")
expect(errno.ENOENT, open, "missing/x")
os.mkdir("d"); open("d/f", "w").close(); open("file", "w").close()
expect(errno.EEXIST, os.mkdir, "d")
expect(errno.EEXIST, os.open, "file", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
expect(errno.ENOTDIR, os.stat, "file/x")
expect(errno.EISDIR, open, "d", "w")
expect(errno.ENOTEMPTY, os.rmdir, "d")
expect(errno.ENAMETOOLONG, open, "n" * 256, "w")
open("n" * 255, "w").close()
expect(errno.EINVAL, os.rename, "d", "d/sub")
os.symlink("loop", "loop")
expect(errno.ELOOP, open, "loop")
expect(errno.EXDEV, os.rename, "file", os.path.join(sys.argv[2], "file"))
# rename over an existing file replaces it; hard-link counts follow.
with open("old", "w") as f: f.write("old")
with open("new", "w") as f: f.write("new")
os.link("old", "old2")
assert os.stat("old").st_nlink == 2
os.rename("new", "old")
assert open("old").read() == "new" and open("old2").read() == "old"
assert os.stat("old2").st_nlink == 1
# Timestamps: a write moves mtime and ctime, chmod only ctime.
st = os.stat("old2")
os.utime("old2", ns=(1_000_000_000, 1_000_000_000))
with open("old2", "a") as f: f.write("x")
st2 = os.stat("old2")
assert st2.st_mtime_ns > 1_000_000_000 and st2.st_ctime_ns >= st.st_ctime_ns
os.utime("old2", ns=(5_000_000_000, 5_000_000_000))
os.chmod("old2", 0o600)
st3 = os.stat("old2")
assert st3.st_mtime_ns == 5_000_000_000 and st3.st_ctime_ns > 5_000_000_000
os.utime(".", ns=(1_000_000_000, 1_000_000_000))
open("fresh", "w").close()
assert os.stat(".").st_mtime_ns > 1_000_000_000, "creating an entry moves the directory's mtime"
# Permissions as other users.
os.chmod(".", 0o777)
with open("ro", "w") as f: f.write("x")
os.chmod("ro", 0o444)
as_user(1000, lambda: expect(errno.EACCES, open, "ro", "w"))
as_user(1000, lambda: expect(errno.EPERM, os.chmod, "ro", 0o777))
as_user(1000, lambda: expect(errno.EPERM, os.chown, "ro", 1000, 1000))
# Sticky directory: others' files cannot be removed or renamed.
os.mkdir("sticky"); os.chmod("sticky", 0o1777)
def mine():
    with open("sticky/u1000", "w") as f: f.write("x")
as_user(1000, mine)
as_user(1001, lambda: expect(errno.EPERM, os.unlink, "sticky/u1000"))
as_user(1001, lambda: expect(errno.EPERM, os.rename, "sticky/u1000", "sticky/stolen"))
as_user(1000, lambda: os.unlink("sticky/u1000"))
# setuid and setgid are cleared when someone else writes, and on chown.
with open("suid", "w") as f: f.write("x")
os.chmod("suid", 0o6777)
as_user(1000, lambda: open("suid", "r+").write("y"))
assert os.stat("suid").st_mode & 0o6000 == 0, oct(os.stat("suid").st_mode)
os.chmod("suid", 0o4755)
os.chown("suid", 1000, 1000)
assert os.stat("suid").st_mode & 0o4000 == 0, "chown clears setuid"
print("posix checks passed")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posix_errors_permissions_and_times_hold_on_a_mount() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = cluster(tmp.path()).await;
    let mnt = tmp.path().join("mnt");
    let other = tmp.path().join("other");
    let _m = Mount::start(&cluster.ms(), "tank/c", &mnt, &["--allow-other", "--attr-timeout", "0s"]);
    std::fs::create_dir_all(&other).unwrap();
    // Let other users walk down to the mount.
    sh(tmp.path(), &[], "chmod 755 .");
    let o = Command::new("python3").args(["-c", POSIX_PY]).arg(&mnt).arg(&other).output().unwrap();
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_mounts_see_each_others_changes_and_a_crashed_mount_unmounts_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = cluster(tmp.path()).await;
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    // No caching, as a container default (the checks below fail with the
    // mount's own 1s default).
    let shoal = |args: &[&str]| {
        let o = Command::new(shoal_bin()).args(["--ms", &cluster.ms()]).args(args).output().unwrap();
        assert!(o.status.success(), "shoal {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    shoal(&["fs", "set-prop", "tank/c", "--attr-timeout", "5s"]);
    shoal(&["fs", "set-prop", "tank/c", "--reset", "--entry-timeout", "0s"]);
    shoal(&["fs", "set-prop", "tank/c", "--attr-timeout", "0s"]);
    let props = shoal(&["fs", "get-prop", "tank/c"]);
    assert!(props.contains("attr-timeout:  0s") && props.contains("entry-timeout: 0s"), "{props}");
    let ma = Mount::start(&cluster.ms(), "tank/c", &a, &[]);
    let mut mb = Mount::start(&cluster.ms(), "tank/c", &b, &[]);
    let env = [("A", a.as_path()), ("B", b.as_path())];
    sh(
        tmp.path(),
        &env,
        r#"
        echo one > "$A/f"
        test "$(cat "$B/f")" = one
        mv "$B/f" "$B/g"
        test ! -e "$A/f"
        test "$(cat "$A/g")" = one
        mkdir "$A/d"
        ln "$B/g" "$B/d/h"
        test "$(stat -c %h "$A/g")" = 2
        # Exclusive creates from both mounts: exactly one wins each name.
        for i in $(seq 20); do
            ( set -C; echo a > "$A/x$i" ) 2>/dev/null & ( set -C; echo b > "$B/x$i" ) 2>/dev/null & wait
            test "$(wc -l < "$A/x$i")" = 1
        done
    "#,
    );

    // A file open on mount A outlives the removal of its last name through
    // mount B: A reads and writes it until it closes it, then it is freed.
    {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let client = cluster.client().await.unwrap();
        let fs = Fs::mount(client.pool_connect("tank").await.unwrap().cont_open("c").await.unwrap()).await.unwrap();
        std::fs::write(a.join("open"), vec![9u8; 3 << 20]).unwrap();
        let ino = fs.resolve("/open").await.unwrap().oid;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(a.join("open")).unwrap();
        std::fs::remove_file(b.join("open")).unwrap();
        assert!(!a.join("open").exists());
        assert_eq!(&fs.read(ino, 0, 8).await.expect("freed while open on another mount")[..], &[9u8; 8]);
        let mut got = vec![0u8; 3 << 20];
        f.read_exact_at(&mut got, 0).unwrap();
        assert!(got.iter().all(|c| *c == 9));
        f.write_all_at(b"tail", 3 << 20).unwrap();
        f.sync_all().unwrap();
        assert_eq!(f.metadata().unwrap().nlink(), 0);
        assert_eq!(&fs.read(ino, 3 << 20, 100).await.unwrap()[..], b"tail");
        drop(f);
        let give_up = Instant::now() + Duration::from_secs(20);
        loop {
            match fs.getattr(ino).await {
                Err(e) if e.errno() == libc::ENOENT => break,
                r => assert!(Instant::now() < give_up, "not freed after its last close: {r:?}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        fs.unmount().await.unwrap();
    }

    // Kill the serving process: `shoal umount` leaves no hung mount.
    mb.child.kill().unwrap();
    mb.child.wait().unwrap();
    let o = Command::new(shoal_bin()).arg("umount").arg(&b).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!mounted(&b));
    assert!(std::fs::read_dir(&b).unwrap().next().is_none(), "the mount point is an empty directory again");
    // SIGTERM unmounts the other cleanly.
    // SAFETY: signalling a child we own.
    unsafe { libc::kill(ma.child.id() as i32, libc::SIGTERM) };
    let give_up = Instant::now() + Duration::from_secs(20);
    while mounted(&a) {
        assert!(Instant::now() < give_up, "SIGTERM did not unmount: {}", ma.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(ma);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flock_and_record_locks_hold_across_mounts_and_lapse_with_a_crashed_mount() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = cluster(tmp.path()).await;
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let _ma = Mount::start(&cluster.ms(), "tank/c", &a, &[]);
    let mut mb = Mount::start(&cluster.ms(), "tank/c", &b, &[]);
    let env = [("A", a.as_path()), ("B", b.as_path())];
    sh(
        tmp.path(),
        &env,
        r#"
        touch "$A/lk"
        # flock on mount A keeps it from mount B until A lets go.
        flock -x "$A/lk" -c 'sleep 3' &
        sleep 1
        if flock -n -x "$B/lk" true; then echo "B took a lock A holds"; exit 1; fi
        if flock -n -s "$B/lk" true; then echo "B shared a lock A holds exclusively"; exit 1; fi
        t0=$(date +%s%N)
        flock -x "$B/lk" true
        waited=$(( ($(date +%s%N) - t0) / 1000000 ))
        test "$waited" -ge 1000 || { echo "B waited only ${waited} ms"; exit 1; }
        wait
        # Shared locks share across mounts.
        flock -s "$A/lk" -c 'flock -n -s "$B/lk" true'
        # Closing the last descriptor drops the flock.
        flock -x "$A/lk" true
        flock -n -x "$B/lk" true

        # POSIX record locks: byte ranges, F_GETLK names the holder, close
        # releases, and a waiting locker can be interrupted.
        python3 - <<'PY'
import fcntl, os, signal, struct, subprocess, sys, time
A, B = os.environ["A"], os.environ["B"]
fa = os.open(A + "/rec", os.O_RDWR | os.O_CREAT, 0o644)
fcntl.lockf(fa, fcntl.LOCK_EX, 100, 0)          # bytes 0..99 on mount A
def on_b(code):
    return subprocess.run([sys.executable, "-c", "import fcntl, os, struct\nfd = os.open(%r, os.O_RDWR)\n" % (B + "/rec") + code],
                          capture_output=True, text=True)
r = on_b("fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 50)")
assert r.returncode != 0 and ("Resource temporarily unavailable" in r.stderr or "Permission denied" in r.stderr), r
r = on_b("fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 200)")
assert r.returncode == 0, r.stderr                # another range is free
r = on_b("print(struct.unpack('hhqqi', fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack('hhqqi', fcntl.F_RDLCK, 0, 50, 1, 0))))")
assert r.returncode == 0, r.stderr
typ, _, start, length, pid = eval(r.stdout)
assert (typ, start, length, pid) == (fcntl.F_WRLCK, 0, 100, os.getpid()), r.stdout
# A blocked locker on mount B: a signal ends its wait.
p = subprocess.Popen([sys.executable, "-c", "import fcntl, os\nfd = os.open(%r, os.O_RDWR)\nfcntl.lockf(fd, fcntl.LOCK_EX, 10, 50)\nprint('locked')" % (B + "/rec")],
                     stdout=subprocess.PIPE, text=True)
time.sleep(1.5)
assert p.poll() is None, "the locker did not wait"
p.send_signal(signal.SIGTERM)
p.wait(timeout=10)
assert p.returncode == -signal.SIGTERM, p.returncode
# Unlocking part of the range frees it for B, the rest stays.
fcntl.lockf(fa, fcntl.LOCK_UN, 20, 40)
assert on_b("fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 20, 40)").returncode == 0
assert on_b("fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 39)").returncode != 0
# A blocked locker gets the lock when A closes the file.
p = subprocess.Popen([sys.executable, "-c", "import fcntl, os\nfd = os.open(%r, os.O_RDWR)\nfcntl.lockf(fd, fcntl.LOCK_EX, 0, 0)\nprint('locked', flush=True)" % (B + "/rec")],
                     stdout=subprocess.PIPE, text=True)
time.sleep(1.5)
assert p.poll() is None, "the locker did not wait"
os.close(fa)
assert p.communicate(timeout=20)[0] == "locked\n"
# Open-file-description locks belong to the open file: they hold across
# mounts while it is open, and its close releases them at once (not when
# the mount's lease lapses).
ofd = lambda t: struct.pack("hhqqixxxx", t, 0, 0, 0, 0)
fo = os.open(A + "/ofd", os.O_RDWR | os.O_CREAT, 0o644)
fcntl.fcntl(fo, fcntl.F_OFD_SETLK, ofd(fcntl.F_WRLCK))
lock_on_b = lambda: subprocess.run([sys.executable, "-c", "import fcntl, os\nfd = os.open(%r, os.O_RDWR)\nfcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)" % (B + "/ofd")],
                                   capture_output=True, text=True)
assert lock_on_b().returncode != 0, "B took a lock an open file on A holds"
os.close(fo)
r = lock_on_b()
assert r.returncode == 0, "an OFD lock outlived its close: " + r.stderr
PY
    "#,
    );

    // A mount that dies holding a lock: the lock lapses with its lease.
    let _holder =
        KillOnDrop(Command::new("flock").arg("-x").arg(b.join("held")).args(["-c", "sleep 600"]).spawn().unwrap());
    let give_up = Instant::now() + Duration::from_secs(20);
    while Command::new("flock").args(["-n", "-x"]).arg(a.join("held")).arg("true").status().unwrap().success() {
        assert!(Instant::now() < give_up, "the flock on mount B never showed on mount A");
        std::thread::sleep(Duration::from_millis(100));
    }
    mb.child.kill().unwrap();
    mb.child.wait().unwrap();
    let died = Instant::now();
    let o = Command::new("flock").args(["-w", "90", "-x"]).arg(a.join("held")).arg("true").output().unwrap();
    assert!(o.status.success(), "the dead mount's lock never lapsed: {}", String::from_utf8_lossy(&o.stderr));
    let lapsed = died.elapsed();
    assert!(lapsed < shoal_client::fs::FILE_LOCK_LEASE + Duration::from_secs(15), "took {lapsed:?}");
}

/// Kills a child process when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One file exercised like xfstests' fsx: random writes, reads, truncates,
/// hole punches, zeroed and extended ranges, fsyncs and reopens, every read
/// checked against a model of the bytes. Returns the number of operations.
fn fsx(path: &Path, seed: u64, ops: usize) -> Result<usize, String> {
    use rand::{Rng, SeedableRng};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    const MAX: u64 = 3 << 19;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut model: Vec<u8> = Vec::new();
    let open = || std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path);
    let mut f = open().map_err(|e| e.to_string())?;
    let fail = |i: usize, what: String| Err(format!("seed {seed} op {i}: {what}"));
    let trace = std::env::var_os("SHOAL_FSX_TRACE").is_some();
    for i in 0..ops {
        let off = rng.random_range(0..MAX);
        let len = if rng.random_bool(0.1) { rng.random_range(1..=256 << 10) } else { rng.random_range(1..=64 << 10) };
        let len = len.min(MAX - off).max(1);
        let op = rng.random_range(0..100);
        if trace {
            eprintln!("{i}: op {op} off {off} len {len} model {}", model.len());
        }
        if trace {
            let st = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
            if st != model.len() as u64 {
                return fail(i, format!("size {st} before the op, want {}", model.len()));
            }
        }
        match op {
            0..=34 => {
                let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                if let Err(e) = f.write_all_at(&data, off) {
                    return fail(i, format!("write {off}+{len}: {e}"));
                }
                let end = (off + len) as usize;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[off as usize..end].copy_from_slice(&data);
            }
            35..=69 => {
                let mut buf = vec![0u8; len as usize];
                let mut got = 0;
                while got < buf.len() {
                    match f.read_at(&mut buf[got..], off + got as u64) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) => return fail(i, format!("read {off}+{len}: {e}")),
                    }
                }
                let want = model.get(off as usize..(off as usize + len as usize).min(model.len())).unwrap_or(&[]);
                if &buf[..got] != want {
                    let at = buf[..got].iter().zip(want).position(|(a, b)| a != b);
                    return fail(
                        i,
                        format!("read {off}+{len}: got {got} bytes, want {}, first difference at {at:?}", want.len()),
                    );
                }
            }
            70..=77 => {
                let size = rng.random_range(0..MAX);
                if let Err(e) = f.set_len(size) {
                    return fail(i, format!("truncate {size}: {e}"));
                }
                model.resize(size as usize, 0);
            }
            78..=85 => {
                let (mode, name) = match rng.random_range(0..3) {
                    0 => (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, "punch"),
                    1 => (libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, "zero"),
                    _ => (0, "extend"),
                };
                // SAFETY: fallocate on an open descriptor.
                let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) };
                if r != 0 {
                    return fail(i, format!("fallocate {name} {off}+{len}: {}", std::io::Error::last_os_error()));
                }
                let end = (off + len) as usize;
                if mode & libc::FALLOC_FL_KEEP_SIZE == 0 {
                    if model.len() < end {
                        model.resize(end, 0);
                    }
                } else if (off as usize) < model.len() {
                    let stop = end.min(model.len());
                    model[off as usize..stop].fill(0);
                }
            }
            86..=92 => {
                if let Err(e) = f.sync_data() {
                    return fail(i, format!("fdatasync: {e}"));
                }
            }
            _ => {
                drop(f);
                f = open().map_err(|e| e.to_string())?;
                let size = f.metadata().map_err(|e| e.to_string())?.len();
                if size != model.len() as u64 {
                    return fail(i, format!("size after reopen {size}, want {}", model.len()));
                }
            }
        }
    }
    let all = std::fs::read(path).map_err(|e| e.to_string())?;
    if all != model {
        return fail(ops, format!("final contents differ ({} vs {} bytes)", all.len(), model.len()));
    }
    Ok(ops)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsx_runs_100000_operations_on_a_mount_without_a_mismatch() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = cluster(tmp.path()).await;
    let mnt = tmp.path().join("mnt");
    let trace = std::env::var_os("SHOAL_FSX_TRACE").is_some();
    let _m = Mount::start(&cluster.ms(), "tank/c", &mnt, if trace { &["--attr-timeout", "0s"][..] } else { &[] });
    let ops: usize = std::env::var("SHOAL_FSX_OPS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let seed: u64 = std::env::var("SHOAL_FSX_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(rand::random);
    // Four exercisers at once, each on five files in turn (5,000
    // operations per file: a file overwritten far more often than that
    // piles up versions faster than the servers aggregate them, and the
    // run measures that instead).
    let started = Instant::now();
    let n: u64 = std::env::var("SHOAL_FSX_FILES").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let per_file = ops / n as usize;
    let runs: Vec<_> = (0..4u64)
        .map(|t| {
            let mnt = mnt.clone();
            std::thread::spawn(move || {
                let mut done = 0;
                for i in (t..n).step_by(4) {
                    done += fsx(&mnt.join(format!("fsx{i}")), seed + i, per_file)?;
                }
                Ok::<_, String>(done)
            })
        })
        .collect();
    let mut done = 0;
    for r in runs {
        done += r.join().unwrap().unwrap_or_else(|e| panic!("fsx mismatch (rerun with SHOAL_FSX_SEED): {e}"));
    }
    eprintln!("fsx: {done} operations in {:.0?} (seed {seed})", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_file_written_through_the_mount_survives_a_server_killed_mid_write() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = cluster(tmp.path()).await;
    let mnt = tmp.path().join("mnt");
    let _m = Mount::start(&cluster.ms(), "tank/c", &mnt, &[]);
    let local = tmp.path().join("local");
    std::fs::create_dir_all(&local).unwrap();
    let env = [("M", mnt.as_path()), ("T", local.as_path())];
    sh(&local, &env, r#"head -c 1G /dev/urandom > "$T/dense" && sha256sum < "$T/dense" > "$T/sum""#);
    let writer = Command::new("bash")
        .args(["-euo", "pipefail", "-c", r#"dd if="$T/dense" of="$M/dense" bs=1M status=none"#])
        .env("T", &local)
        .env("M", &mnt)
        .spawn()
        .unwrap();
    // Kill a data server (not the MS's) once the file is well under way.
    let give_up = Instant::now() + Duration::from_secs(120);
    while std::fs::metadata(mnt.join("dense")).map_or(0, |m| m.len()) < 200 << 20 {
        assert!(Instant::now() < give_up, "the writer made no progress");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.servers[5].kill9();
    let out = tokio::task::spawn_blocking(move || writer.wait_with_output()).await.unwrap().unwrap();
    assert!(out.status.success(), "the writer failed after a server died (within rd_fac 1)");
    // Every byte, through the mount and through the native API.
    sh(&local, &env, r#"sync; test "$(sha256sum < "$M/dense")" = "$(cat "$T/sum")""#);
    let client = cluster.client().await.unwrap();
    let fs = Fs::mount(client.pool_connect("tank").await.unwrap().cont_open("c").await.unwrap()).await.unwrap();
    let a = fs.resolve("/dense").await.unwrap();
    assert_eq!(a.size, 1 << 30);
    let want = std::fs::read(local.join("dense")).unwrap();
    for (i, part) in want.chunks(64 << 20).enumerate() {
        let got = fs.read(a.oid, (i as u64) << 26, part.len() as u64).await.unwrap();
        assert!(got == part, "64 MiB piece {i} differs through the native API");
    }
    fs.unmount().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_files_in_one_directory_and_racing_renames_and_unlinks() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = cluster(tmp.path()).await;
    let mnt = tmp.path().join("mnt");
    let _m = Mount::start(&cluster.ms(), "tank/c", &mnt, &[]);
    let files: usize = std::env::var("SHOAL_MANY_FILES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let started = Instant::now();
    sh(
        &mnt,
        &[],
        &format!(
            r#"
        mkdir many
        seq {files} | xargs -P 8 -n 250 sh -c 'cd many && touch "$@"' _
        test "$(ls many | wc -l)" = {files}
        test "$(find many -type f | wc -l)" = {files}
        test "$(ls -l many | grep -c '^-rw')" = {files}
    "#
        ),
    );
    let created = started.elapsed();
    // Renames and unlinks racing on a few names: at the end every name
    // holds a whole file or nothing, and no file has two names.
    sh(
        &mnt,
        &[],
        r#"
        mkdir race && cd race
        for i in 0 1 2 3 4 5 6 7; do echo "file $i" > "f$i"; done
        for p in 0 1 2 3; do
            (for n in $(seq 100); do a=f$(( (n + p) % 8 )); b=f$(( (n * 3 + p) % 8 )); mv -f "$a" "$b" 2>/dev/null || true; done) &
        done
        (for n in 1 4 7; do rm -f "f$n"; done) &
        wait
        shopt -s nullglob
        names=(*)
        for f in "${names[@]}"; do grep -qx 'file [0-7]' "$f"; test "$(stat -c %h "$f")" = 1; done
        # No file under two names: the contents are all different.
        test "$(for f in "${names[@]}"; do cat "$f"; done | sort | uniq -d | wc -l)" = 0
    "#,
    );
    sh(&mnt, &[], "rm -r many race && test -z \"$(ls)\"");
    eprintln!("{files} files created, listed and stat'ed in {created:.0?}");
}

/// A gathering mount (the default) and one made with `--no-gather`: fsx
/// finds no mismatch on either, and a file written in unaligned pieces
/// through the gathering mount reads back whole from the other once it is
/// closed (close-to-open), also after that mount truncates it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gathering_mount_reads_back_and_hands_over_at_close() {
    use std::io::{Read, Write};
    use std::os::unix::fs::FileExt;

    use rand::{Rng, SeedableRng};
    let tmp = tempfile::tempdir().unwrap();
    let cluster = cluster(tmp.path()).await;
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let _ma = Mount::start(&cluster.ms(), "tank/c", &a, &["--attr-timeout", "0s"]);
    let _mb =
        Mount::start(&cluster.ms(), "tank/c", &b, &["--no-gather", "--attr-timeout", "0s", "--entry-timeout", "0s"]);
    let seed: u64 = rand::random();
    for (i, m) in [&a, &b].into_iter().enumerate() {
        let i = i as u64;
        fsx(&m.join(format!("fsx{i}")), seed + i, 2_500).unwrap_or_else(|e| panic!("fsx (seed {seed}): {e}"));
    }
    // Unaligned pieces of random sizes, one after another and some
    // overwriting earlier ones.
    let mut model = vec![0u8; 0];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let f = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(a.join("big")).unwrap();
    let mut at = 4095u64;
    for i in 0..200u64 {
        let n = rng.random_range(1..150_000usize);
        let off = if i % 10 == 9 { rng.random_range(0..at) } else { at };
        let data = shoal_tests::pattern(seed ^ i, n);
        f.write_all_at(&data, off).unwrap();
        if model.len() < off as usize + n {
            model.resize(off as usize + n, 0);
        }
        model[off as usize..off as usize + n].copy_from_slice(&data);
        at = at.max(off + n as u64);
        if i % 50 == 49 {
            // Read back through the writing mount before anything closes.
            let mut got = vec![0u8; model.len()];
            f.read_exact_at(&mut got, 0).unwrap();
            assert!(got == model, "the gathering mount reads back its own writes");
        }
    }
    f.sync_all().unwrap();
    drop(f);
    let mut got = Vec::new();
    std::fs::File::open(b.join("big")).unwrap().read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), model.len());
    assert!(got == model, "another mount reads what the gathering mount closed");
    // Written again through the gathering mount, then truncated there.
    let mut f = std::fs::OpenOptions::new().append(true).open(a.join("big")).unwrap();
    f.write_all(b"tail").unwrap();
    drop(f);
    std::fs::OpenOptions::new().write(true).open(a.join("big")).unwrap().set_len(10_000).unwrap();
    let mut got = Vec::new();
    std::fs::File::open(b.join("big")).unwrap().read_to_end(&mut got).unwrap();
    assert!(got == model[..10_000], "the truncate through the gathering mount");
}
