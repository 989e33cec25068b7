//! Finding a cluster the way the `shoal` tool does, so a program needs no
//! address of its own: `$SHOAL_MS` (management service addresses,
//! separated by commas), else the cluster file `shoal dev up` writes
//! (`$SHOAL_CLUSTER`, else `~/.shoal/cluster.json`).
//!
//! # Examples
//!
//! ```no_run
//! # async fn demo() -> shoal_common::Result<()> {
//! // SHOAL_MS=10.0.0.1:10001,10.0.0.2:10001, or after `shoal dev up`:
//! let client = shoal_client::Client::from_env().await?;
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;
use shoal_common::error::Entity;
use shoal_common::{Result, ShoalError};

/// The environment variable that names management service addresses.
pub const MS_VAR: &str = "SHOAL_MS";
/// The environment variable that names the cluster file.
pub const CLUSTER_VAR: &str = "SHOAL_CLUSTER";

/// The cluster file to read: `$SHOAL_CLUSTER`, else
/// `~/.shoal/cluster.json`.
pub fn cluster_file() -> PathBuf {
    if let Some(p) = std::env::var_os(CLUSTER_VAR) {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".shoal").join("cluster.json")
}

/// The management service addresses a cluster file names.
pub fn ms_from_file(path: &Path) -> Result<Vec<String>> {
    #[derive(Deserialize)]
    struct File {
        ms: Vec<String>,
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| ShoalError::not_found(Entity::ClusterConfig, format!("cluster file {}: {e}", path.display())))?;
    let f: File = serde_json::from_str(&text)
        .map_err(|e| ShoalError::invalid(format!("cluster file {}: {e}", path.display())))?;
    if f.ms.is_empty() {
        return Err(ShoalError::invalid(format!("cluster file {} names no management service", path.display())));
    }
    Ok(f.ms)
}

/// The management service addresses from the environment: `$SHOAL_MS`,
/// else the cluster file (see [`cluster_file`], or `file` if given).
pub fn ms_from_env(file: Option<&Path>) -> Result<Vec<String>> {
    if let Ok(v) = std::env::var(MS_VAR) {
        let addrs: Vec<String> = v.split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_string).collect();
        if addrs.is_empty() {
            return Err(ShoalError::invalid(format!("{MS_VAR} is set but names no address")));
        }
        return Ok(addrs);
    }
    let path = file.map_or_else(cluster_file, Path::to_path_buf);
    ms_from_file(&path).map_err(|e| {
        ShoalError::not_found(
            Entity::ManagementService,
            format!(
                "no management service given: set {MS_VAR}=HOST:PORT[,...], or start one with `shoal dev up` ({e})"
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_file_names_its_ms() {
        let dir = std::env::temp_dir().join(format!("shoal-discover-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cluster.json");
        std::fs::write(&path, r#"{"ms":["127.0.0.1:1","127.0.0.1:2"],"dir":"/x","servers":[]}"#).unwrap();
        assert_eq!(ms_from_file(&path).unwrap(), vec!["127.0.0.1:1", "127.0.0.1:2"]);
        std::fs::write(&path, r#"{"ms":[]}"#).unwrap();
        assert!(matches!(ms_from_file(&path), Err(ShoalError::InvalidArgument(_))));
        std::fs::write(&path, "not json").unwrap();
        assert!(matches!(ms_from_file(&path), Err(ShoalError::InvalidArgument(_))));
        assert!(matches!(ms_from_file(&dir.join("none.json")), Err(ShoalError::NotFound { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
