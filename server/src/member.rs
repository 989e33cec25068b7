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

/// Why this server's clock is too far off the MS's, if it is: the MS read
/// its clock (`ms_ns`) somewhere between this server's `sent_ns` and
/// `got_ns`, so only an offset beyond the limit by more than that window
/// counts (a slow or retried heartbeat is never taken for a wrong clock).
fn clock_fault(rank: u32, sent_ns: u64, got_ns: u64, ms_ns: u64) -> Option<String> {
    let (off, how) = shoal_common::hlc::clock_off(sent_ns, got_ns, ms_ns)?;
    (off > crate::ms::SERVER_CLOCK_SKEW).then(|| {
        format!(
            "rank {rank}'s clock is at least {off:.1?} {how} the management service's (at most {:?}); \
             it refuses writes until time sync (NTP, chrony) fixes it",
            crate::ms::SERVER_CLOCK_SKEW
        )
    })
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
            let sent = shoal_common::hlc::wall_ns();
            let hb = HeartbeatReq {
                rank,
                uuid: id.uuid,
                period_ms: period.as_millis().min(u32::MAX as u128) as u32,
                tombstones_seen,
                wall_ns: sent,
                rebuild: service.rebuild_progress(),
            };
            match ask(&t, &service.ms_addrs(), &hb).await {
                Ok(r) => {
                    service.learn_ms(&r.ms_replicas);
                    let fault = clock_fault(rank, sent, shoal_common::hlc::wall_ns(), r.wall_ns);
                    if let Some(m) = &fault {
                        tracing::error!("{m}");
                    }
                    service.set_clock_fault(fault);
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
                Err(e) => warn!("heartbeat failed: {e}"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::clock_fault;

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_slow_heartbeat_is_not_a_wrong_clock() {
        let t0 = 1_700_000_000 * S;
        // The MS answered 19.8 s after the heartbeat left (queues,
        // retries, a slow disk): the clocks agree.
        assert_eq!(clock_fault(1, t0, t0 + 20 * S, t0 + 19_800_000_000), None);
        assert_eq!(clock_fault(1, t0, t0 + S / 100, t0 + S / 200), None);
        // Within the limit outside the window.
        assert_eq!(clock_fault(1, t0, t0 + S / 100, t0 + 4 * S), None);
    }

    #[test]
    fn a_clock_off_by_more_than_the_limit_is_a_fault() {
        let t0 = 1_700_000_000 * S;
        let behind = clock_fault(3, t0, t0 + S / 100, t0 + 20 * S).expect("20 s behind");
        assert!(behind.contains("rank 3") && behind.contains("behind"), "{behind}");
        let ahead = clock_fault(3, t0, t0 + S / 100, t0 - 20 * S).expect("20 s ahead");
        assert!(ahead.contains("ahead of"), "{ahead}");
        // A slow answer widens the window but not without bound: 20 s off
        // with a 2 s round trip is still a fault.
        assert!(clock_fault(3, t0, t0 + 2 * S, t0 + 25 * S).is_some());
    }
}
