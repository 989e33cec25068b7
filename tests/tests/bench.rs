//! `shoal bench matrix` end to end on a small loopback cluster it starts
//! itself, with tiny sizes: every axis, every output format, the
//! checkpoint workload, and clear errors for bad arguments. It checks what
//! the benchmark produces, never how fast anything is.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn shoal(args: &[&str]) -> Output {
    let bin: PathBuf = shoal_tests::server_bin().with_file_name("shoal");
    Command::new(bin).args(args).env_remove("SHOAL_MS").output().expect("run shoal")
}

fn ok(args: &[&str]) -> String {
    let o = shoal(args);
    assert!(o.status.success(), "shoal {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).expect("utf-8 output")
}

const COLUMNS: &[&str] = &[
    "workload",
    "class",
    "api",
    "io_size",
    "offsets",
    "gather",
    "pattern",
    "sharing",
    "procs",
    "qd",
    "op",
    "ops",
    "bytes",
    "secs",
    "mib_s",
    "iops",
    "p50_us",
    "p99_us",
    "p999_us",
    "space_factor",
    "stored_per_written",
    "cpu_s_per_gib",
    "cpu_scope",
    "machine_cpu_s_per_gib",
    "failures_tolerated",
];

/// Width and height from a PNG's IHDR, after checking its signature, that
/// the first chunk is IHDR and the last IEND.
fn png_size(b: &[u8]) -> (u32, u32) {
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&b[12..16], b"IHDR");
    assert_eq!(&b[b.len() - 8..b.len() - 4], b"IEND", "PNG ends with IEND");
    let be = |s: &[u8]| u32::from_be_bytes(s.try_into().unwrap());
    (be(&b[16..20]), be(&b[20..24]))
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn bench_matrix_covers_every_axis_and_writes_every_format() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let dir = tmp.path().join("run");
    let table = ok(&[
        "bench",
        "matrix",
        "--dir",
        dir.to_str().unwrap(),
        "--servers",
        "3",
        "--targets",
        "1",
        "--classes",
        "RP_2G1,EC_2P1G1",
        "--api",
        "array,kv,object",
        "--sizes",
        "4KiB,40000",
        "--offsets",
        "aligned,unaligned",
        "--gather",
        "on,off",
        "--pattern",
        "seq,rand",
        "--sharing",
        "private,shared",
        "--procs",
        "1,2",
        "--qd",
        "2",
        "--bytes",
        "96KiB",
        "--duration",
        "20s",
        "--disk",
        "probe",
        "--disk-bytes",
        "16MiB",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(table.contains("raw disk (probe)"), "{table}");
    assert!(table.contains("EC_2P1G1") && table.contains("p99.9 us"), "{table}");
    assert_eq!(std::fs::read_to_string(out.join("matrix.txt")).unwrap(), table);

    // JSON: one write and one read row per cell. Per class: array 2 sizes x
    // 2 offsets x 2 gathers x 2 patterns x 2 sharings x 2 procs = 64 cells;
    // kv and object have no unaligned or gathered cells, 16 each.
    let report: serde_json::Value = serde_json::from_slice(&read(&out.join("matrix.json"))).unwrap();
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2 * (64 + 16 + 16) * 2, "rows");
    let disk = &report["disk"];
    assert_eq!(disk["tool"], "probe");
    assert!(disk["write_mib_s"].as_f64().unwrap() > 0.0 && disk["sync_4k_iops"].as_f64().unwrap() > 0.0, "{disk}");
    for r in rows {
        for c in COLUMNS {
            assert!(r.get(*c).is_some(), "column {c} missing in {r}");
        }
        let n = |c: &str| r[c].as_f64().unwrap_or_else(|| panic!("{c} in {r}"));
        assert!(n("ops") >= 1.0 && n("bytes") == n("ops") * n("io_size"), "{r}");
        assert!(n("mib_s") > 0.0 && n("iops") > 0.0 && n("cpu_s_per_gib") > 0.0, "{r}");
        assert!(n("p50_us") >= 1.0 && n("p50_us") <= n("p99_us") && n("p99_us") <= n("p999_us"), "{r}");
        assert_eq!(r["cpu_scope"], "client+servers");
        // /proc/stat counts in 10 ms ticks: a phase of a few ms may show none.
        assert!(n("machine_cpu_s_per_gib") >= 0.0, "{r}");
        assert_eq!(r["failures_tolerated"], 1);
        let space = if r["class"] == "RP_2G1" { 2.0 } else { 1.5 };
        assert_eq!(n("space_factor"), space, "{r}");
        // Every write was read back in full.
        if r["op"] == "read" {
            continue;
        }
        let read_row = rows
            .iter()
            .find(|x| {
                x["op"] == "read"
                    && ["class", "api", "io_size", "offsets", "gather", "pattern", "sharing", "procs"]
                        .iter()
                        .all(|c| x[c] == r[c])
            })
            .unwrap();
        assert_eq!(read_row["bytes"], r["bytes"], "read back all of {r}");
        // Replicated extents above the inline size land in the data files
        // of both replicas.
        if r["class"] == "RP_2G1" && r["api"] == "array" && r["io_size"] == 40000 {
            let stored = n("stored_per_written");
            assert!((1.5..=4.0).contains(&stored), "stored {stored} per byte in {r}");
        }
    }
    for axis in [("procs", 2), ("procs", 1)] {
        assert!(rows.iter().any(|r| r[axis.0] == axis.1), "{axis:?}");
    }

    // CSV: the same rows and columns.
    let csv = String::from_utf8(read(&out.join("matrix.csv"))).unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next().unwrap(), COLUMNS.join(","));
    assert_eq!(lines.count(), rows.len());

    // The chart, as SVG and PNG.
    let svg = String::from_utf8(read(&out.join("matrix.svg"))).unwrap();
    assert!(svg.trim_start().starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{svg}");
    assert!(svg.contains("RP_2G1") && svg.contains("EC_2P1G1") && svg.contains("write bandwidth"), "{svg}");
    assert_eq!(png_size(&read(&out.join("matrix.png"))), (1200, 560));
}

#[test]
fn bench_checkpoint_workload_prints_json_and_csv() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    let common = [
        "--dir",
        dir,
        "--servers",
        "3",
        "--targets",
        "1",
        "--classes",
        "EC_2P1G1",
        "--sizes",
        "64KiB",
        "--bytes",
        "1MiB",
        "--qd",
        "2",
        "--disk",
        "none",
    ];
    let args: Vec<&str> = ["--json", "bench", "matrix", "--workload", "checkpoint", "--procs", "2"]
        .iter()
        .chain(&common)
        .copied()
        .collect();
    let report: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert!(report["disk"].is_null());
    for r in rows {
        assert_eq!(r["workload"], "checkpoint");
        assert_eq!(r["procs"], 2);
        // Four writers dump 256 KiB each.
        assert_eq!(r["bytes"], 1 << 20, "{r}");
    }

    let args: Vec<&str> = ["bench", "matrix", "--api", "kv", "--csv"].iter().chain(&common).copied().collect();
    let csv = ok(&args);
    let mut lines = csv.lines();
    assert_eq!(lines.next().unwrap(), COLUMNS.join(","));
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 2, "{csv}");
    assert!(rows[0].starts_with("matrix,EC_2P1G1,kv,65536,aligned,-,seq,private,1,2,write,"), "{csv}");
}

