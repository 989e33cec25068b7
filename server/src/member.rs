//! Membership: a server joins the management service and heartbeats it.
//!
//! The loop joins (retrying until the MS answers), then sends a heartbeat
//! every period. Heartbeat replies carry the current pool-map versions,
//! which the service uses to refuse requests from stale clients. A
//! heartbeat refused because the MS does not know the rank leads to a new
//! join. The loop ends when the shutdown token fires.

use std::sync::Arc;
use std::time::Duration;

use shoal_common::mgmt::{HeartbeatReq, JoinReq};
use shoal_common::{Result, ShoalError};
use shoal_net::TcpTransport;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::service::Service;

/// What a server tells the MS about itself.
pub struct Identity {
    pub uuid: u128,
    pub addr: String,
    pub fault_domain: String,
    pub targets: u32,
}

/// Calls the management service for this server's own tasks (heartbeats,
/// rebuild), asking first the replica that answered last: the leader.
pub(crate) async fn ask_ms<R: shoal_common::msg::Rpc>(
    t: &TcpTransport,
    ms: &[String],
    req: &R,
    timeout: Duration,
) -> Result<R::Reply> {
    static LEADER: shoal_net::MsLeader = shoal_net::MsLeader::new();
    LEADER.call(t, ms, req, timeout).await
}

async fn ask<R: shoal_common::msg::Rpc>(t: &TcpTransport, ms: &[String], req: &R) -> Result<R::Reply> {
    ask_ms(t, ms, req, Duration::from_secs(5)).await
}

/// Joins and heartbeats until `stop` fires.
///
/// The MS addresses come from `service` (see [`Service::ms_addrs`]) and
/// follow the replicas each heartbeat reply names.
pub async fn run(id: Identity, period: Duration, service: Arc<Service>, stop: CancellationToken) {
    let t = TcpTransport::default();
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    let join = JoinReq {
        uuid: id.uuid,
        addr: id.addr.clone(),
        fault_domain: id.fault_domain.clone(),
        targets: id.targets,
        host,
        pid: std::process::id(),
    };
    // Destroyed containers this server has dropped, as counted by the MS.
    let mut tombstones_seen = 0u64;
    'outer: loop {
        let rank = loop {
            match ask(&t, &service.ms_addrs(), &join).await {
                Ok(r) => break r.rank,
                Err(e @ ShoalError::InvalidArgument(_)) => {
                    warn!("the management service refuses this server: {e}");
                }
                Err(e) => warn!("cannot join the management service yet: {e}"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
        };
        service.set_rank(rank);
        info!(rank, "joined the system");
        loop {
            let hb = HeartbeatReq {
                rank,
                uuid: id.uuid,
                period_ms: period.as_millis().min(u32::MAX as u128) as u32,
                tombstones_seen,
                wall_ns: shoal_common::hlc::wall_ns(),
                rebuild: service.rebuild_progress(),
            };
            match ask(&t, &service.ms_addrs(), &hb).await {
                Ok(r) => {
                    service.learn_ms(&r.ms_replicas);
                    service.set_clock_fault(None);
                    service.set_pool_versions(&r.pools);
                    service.set_down_in(&r.down_in);
                    service.set_rebuilding(&r.rebuilding);
                    service.set_rebuild_ctl(&r.rebuild_ctl);
                    if !r.tombstones.is_empty() {
                        match service.drop_containers(&r.tombstones).await {
                            Ok(()) => {
                                tombstones_seen += r.tombstones.len() as u64;
                                // Tell the MS at once (a destroy waits for
                                // it), and catch up without a pause.
                                continue;
                            }
                            Err(e) => {
                                warn!("dropping destroyed containers failed: {e}");
                                service.set_heard();
                            }
                        }
                    } else {
                        tombstones_seen = tombstones_seen.min(r.tombstone_count);
                        // Caught up: nothing destroyed is served from here.
                        service.set_heard();
                    }
                }
                Err(ShoalError::NotFound { .. }) => continue 'outer,
                Err(ShoalError::InvalidArgument(m)) if m.contains("clock") => {
                    tracing::error!("{m}");
                    service.set_clock_fault(Some(m));
                }
                Err(e) => warn!("heartbeat failed: {e}"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
        }
    }
}
