//! The `shoal` command line against a real dev cluster: `dev up`, pools,
//! containers, KV and array commands, clear errors, `dev down`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn shoal_bin() -> PathBuf {
    shoal_tests::server_bin().with_file_name("shoal")
}

struct Cli {
    cluster_file: PathBuf,
}

impl Cli {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(shoal_bin())
            .args(args)
            .env("SHOAL_CLUSTER", &self.cluster_file)
            .env_remove("SHOAL_MS")
            .output()
            .expect("run shoal")
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "shoal {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).expect("utf-8 output")
    }

    /// Runs a command that must fail; returns its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(!o.status.success(), "shoal {args:?} should fail");
        String::from_utf8(o.stderr).expect("utf-8 output")
    }
}

impl Drop for Cli {
    /// Stops the dev cluster even when an assertion failed half-way.
    fn drop(&mut self) {
        if self.cluster_file.exists() {
            let _ = self.run(&["dev", "down"]);
        }
    }
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn the_cli_drives_a_dev_cluster_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let cli = Cli { cluster_file: tmp.path().join("cluster.json") };
    let dir = tmp.path().join("dev");
    let dir_s = dir.to_str().unwrap();

    assert!(cli.fails(&["system", "query"]).contains("shoal dev up"));
    let up = json(&cli.ok(&["dev", "up", "--servers", "4", "--targets", "1", "--dir", dir_s, "--json"]));
    assert_eq!(up["servers"].as_array().unwrap().len(), 4);
    assert!(cli.fails(&["dev", "up", "--dir", dir_s]).contains("already running"));