#[test]
fn bench_matrix_refuses_bad_arguments_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    let fails = |args: &[&str]| {
        let o = shoal(args);
        assert!(!o.status.success(), "shoal {args:?} should fail");
        String::from_utf8(o.stderr).unwrap()
    };
    let e = fails(&["bench", "matrix", "--dir", dir, "--servers", "3", "--targets", "1", "--classes", "RP_4G1"]);
    assert!(e.contains("RP_4G1") && e.contains("needs 4 fault domains"), "{e}");
    let e = fails(&["bench", "matrix", "--dir", dir, "--sizes", "0"]);
    assert!(e.contains("--sizes"), "{e}");
    let e = fails(&["bench", "matrix", "--dir", dir, "--api", "posixx"]);
    assert!(e.contains("posixx"), "{e}");
    // Nothing is left running.
    let left = Command::new("pgrep").args(["-f", &format!("shoal-server.*{dir}")]).output().unwrap();
    assert!(left.stdout.is_empty(), "servers left running: {}", String::from_utf8_lossy(&left.stdout));
}

/// `--api posix` writes files on a FUSE mount of a container of its own,
/// with the cell's class, reads every byte back, and unmounts at the end.
#[test]
fn bench_matrix_posix_cells_run_through_a_mount() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    let args = [
        "--json",
        "bench",
        "matrix",
        "--dir",
        dir,
        "--servers",
        "3",
        "--targets",
        "1",
        "--classes",
        "EC_2P1G1,RP_2G1",
        "--api",
        "posix",
        "--sizes",
        "64KiB",
        "--offsets",
        "aligned,unaligned",
        "--sharing",
        "private,shared",
        "--procs",
        "1,2",
        "--bytes",
        "1MiB",
        "--qd",
        "2",
        "--disk",
        "none",
    ];
    let report: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    let rows = report["rows"].as_array().unwrap();
    // 2 classes x 2 offsets x 2 sharings x 2 procs, a write and a read row each.
    assert_eq!(rows.len(), 2 * 2 * 2 * 2 * 2, "rows");
    for r in rows {
        assert_eq!(r["api"], "posix", "{r}");
        assert_eq!(r["gather"], "-", "{r}");
        let n = |c: &str| r[c].as_f64().unwrap_or_else(|| panic!("{c} in {r}"));
        assert!(n("ops") >= 1.0 && n("bytes") == n("ops") * 65536.0 && n("mib_s") > 0.0, "{r}");
        if r["op"] == "write" {
            let read_row = rows
                .iter()
                .find(|x| x["op"] == "read" && ["class", "offsets", "sharing", "procs"].iter().all(|c| x[c] == r[c]))
                .unwrap();
            assert_eq!(read_row["bytes"], r["bytes"], "read back all of {r}");
            // The files got the cell's class: 64 KiB writes to an RP_2G1
            // file are stored twice, to an EC_2P1G1 one 1.5x or more.
            if let Some(stored) = r["stored_per_written"].as_f64() {
                let min = if r["class"] == "RP_2G1" { 1.5 } else { 1.3 };
                assert!(stored >= min, "stored {stored} per byte in {r}");
            }
        }
    }
    // Unmounted, and nothing left running.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(dir), "a mount was left: {mounts}");
    let left = Command::new("pgrep").args(["-f", &format!("shoal.*{dir}")]).output().unwrap();
    assert!(left.stdout.is_empty(), "processes left running: {}", String::from_utf8_lossy(&left.stdout));
}
