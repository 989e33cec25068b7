//! Local `shoal-server` processes, for `shoal demo`, `shoal bench` and the
//! multi-process tests.
//!
//! Each server gets its own directory, listens on a port chosen by the OS
//! and writes its log to `<dir>.log`. Readiness is awaited by polling for
//! the published address and pinging it, never by sleeping a fixed time.
//! Servers can be SIGKILLed, SIGTERMed and restarted.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use shoal_client::ServerClient;

/// Where the `shoal-server` binary is: `$SHOAL_SERVER_BIN`, or beside the
/// running executable (or its parent, for cargo's test executables in
/// `deps/`).
pub fn server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SHOAL_SERVER_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    let dir = if dir.ends_with("deps") { dir.parent().expect("target dir") } else { dir };
    dir.join("shoal-server")
}

/// One `shoal-server` child process.
pub struct LocalServer {
    pub dir: PathBuf,
    pub targets: u32,
    /// The address it listens on ("" before the first start). A restart
    /// binds the same address again, so clients and the MS keep it.
    pub addr: String,
    /// Further `shoal-server` flags (`--ms`, `--ms-addr ...`).
    pub extra: Vec<String>,
    /// Environment variables for the process (tests set `FAILPOINTS`).
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

impl LocalServer {
    /// Starts a server on `dir` with `targets` targets and waits until it
    /// answers.
    pub async fn start(dir: &Path, targets: u32) -> anyhow::Result<LocalServer> {
        LocalServer::start_with(dir, targets, Vec::new()).await
    }

    /// Starts a server with further flags and waits until it answers.
    pub async fn start_with(dir: &Path, targets: u32, extra: Vec<String>) -> anyhow::Result<LocalServer> {
        LocalServer::start_env(dir, targets, extra, Vec::new()).await
    }

    /// Starts a server with further flags and environment variables and
    /// waits until it answers.
    pub async fn start_env(
        dir: &Path,
        targets: u32,
        extra: Vec<String>,
        env: Vec<(String, String)>,
    ) -> anyhow::Result<LocalServer> {
        let mut s = LocalServer { dir: dir.to_path_buf(), targets, addr: String::new(), extra, env, child: None };
        s.spawn().await?;
        Ok(s)
    }

    /// Stops the process with SIGSTOP (it keeps its sockets, answers
    /// nothing), as a hung host would.
    pub fn freeze(&self) {
        if let Some(c) = &self.child {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGSTOP) };
            // Returns once the kernel shows it stopped (state T).
            let stat = format!("/proc/{}/stat", c.id());
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                let s = std::fs::read_to_string(&stat).unwrap_or_default();
                if s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('T')) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// Lets a frozen process run again.
    pub fn thaw(&self) {
        if let Some(c) = &self.child {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
        }
    }

    /// A handle on a server that ran before in `dir` at `addr` (not
    /// running now); `restart` starts it again there.
    pub fn existing(dir: &Path, targets: u32, addr: &str, extra: Vec<String>) -> LocalServer {
        LocalServer { dir: dir.to_path_buf(), targets, addr: addr.to_string(), extra, env: Vec::new(), child: None }
    }

