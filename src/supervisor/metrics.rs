//! `/metrics`: what the service reports to Prometheus, and its encoding.
//!
//! [`Snapshot`] is plain data that [`super::service::Service::metrics`] fills from its state at
//! each scrape; [`Histogram`] is the plain data of one histogram, kept by the service between
//! scrapes. [`encode`] turns a snapshot into the OpenMetrics text format with the
//! prometheus-client crate, which no other module uses. The HTTP side is [`super::scrape`].

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use zygote_runtime::protocol::RestartReasons;

/// The content type of [`encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds (seconds) of `zygote_spawn_ready_seconds`: from a fork's few milliseconds to
/// a model load's minute.
pub const SPAWN_READY_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Upper bounds (seconds) of `zygote_request_duration_seconds`: the protocol's
/// [`zygote_runtime::protocol::LATENCY_BOUNDS_MS`], which the workers count in.
pub const REQUEST_LATENCY_BOUNDS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The counts of one histogram: `counts[i]` observations at most `bounds[i]`, the last one
/// above every bound.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub bounds: &'static [f64],
    pub counts: Vec<u64>,
    pub sum: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    pub fn observe(&mut self, v: f64) {
        let i = self.bounds.partition_point(|b| *b < v);
        self.counts[i] += 1;
        self.sum += v;
    }

    /// Adds `counts` (of the same bounds) and `sum`; counts of other bounds are refused.
    pub fn add(&mut self, counts: &[u64], sum: f64) -> bool {
        if counts.len() != self.counts.len() {
            return false;
        }
        for (mine, theirs) in self.counts.iter_mut().zip(counts) {
            *mine += theirs;
        }
        self.sum += sum;
        true
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// Everything `/metrics` shows, at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Workers by state (`starting`, `serving`, `draining`).
    pub workers: Vec<(&'static str, u64)>,
    /// Warm spares by state (`starting`, `ready`, `draining`).
    pub spares: Vec<(&'static str, u64)>,
    /// Replacements since the start, by reason (slots dropped by scaling included).
    pub restarts: RestartReasons,
    /// Spawn to `ready`, of every owner and worker.
    pub spawn_ready: Histogram,
    /// Proportional set size by role and slot (the processes of one slot added up).
    pub pss_bytes: Vec<(&'static str, Option<u32>, u64)>,
    /// Requests answered by workers, as their heartbeats said (dead ones included).
    pub requests: u64,
    /// The weights each device's owner serves.
    pub weights_bytes: Vec<(u32, u64)>,
    /// Request latency of the workers that report it in their heartbeats.
    pub latency: Histogram,
}

/// The snapshot as a prometheus-client collector: every family described at each scrape.
#[derive(Debug)]
struct Families(Snapshot);

fn describe<'a>(
    enc: &'a mut DescriptorEncoder,
    name: &'a str,
    help: &str,
    kind: MetricType,
) -> Result<prometheus_client::encoding::MetricEncoder<'a>, std::fmt::Error> {
    enc.encode_descriptor(name, help, None, kind)
}

/// A histogram's counts as the encoder takes them (the last bound is `+Inf`).
fn buckets(h: &Histogram) -> Vec<(f64, u64)> {
    h.bounds
        .iter()
        .copied()
        .chain([f64::MAX])
        .zip(h.counts.iter().copied())
        .collect()
}

impl Collector for Families {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::NoLabelSet;
        let s = &self.0;
        let mut m = describe(
            &mut enc,
            "zygote_build",
            "The version of the zygote binary.",
            MetricType::Info,
        )?;
        m.encode_info(&[("version", env!("CARGO_PKG_VERSION"))])?;

        let mut m = describe(
            &mut enc,
            "zygote_workers",
            "Workers by state.",
            MetricType::Gauge,
        )?;
        for (state, n) in &s.workers {
            ConstGauge::new(*n as i64).encode(m.encode_family(&[("state", *state)])?)?;
        }

        let mut m = describe(
            &mut enc,
            "zygote_spares",
            "Warm spares (--spares) by state: ready ones do not accept until activated.",
            MetricType::Gauge,
        )?;
        for (state, n) in &s.spares {
            ConstGauge::new(*n as i64).encode(m.encode_family(&[("state", *state)])?)?;
        }

        let mut m = describe(
            &mut enc,
            "zygote_worker_restarts",
            "Workers replaced since the start, by reason.",
            MetricType::Counter,
        )?;
        let r = &s.restarts;
        for (reason, n) in [
            ("exit", r.exit),
            ("signal", r.signal),
            ("heartbeat", r.heartbeat),
            ("recycle", r.recycle),
            ("roll", r.roll),
        ] {
            ConstCounter::new(u64::from(n)).encode(m.encode_family(&[("reason", reason)])?)?;
        }

        let m = describe(
            &mut enc,
            "zygote_spawn_ready_seconds",
            "Time from a spawn to the child's ready, owners and workers.",
            MetricType::Histogram,
        )?;
        let h = &s.spawn_ready;
        let mut m = m;
        m.encode_histogram::<NoLabelSet>(h.sum, h.count(), &buckets(h), None)?;

        let mut m = describe(
            &mut enc,
            "zygote_process_pss_bytes",
            "Proportional set size of each process (shared pages divided among their users).",
            MetricType::Gauge,
        )?;
        for (role, slot, bytes) in &s.pss_bytes {
            let slot = slot.map(|n| n.to_string()).unwrap_or_default();
            let labels = [("role", role.to_string()), ("slot", slot)];
            ConstGauge::new(*bytes as i64).encode(m.encode_family(&labels)?)?;
        }

        let m = describe(
            &mut enc,
            "zygote_requests",
            "Requests answered by the workers, from their heartbeats.",
            MetricType::Counter,
        )?;
        ConstCounter::new(s.requests).encode(m)?;

        let mut m = describe(
            &mut enc,
            "zygote_weights_bytes",
            "Bytes of weights each device's owner serves.",
            MetricType::Gauge,
        )?;
        for (device, bytes) in &s.weights_bytes {
            let labels = [("device", device.to_string())];
            ConstGauge::new(*bytes as i64).encode(m.encode_family(&labels)?)?;
        }

        let mut m = describe(
            &mut enc,
            "zygote_request_duration_seconds",
            "Request latency in the workers (first byte received to answer queued), from their heartbeats.",
            MetricType::Histogram,
        )?;
        let h = &s.latency;
        m.encode_histogram::<NoLabelSet>(h.sum, h.count(), &buckets(h), None)
    }
}

