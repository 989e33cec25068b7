//! Server configuration: a TOML file, overridden by command-line flags.
//!
//! ```toml
//! listen = "0.0.0.0:10001"     # port 0 lets the OS choose
//! data_dir = "/var/lib/shoal"
//! targets = 2
//! log_level = "info"
//! inline_threshold = "4KiB"    # values up to this size live in RocksDB
//! reserve = "64MiB"            # free space every target keeps back
//! ms = false                   # host the management service here
//! ms_addrs = ["10.0.0.1:10001"] # where the management service is
//! advertise = "10.0.0.2:10001" # address others use (default: the bound one)
//! fault_domain = "rack1/node2" # default: the advertised address
//! heartbeat = "1s"
//! max_clock_skew = "10s"       # updates stamped further ahead are refused
//! frame_budget = "1GiB"        # request/reply frames held in memory at once
//! aggregation_delay = "60s"    # history younger than this stays readable
//! aggregation_interval = "10s" # how often old versions are removed
//! down_after = "5s"            # MS: a server this silent is declared DOWN
//! exclude_after = "30s"        # MS: a DOWN server is excluded after this
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

/// Most targets one server may run.
pub const MAX_TARGETS: u32 = 64;

/// Everything `shoal-server` needs to start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on (`host:port`).
    pub listen: String,
    /// Directory holding every target of this server.
    pub data_dir: PathBuf,
    /// Number of targets (independent storage slices).
    pub targets: u32,
    /// Log filter: a level (`info`) or a tracing directive list.
    pub log_level: String,
    /// Values up to this size are stored inline in RocksDB.
    pub inline_threshold: ByteSize,
    /// Free space each target keeps back; writes beyond it get `NoSpace`.
    pub reserve: ByteSize,
    /// Whether this server hosts the management service.
    pub ms: bool,
    /// Addresses of the management service (empty with `ms = true`: this
    /// server itself). Empty and `ms = false`: the server runs alone.
    pub ms_addrs: Vec<String>,
    /// The address other servers and clients use to reach this one.
    pub advertise: Option<String>,
    /// The server's fault domain (default: its advertised address).
    pub fault_domain: Option<String>,
    /// How often the server tells the MS it is alive.
    #[serde(with = "humantime_serde")]
    pub heartbeat: std::time::Duration,
    /// Updates stamped further than this ahead of this server's clock are
    /// refused (the sender's clock is wrong).
    #[serde(with = "humantime_serde")]
    pub max_clock_skew: std::time::Duration,
    /// Bytes of request and reply frames the server holds at once; a
    /// sender waits (TCP back-pressure) while it is used up.
    pub frame_budget: ByteSize,
    /// How far behind the clock aggregation stays: reads of history
    /// younger than this always see every version.
    #[serde(with = "humantime_serde")]
    pub aggregation_delay: std::time::Duration,
    /// How often each target aggregates (0s: never).
    #[serde(with = "humantime_serde")]
    pub aggregation_interval: std::time::Duration,
    /// (MS) A server silent this long is declared DOWN: writes go on
    /// without it.
    #[serde(with = "humantime_serde")]
    pub down_after: std::time::Duration,
    /// (MS) A DOWN server is excluded (DOWNOUT) after this long, and its
    /// shards are rebuilt elsewhere; a server back sooner is not.
    #[serde(with = "humantime_serde")]
    pub exclude_after: std::time::Duration,
    /// Where to serve Prometheus metrics (`GET /metrics`), if anywhere.
    pub metrics: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:10001".into(),
            data_dir: PathBuf::from("/var/lib/shoal"),
            targets: 2,
            log_level: "info".into(),
            inline_threshold: ByteSize::kib(4),
            reserve: ByteSize::mib(64),
            ms: false,
            ms_addrs: Vec::new(),
            advertise: None,
            fault_domain: None,
            heartbeat: std::time::Duration::from_secs(1),
            max_clock_skew: std::time::Duration::from_secs(10),
            frame_budget: ByteSize::gib(1),
            aggregation_delay: std::time::Duration::from_secs(60),
            aggregation_interval: std::time::Duration::from_secs(10),
            down_after: std::time::Duration::from_secs(5),
            exclude_after: std::time::Duration::from_secs(30),
            metrics: None,
        }
    }
}

