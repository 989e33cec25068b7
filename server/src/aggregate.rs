//! The aggregation worker: every interval, each target removes the
//! versions no read at or after the horizon (the clock minus the
//! aggregation delay) can see, and gives their space back. See
//! `store::aggregate` for what is kept.
//!
//! The worker runs one target at a time on a blocking thread, so it takes
//! at most one core from foreground I/O, and stops with the server.

use std::sync::Arc;
use std::time::Duration;

use shoal_common::hlc::{wall_ns, LOGICAL_BITS};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::service::Service;

/// Aggregates every `interval`, keeping `delay` of history, until `stop`.
pub async fn run(service: Arc<Service>, interval: Duration, delay: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        if let Some(why) = service.clock_fault() {
            warn!("aggregation waits for this server's clock: {why}");
            continue;
        }
        let horizon = (wall_ns().saturating_sub(delay.as_nanos() as u64) >> LOGICAL_BITS) << LOGICAL_BITS;
        for store in service.stores() {
            let store = store.clone();
            let r = tokio::task::spawn_blocking(move || store.aggregate(horizon)).await;
            match r {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => warn!("aggregation failed: {e}"),
                Err(e) => warn!("aggregation task: {e}"),
            }
            if stop.is_cancelled() {
                return;
            }
        }
    }
}