    let sys = json(&cli.ok(&["system", "query", "--json"]));
    assert_eq!(sys["members"].as_array().unwrap().len(), 4);
    assert!(cli.ok(&["system", "query"]).contains("MS"));
    // The server without an MS replica gets one, and loses it again.
    let replicas = sys["ms_replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 3, "{sys}");
    let spare = sys["members"].as_array().unwrap().iter().find(|m| !replicas.iter().any(|r| r["addr"] == m["addr"]));
    let spare = spare.unwrap()["rank"].as_u64().unwrap().to_string();
    let added = json(&cli.ok(&["system", "add-ms", &spare, "--json"]));
    assert_eq!(added.as_array().unwrap().len(), 4, "{added}");
    assert!(cli.ok(&["system", "remove-ms", &spare]).contains("hosts no MS replica"));
    assert!(cli.fails(&["system", "add-ms", "99"]).contains("rank 99"));

    cli.ok(&["pool", "create", "tank"]);
    assert!(cli.fails(&["pool", "create", "tank"]).contains("exists already"));
    let pools = json(&cli.ok(&["pool", "list", "--json"]));
    assert_eq!(pools[0]["label"], "tank");
    let q = cli.ok(&["pool", "query", "tank"]);
    assert!(q.contains("UPIN"), "{q}");

    cli.ok(&["cont", "create", "tank", "c", "--rd-fac", "1"]);
    let e = cli.fails(&["cont", "create", "tank", "bad", "--oclass", "EC_8P2G1"]);
    assert!(e.contains("needs 10 fault domains") && e.contains("classes that fit"), "{e}");
    assert!(cli.fails(&["cont", "create", "tank", "bad", "--oclass", "RP_9G1"]).contains("valid classes"));
    assert!(cli.fails(&["cont", "query", "tank", "nope"]).contains("no container labelled"));
    assert!(cli.fails(&["cont", "list", "nopool"]).contains("no pool is labelled"));
    let cq = json(&cli.ok(&["cont", "query", "tank", "c", "--json"]));
    assert_eq!(cq["container"]["props"]["rd_fac"], 1);
    let why = cq["classes"].to_string();
    assert!(why.contains("EC_2P1GX") && why.contains("RP_2GX"), "{why}");

    cli.ok(&["kv", "put", "tank", "c", "conf", "colour", "blue"]);
    assert_eq!(cli.ok(&["kv", "get", "tank", "c", "conf", "colour"]), "blue");
    cli.ok(&["kv", "put", "tank", "c", "conf", "size", "large"]);
    let keys = json(&cli.ok(&["kv", "ls", "tank", "c", "conf", "--json"]));
    assert_eq!(keys, serde_json::json!(["size", "colour"]));
    cli.ok(&["kv", "rm", "tank", "c", "conf", "size"]);
    assert!(cli.fails(&["kv", "get", "tank", "c", "conf", "size"]).contains("no key"));
    assert!(cli.fails(&["kv", "get", "tank", "c", "missing", "k"]).contains("no KV object"));

    let input = tmp.path().join("in.bin");
    let data = shoal_tests::pattern(9, 3_000_017);
    std::fs::write(&input, &data).unwrap();
    cli.ok(&["array", "write", "tank", "c", "big", input.to_str().unwrap()]);
    let stat = json(&cli.ok(&["array", "stat", "tank", "c", "big", "--json"]));
    assert_eq!(stat["size"], 3_000_017);
    assert_eq!(stat["class"], "EC_2P1GX");
    let output = tmp.path().join("out.bin");
    cli.ok(&["array", "read", "tank", "c", "big", output.to_str().unwrap()]);
    assert!(std::fs::read(&output).unwrap() == data);
    // By OID as well as by name, and a sub-range to stdout.
    let oid = stat["oid"].as_str().unwrap();
    let o = cli.run(&["array", "read", "tank", "c", oid, "--offset", "1000", "--len", "10"]);
    assert!(o.status.success());
    assert_eq!(o.stdout, data[1000..1010]);
    assert!(cli.fails(&["array", "read", "tank", "c", "conf"]).contains("not an array"));

    // Practising failures: kill a server (not the MS's), write on, see it
    // declared down, bring it back, add one.
    let sys = json(&cli.ok(&["system", "query", "--json"]));
    let victim = sys["members"].as_array().unwrap().iter().map(|m| m["rank"].as_u64().unwrap()).max().unwrap();
    let victim_s = victim.to_string();
    cli.ok(&["dev", "kill", &victim_s]);
    cli.ok(&["kv", "put", "tank", "c", "conf", "colour", "green"]);
    assert_eq!(cli.ok(&["kv", "get", "tank", "c", "conf", "colour"]), "green");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let sys = json(&cli.ok(&["system", "query", "--json"]));
        let m = sys["members"].as_array().unwrap().iter().find(|m| m["rank"] == victim).unwrap().clone();
        if m["state"] == "Down" || m["state"] == "Excluded" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "rank {victim} never declared down: {m}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    cli.ok(&["dev", "restart", &victim_s]);
    assert!(cli.fails(&["dev", "restart", &victim_s]).contains("is running"));
    // Back in: it is rebuilt and serves again.
    assert!(cli.fails(&["system", "reintegrate", "99"]).contains("rank 99"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !cli.run(&["system", "reintegrate", &victim_s]).status.success() {
        assert!(std::time::Instant::now() < deadline, "rank {victim} could never be reintegrated");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(cli
        .fails(&["pool", "reintegrate", "tank", &victim_s])
        .contains("neither down, excluded, draining nor joining"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let p = json(&cli.ok(&["pool", "query", "tank", "--json"]));
        let mine: Vec<_> = p["targets"].as_array().unwrap().iter().filter(|t| t["rank"] == victim).cloned().collect();
        if p["pool"]["rebuilding"].as_array().unwrap().is_empty() && mine.iter().all(|t| t["state"] == "UPIN") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "rank {victim} never served again: {p}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // Drained out: its shards move first, then it is out; data stays.
    assert!(cli.fails(&["system", "drain", "99"]).contains("rank 99"));
    cli.ok(&["pool", "drain", "tank", &victim_s]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let p = json(&cli.ok(&["pool", "query", "tank", "--json"]));
        let mine: Vec<_> = p["targets"].as_array().unwrap().iter().filter(|t| t["rank"] == victim).cloned().collect();
        if p["pool"]["rebuilding"].as_array().unwrap().is_empty() && mine.iter().all(|t| t["state"] == "DOWNOUT") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "rank {victim} never drained: {p}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    cli.ok(&["dev", "kill", &victim_s]);
    assert_eq!(cli.ok(&["kv", "get", "tank", "c", "conf", "colour"]), "green");
    cli.ok(&["array", "read", "tank", "c", "big", output.to_str().unwrap()]);
    assert!(std::fs::read(&output).unwrap() == data, "the array after the drain");
    let check = json(&cli.ok(&["cont", "check", "tank", "c", "--json"]));
    assert!(check["objects"].as_u64().unwrap() >= 3, "{check}");
    assert_eq!(check["affected"].as_array().unwrap().len(), 0, "{check}");
    assert!(cli.ok(&["cont", "check", "tank", "c"]).contains("0 with data that cannot be read"));
    cli.ok(&["dev", "add", "--targets", "1"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while json(&cli.ok(&["system", "query", "--json"]))["members"].as_array().unwrap().len() < 5 {
        assert!(std::time::Instant::now() < deadline, "the added server never joined");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(cli.ok(&["kv", "get", "tank", "c", "conf", "colour"]), "green");

    cli.ok(&["dev", "down", "--clean"]);
    assert!(!Path::new(&dir).exists());
    assert!(!cli.cluster_file.exists());
}