    /// Lets the process run on after this handle is gone; returns its pid.
    pub fn detach(mut self) -> Option<u32> {
        self.child.take().map(|c| c.id())
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.with_extension("log")
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path())?;
        let addr_file = self.dir.join("listen.addr");
        let _ = std::fs::remove_file(&addr_file);
        let listen = if self.addr.is_empty() { "127.0.0.1:0".to_string() } else { self.addr.clone() };
        let mut child = Command::new(server_bin())
            .arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(&self.dir)
            .arg("--targets")
            .arg(self.targets.to_string())
            .arg("--log-level")
            .arg("info")
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {}", server_bin().display()))?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                bail!("shoal-server exited with {status} before it was ready; log:\n{log}");
            }
            if let Ok(a) = std::fs::read_to_string(&addr_file) {
                let c = ServerClient::tcp(a.trim()).with_timeout(Duration::from_secs(2));
                if c.ping().await.is_ok() {
                    self.addr = a.trim().to_string();
                    self.child = Some(child);
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("shoal-server in {} not ready within 120s", self.dir.display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A fresh client of this server.
    pub fn client(&self) -> ServerClient {
        ServerClient::tcp(self.addr.clone())
    }

    /// The server's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the server's process has ended (reaping it if so).
    pub fn exited(&mut self) -> bool {
        self.child.as_mut().is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    /// Kills the server with SIGKILL and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let mut c = self.child.take().context("server not running")?;
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        Ok(c.wait()?)
    }

    /// Starts the server again on the same directory (after a kill).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn().await
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A local multi-server system: the first servers host the management
/// service's replicas (server 0 alone, unless asked for more) and every
/// server joins it.
pub struct LocalCluster {
    pub servers: Vec<LocalServer>,
    /// The MS replicas' addresses (those of the first servers).
    pub ms_addrs: Vec<String>,
}

impl LocalCluster {
    /// Starts `n` servers under `dir` (`dir/server<i>`), each with
    /// `targets` targets, and waits until all have joined the MS.
    pub async fn start(dir: &Path, n: usize, targets: u32) -> anyhow::Result<LocalCluster> {
        LocalCluster::start_with(dir, n, targets, &[]).await
    }

    /// Starts a cluster whose servers all get the further flags `extra`.
    pub async fn start_with(dir: &Path, n: usize, targets: u32, extra: &[&str]) -> anyhow::Result<LocalCluster> {
        LocalCluster::start_replicated(dir, n, targets, 1, extra).await
    }

    /// Starts `n` servers of which the first `replicas` host the
    /// management service's replicas (1, 3 or 5), on ports picked now.
    pub async fn start_replicated(
        dir: &Path,
        n: usize,
        targets: u32,
        replicas: usize,
        extra: &[&str],
    ) -> anyhow::Result<LocalCluster> {
        anyhow::ensure!(n >= 1, "a cluster needs at least one server");
        anyhow::ensure!((1..=n).contains(&replicas), "1..={n} MS replicas, not {replicas}");
        std::fs::create_dir_all(dir)?;
        let more = |v: Vec<String>| v.into_iter().chain(extra.iter().map(|s| s.to_string())).collect::<Vec<_>>();
        let mut servers = Vec::new();
        let ms_addrs = if replicas == 1 {
            let first = LocalServer::start_with(&dir.join("server0"), targets, more(vec!["--ms".into()])).await?;
            let addrs = vec![first.addr.clone()];
            servers.push(first);
            addrs
        } else {
            let addrs = free_addrs(replicas)?;
            // Started together: the replicas elect a leader once a majority runs.
            let starts = addrs.iter().enumerate().map(|(i, a)| {
                let mut s =
                    LocalServer::existing(&dir.join(format!("server{i}")), targets, a, more(ms_flags(&addrs, a)));
                async move { s.spawn().await.map(|()| s) }
            });
            for s in futures::future::join_all(starts).await {
                servers.push(s?);
            }
            addrs
        };
        for i in servers.len()..n {
            let flags = more(ms_flags(&ms_addrs, ""));
            servers.push(LocalServer::start_with(&dir.join(format!("server{i}")), targets, flags).await?);
        }
        let c = LocalCluster { servers, ms_addrs };
        c.wait_joined(n).await?;
        Ok(c)
    }

    /// The management service's first address (see `ms_addrs` for all).
    pub fn ms(&self) -> String {
        self.ms_addrs[0].clone()
    }

    /// Waits until `n` members have joined and are heard from.
    pub async fn wait_joined(&self, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(c) = shoal_client::Client::connect(self.ms_addrs.clone()).await {
                if let Ok(q) = c.system_query().await {
                    let up = q.members.iter().filter(|m| m.state == shoal_common::mgmt::MemberState::Joined).count();
                    if up >= n {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("only some of the {n} servers joined within 120s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Which server's MS replica leads, as the MS answers through
    /// `client`; waits up to `limit` while a leader is being elected.
    pub async fn ms_leader(&self, client: &shoal_client::Client, limit: Duration) -> anyhow::Result<usize> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(q) = client.system_query().await {
                let leader = q.ms_replicas.iter().find(|r| r.role == "leader");
                if let Some(i) = leader.and_then(|r| self.servers.iter().position(|s| s.addr == r.addr)) {
                    return Ok(i);
                }
            }
            if Instant::now() > deadline {
                bail!("no MS leader within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A client connected to this cluster's MS.
    pub async fn client(&self) -> anyhow::Result<shoal_client::Client> {
        Ok(shoal_client::Client::connect(self.ms_addrs.clone()).await?)
    }
}

/// The `shoal-server` flags of a server at `addr` in a system whose MS
/// replicas are at `ms`: every replica's address, and `--ms` if `addr` is
/// one of them.
pub fn ms_flags(ms: &[String], addr: &str) -> Vec<String> {
    let mut v: Vec<String> = ms.iter().flat_map(|a| ["--ms-addr".to_string(), a.clone()]).collect();
    if ms.iter().any(|a| a == addr) {
        v.push("--ms".into());
    }
    v
}

/// `n` loopback addresses with ports free right now.
fn free_addrs(n: usize) -> anyhow::Result<Vec<String>> {
    let held: Vec<std::net::TcpListener> =
        (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
    Ok(held.iter().map(|l| l.local_addr().map(|a| a.to_string())).collect::<Result<_, _>>()?)
}

/// Deterministic pseudo-random bytes for a given seed, so a test or the demo
/// can check every byte it wrote without keeping it.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