/// The snapshot in the OpenMetrics text format.
pub fn encode(snapshot: Snapshot) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Families(snapshot)));
    let mut out = String::new();
    // Writing to a String cannot fail, and every value above is encodable.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latency_bounds_are_the_protocols() {
        let ms: Vec<f64> = zygote_runtime::protocol::LATENCY_BOUNDS_MS
            .iter()
            .map(|ms| *ms as f64 / 1000.0)
            .collect();
        assert_eq!(ms, REQUEST_LATENCY_BOUNDS);
    }

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.1, 0.5, 1.0, 7.0] {
            h.observe(v);
        }
        assert_eq!(h.counts, [2, 2, 1], "a bound holds its own value");
        assert_eq!(h.count(), 5);
        assert!((h.sum - 8.65).abs() < 1e-9);
        assert!(h.add(&[1, 0, 0], 0.01));
        assert!(!h.add(&[1, 0], 0.0), "other bounds are refused");
        assert_eq!(h.counts, [3, 2, 1]);
    }

    #[test]
    fn every_family_is_in_the_text_with_its_labels() {
        let mut spawn_ready = Histogram::new(SPAWN_READY_BOUNDS);
        spawn_ready.observe(0.02);
        let text = encode(Snapshot {
            workers: vec![("starting", 1), ("serving", 2), ("draining", 0)],
            spares: vec![("starting", 0), ("ready", 1), ("draining", 0)],
            restarts: RestartReasons {
                exit: 1,
                recycle: 3,
                ..RestartReasons::default()
            },
            spawn_ready,
            pss_bytes: vec![("supervisor", None, 4096), ("worker", Some(1), 8192)],
            requests: 42,
            weights_bytes: vec![(0, 1000)],
            latency: Histogram::new(&[0.01]),
        });
        for line in [
            "zygote_build_info{version=\"",
            "zygote_workers{state=\"serving\"} 2\n",
            "zygote_spares{state=\"ready\"} 1\n",
            "zygote_worker_restarts_total{reason=\"recycle\"} 3\n",
            "zygote_spawn_ready_seconds_bucket{le=\"0.025\"} 1\n",
            "zygote_spawn_ready_seconds_bucket{le=\"+Inf\"} 1\n",
            "zygote_process_pss_bytes{role=\"worker\",slot=\"1\"} 8192\n",
            "zygote_requests_total 42\n",
            "zygote_weights_bytes{device=\"0\"} 1000\n",
            "zygote_request_duration_seconds_count 0\n",
            "# EOF\n",
        ] {
            assert!(text.contains(line), "{line:?} in\n{text}");
        }
    }
}
