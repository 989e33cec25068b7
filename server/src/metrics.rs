//! Prometheus metrics of one server (`--metrics ADDR`, `GET /metrics`).
//!
//! Names are `shoal_<area>_<what>`:
//!
//! - `shoal_rpc_requests_total{op}`, `shoal_rpc_errors_total{op}`,
//!   `shoal_rpc_latency_seconds{op}` (histogram),
//!   `shoal_rpc_received_bytes_total{op}` and `shoal_rpc_sent_bytes_total{op}`
//!   (frame bodies and data segments), per opcode;
//! - `shoal_memory_budget_used_bytes` and `shoal_memory_budget_limit_bytes`
//!   (the frame budget);
//! - `shoal_target_data_bytes{target}`, `shoal_target_free_bytes{target}`,
//!   `shoal_target_poisoned{target}`;
//! - `shoal_server_down_pools` (pools in which the MS says this server is
//!   down), `shoal_rebuild_active_pools`, and per finished rebuild pass
//!   `shoal_rebuild_passes_total`, `shoal_rebuild_objects_total`,
//!   `shoal_rebuild_versions_total`, `shoal_rebuild_bytes_total`,
//!   `shoal_rebuild_skipped_versions_total`, `shoal_rebuild_reclaimed_bytes_total`,
//!   `shoal_rebuild_reclaim_passes_total`,
//!   `shoal_rebuild_failures_total`;
//! - on the server that hosts the MS: `shoal_ms_members{state}` and
//!   `shoal_ms_targets{pool,state}` (the pool maps' target states), and
//!   `shoal_ms_rebuilding_targets{pool}`.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Op {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Target {
    target: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct State {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolState {
    pub pool: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Pool {
    pub pool: String,
}

type Latency = Family<Op, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs to about 1.6 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// One server's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<Op, Counter>,
    errors: Family<Op, Counter>,
    latency: Latency,
    received: Family<Op, Counter>,
    sent: Family<Op, Counter>,
    pub budget_used: Gauge,
    pub budget_limit: Gauge,
    target_data: Family<Target, Gauge>,
    target_free: Family<Target, Gauge>,
    target_poisoned: Family<Target, Gauge>,
    pub down_pools: Gauge,
    pub rebuild_active: Gauge,
    pub rebuild_passes: Counter,
    pub rebuild_objects: Counter,
    pub rebuild_versions: Counter,
    pub rebuild_bytes: Counter,
    pub rebuild_skipped: Counter,
    pub reclaimed_bytes: Counter,
    pub reclaim_passes: Counter,
    pub rebuild_failures: Counter,
    pub ms_members: Family<State, Gauge>,
    pub ms_targets: Family<PoolState, Gauge>,
    pub ms_rebuilding: Family<Pool, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("shoal");
        let m = Metrics {
            requests: Family::default(),
            errors: Family::default(),
            latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            received: Family::default(),
            sent: Family::default(),
            budget_used: Gauge::default(),
            budget_limit: Gauge::default(),
            target_data: Family::default(),
            target_free: Family::default(),
            target_poisoned: Family::default(),
            down_pools: Gauge::default(),
            rebuild_active: Gauge::default(),
            rebuild_passes: Counter::default(),
            rebuild_objects: Counter::default(),
            rebuild_versions: Counter::default(),
            rebuild_bytes: Counter::default(),
            rebuild_skipped: Counter::default(),
            reclaimed_bytes: Counter::default(),
            reclaim_passes: Counter::default(),
            rebuild_failures: Counter::default(),
            ms_members: Family::default(),
            ms_targets: Family::default(),
            ms_rebuilding: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register("rpc_requests", "Requests served, per opcode", m.requests.clone());
        r.register("rpc_errors", "Requests answered with an error, per opcode", m.errors.clone());
        r.register("rpc_latency_seconds", "Time from a request's arrival to its reply", m.latency.clone());
        r.register("rpc_received_bytes", "Request bytes (body and data), per opcode", m.received.clone());
        r.register("rpc_sent_bytes", "Reply bytes (body and data), per opcode", m.sent.clone());
        r.register("memory_budget_used_bytes", "Frame memory in use", m.budget_used.clone());
        r.register("memory_budget_limit_bytes", "Frame memory budget", m.budget_limit.clone());
        r.register("target_data_bytes", "Bytes in a target's data files", m.target_data.clone());
        r.register("target_free_bytes", "Free bytes on a target's file system", m.target_free.clone());
        r.register("target_poisoned", "1 if a target refuses writes after a failed sync", m.target_poisoned.clone());
        r.register("server_down_pools", "Pools in which this server is DOWN or DOWNOUT", m.down_pools.clone());
        r.register("rebuild_active_pools", "Pools being rebuilt", m.rebuild_active.clone());
        r.register("rebuild_passes", "Rebuild passes finished", m.rebuild_passes.clone());
        r.register("rebuild_objects", "Objects sent to spares by finished passes", m.rebuild_objects.clone());
        r.register("rebuild_versions", "Versions sent to spares by finished passes", m.rebuild_versions.clone());
        r.register("rebuild_bytes", "Bytes sent to spares by finished passes", m.rebuild_bytes.clone());
        r.register(
            "rebuild_skipped_versions",
            "Versions finished passes did not send: a server coming back held them already",
            m.rebuild_skipped.clone(),
        );
        r.register(
            "rebuild_reclaimed_bytes",
            "Bytes given back of shards that live elsewhere now (moved by an extension, or a spare given back)",
            m.reclaimed_bytes.clone(),
        );
        r.register(
            "rebuild_reclaim_passes",
            "Passes over a pool's objects for shards that live elsewhere now, finished",
            m.reclaim_passes.clone(),
        );
        r.register("rebuild_failures", "Rebuild passes that failed (and are tried again)", m.rebuild_failures.clone());
        r.register("ms_members", "Members per state (on the MS's server)", m.ms_members.clone());
        r.register("ms_targets", "Pool targets per state (on the MS's server)", m.ms_targets.clone());
        r.register("ms_rebuilding_targets", "Targets being rebuilt (on the MS's server)", m.ms_rebuilding.clone());
        Metrics { registry, ..m }
    }

    /// Records one request.
    pub fn request(&self, op: &'static str, took: Duration, received: u64, sent: u64, failed: bool) {
        let l = Op { op };
        self.requests.get_or_create(&l).inc();
        if failed {
            self.errors.get_or_create(&l).inc();
        }
        self.latency.get_or_create(&l).observe(took.as_secs_f64());
        self.received.get_or_create(&l).inc_by(received);
        self.sent.get_or_create(&l).inc_by(sent);
    }

    /// Records a target's usage.
    pub fn target(&self, target: u32, data: u64, free: u64, poisoned: bool) {
        let l = Target { target };
        self.target_data.get_or_create(&l).set(data as i64);
        self.target_free.get_or_create(&l).set(free as i64);
        self.target_poisoned.get_or_create(&l).set(poisoned as i64);
    }

    /// The metrics in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!("encoding metrics: {e}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_shoal_area_what() {
        let m = Metrics::new();
        m.request("update", Duration::from_millis(3), 100, 10, false);
        m.request("update", Duration::from_millis(5), 100, 10, true);
        m.target(1, 4096, 1 << 30, false);
        let text = m.render();
        assert!(text.contains("shoal_rpc_requests_total{op=\"update\"} 2"), "{text}");
        assert!(text.contains("shoal_rpc_errors_total{op=\"update\"} 1"), "{text}");
        assert!(text.contains("shoal_rpc_received_bytes_total{op=\"update\"} 200"), "{text}");
        assert!(text.contains("shoal_rpc_latency_seconds_count{op=\"update\"} 2"), "{text}");
        assert!(text.contains("shoal_target_data_bytes{target=\"1\"} 4096"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