impl ServerConfig {
    /// Reads a TOML config file.
    pub fn load(path: &Path) -> anyhow::Result<ServerConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parse config file {}", path.display()))
    }

    /// Checks every field and names the bad one.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.listen.parse::<SocketAddr>().is_err() {
            bail!("config field `listen`: {:?} is not an IP:port address", self.listen);
        }
        if self.data_dir.as_os_str().is_empty() {
            bail!("config field `data_dir` is empty");
        }
        if self.targets == 0 || self.targets > MAX_TARGETS {
            bail!("config field `targets`: {} is outside 1..={MAX_TARGETS}", self.targets);
        }
        if self.inline_threshold.as_u64() > 64 * 1024 {
            bail!("config field `inline_threshold`: {} is above the 64KiB limit", self.inline_threshold);
        }
        for a in &self.ms_addrs {
            if a.parse::<SocketAddr>().is_err() {
                bail!("config field `ms_addrs`: {a:?} is not an IP:port address");
            }
        }
        if let Some(a) = &self.advertise {
            match a.parse::<SocketAddr>() {
                Ok(sa) if sa.ip().is_unspecified() || sa.port() == 0 => {
                    bail!("config field `advertise`: {a:?} is not an address others can reach")
                }
                Ok(_) => {}
                Err(_) => bail!("config field `advertise`: {a:?} is not an IP:port address"),
            }
        }
        if let Some(d) = &self.fault_domain {
            if d.trim().is_empty() || d.len() > 255 {
                bail!("config field `fault_domain` must be 1..=255 bytes");
            }
        }
        let joins = self.ms || !self.ms_addrs.is_empty();
        let listen_any = self.listen.parse::<SocketAddr>().map(|a| a.ip().is_unspecified()).unwrap_or(false);
        if joins && listen_any && self.advertise.is_none() {
            bail!(
                "config field `advertise` is needed: the server listens on {} and must tell others one address that reaches it",
                self.listen
            );
        }
        if self.heartbeat.is_zero() || self.heartbeat > std::time::Duration::from_secs(60) {
            bail!("config field `heartbeat`: {:?} is outside (0s, 60s]", self.heartbeat);
        }
        if self.max_clock_skew < std::time::Duration::from_millis(100) {
            bail!("config field `max_clock_skew`: {:?} is below 100ms", self.max_clock_skew);
        }
        let min_budget = shoal_common::limits::MAX_FRAME as u64 * 2;
        if self.frame_budget.as_u64() < min_budget {
            bail!(
                "config field `frame_budget`: {} is below {} (two of the largest frames)",
                self.frame_budget,
                ByteSize::b(min_budget)
            );
        }
        if self.down_after < std::time::Duration::from_millis(500) {
            bail!("config field `down_after`: {:?} is below 500ms", self.down_after);
        }
        if self.log_level.trim().is_empty() {
            bail!("config field `log_level` is empty");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes_parse_and_bad_fields_are_named() {
        let c: ServerConfig =
            toml::from_str("targets = 4\ninline_threshold = \"8KiB\"\nheartbeat = \"500ms\"\n").unwrap();
        assert_eq!(c.heartbeat, std::time::Duration::from_millis(500));
        assert_eq!(c.targets, 4);
        assert_eq!(c.inline_threshold.as_u64(), 8192);
        c.validate().unwrap();
        let bad = ServerConfig { targets: 0, ..ServerConfig::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("targets"));
        let bad = ServerConfig { listen: "nowhere".into(), ..ServerConfig::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("listen"));
        assert!(toml::from_str::<ServerConfig>("bogus = 1").is_err());
        let any = ServerConfig { listen: "0.0.0.0:1".into(), ms: true, ..ServerConfig::default() };
        assert!(any.validate().unwrap_err().to_string().contains("advertise"));
        let ok = ServerConfig { advertise: Some("10.0.0.1:1".into()), ..any };
        ok.validate().unwrap();
        let bad = ServerConfig { fault_domain: Some(" ".into()), ..ServerConfig::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("fault_domain"));
    }
}
