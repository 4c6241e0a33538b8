//! Counters and a latency histogram, rendered in the Prometheus text format
//! at `/metrics`. Hand-rolled: a handful of atomics need no framework.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Upper bounds (seconds) of the attempt latency histogram buckets.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 20.0,
];

#[derive(Default, Debug)]
pub struct Metrics {
    pub events_accepted: AtomicU64,
    pub events_duplicate: AtomicU64,
    pub events_rejected: AtomicU64,
    pub deliveries_created: AtomicU64,
    pub attempts_succeeded: AtomicU64,
    pub attempts_failed: AtomicU64,
    pub deliveries_succeeded: AtomicU64,
    pub deliveries_failed: AtomicU64,
    pub deliveries_skipped: AtomicU64,
    pub deliveries_parked: AtomicU64,
    pub endpoints_blocked: AtomicU64,
    pub rule_reloads_ok: AtomicU64,
    pub rule_reloads_failed: AtomicU64,
    /// Cluster mode: live nodes, and how many different rule sets they run
    /// (more than one is worth an alert). Zero in embedded mode.
    pub cluster_nodes: AtomicU64,
    pub cluster_rule_sets: AtomicU64,
    pub claims_lost: AtomicU64,
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
}

impl Metrics {
    pub fn observe_attempt(&self, seconds: f64) {
        for (i, le) in BUCKETS.iter().enumerate() {
            if seconds <= *le {
                self.latency_buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_us
            .fetch_add((seconds * 1e6) as u64, Relaxed);
    }

    /// The Prometheus text exposition; `gauges` are values read at scrape time.
    pub fn render(&self, gauges: &[(&str, &str, u64)]) -> String {
        let mut s = String::new();
        let counter = |s: &mut String, name: &str, help: &str, labels: &[(&str, &AtomicU64)]| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter");
            for (label, v) in labels {
                if label.is_empty() {
                    let _ = writeln!(s, "{name} {}", v.load(Relaxed));
                } else {
                    let _ = writeln!(s, "{name}{{{label}}} {}", v.load(Relaxed));
                }
            }
        };
        counter(
            &mut s,
            "rulehook_events_total",
            "Events posted to ingest, by result.",
            &[
                ("result=\"accepted\"", &self.events_accepted),
                ("result=\"duplicate\"", &self.events_duplicate),
                ("result=\"rejected\"", &self.events_rejected),
            ],
        );
        counter(
            &mut s,
            "rulehook_deliveries_created_total",
            "Deliveries built from accepted events.",
            &[("", &self.deliveries_created)],
        );
        counter(
            &mut s,
            "rulehook_deliveries_total",
            "Deliveries that reached an outcome.",
            &[
                ("outcome=\"succeeded\"", &self.deliveries_succeeded),
                ("outcome=\"failed\"", &self.deliveries_failed),
                ("outcome=\"skipped\"", &self.deliveries_skipped),
                ("outcome=\"parked\"", &self.deliveries_parked),
            ],
        );
        counter(
            &mut s,
            "rulehook_attempts_total",
            "Delivery attempts, by result.",
            &[
                ("result=\"success\"", &self.attempts_succeeded),
                ("result=\"failure\"", &self.attempts_failed),
            ],
        );
        counter(
            &mut s,
            "rulehook_endpoint_blocks_total",
            "Times an endpoint was blocked after repeated failures.",
            &[("", &self.endpoints_blocked)],
        );
        counter(
            &mut s,
            "rulehook_rule_reloads_total",
            "Rule reloads, by outcome.",
            &[
                ("outcome=\"ok\"", &self.rule_reloads_ok),
                ("outcome=\"failed\"", &self.rule_reloads_failed),
            ],
        );
        let _ = writeln!(
            s,
            "# HELP rulehook_attempt_duration_seconds Time from sending a request to its complete answer.\n# TYPE rulehook_attempt_duration_seconds histogram"
        );
        for (i, le) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                s,
                "rulehook_attempt_duration_seconds_bucket{{le=\"{le}\"}} {}",
                self.latency_buckets[i].load(Relaxed)
            );
        }
        let count = self.latency_count.load(Relaxed);
        let _ = writeln!(
            s,
            "rulehook_attempt_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            s,
            "rulehook_attempt_duration_seconds_sum {}",
            self.latency_sum_us.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(s, "rulehook_attempt_duration_seconds_count {count}");
        counter(
            &mut s,
            "rulehook_claims_lost_total",
            "Attempts whose result was refused because another node took the delivery over after this node's lease ran out (cluster mode).",
            &[("", &self.claims_lost)],
        );
        let cluster = [
            (
                "rulehook_cluster_nodes",
                "Nodes with a recent heartbeat (cluster mode).",
                self.cluster_nodes.load(Relaxed),
            ),
            (
                "rulehook_cluster_rule_sets",
                "Different rule sets among live nodes; above 1 the nodes disagree (cluster mode).",
                self.cluster_rule_sets.load(Relaxed),
            ),
        ];
        for (name, help, v) in gauges.iter().copied().chain(cluster) {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histogram() {
        let m = Metrics::default();
        m.events_accepted.fetch_add(3, Relaxed);
        m.observe_attempt(0.004);
        m.observe_attempt(2.0);
        let text = m.render(&[("rulehook_queue_depth", "Pending deliveries.", 7)]);
        assert!(
            text.contains("rulehook_events_total{result=\"accepted\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("rulehook_attempt_duration_seconds_bucket{le=\"0.005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("rulehook_attempt_duration_seconds_bucket{le=\"5\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("rulehook_attempt_duration_seconds_count 2\n"),
            "{text}"
        );
        assert!(text.contains("rulehook_queue_depth 7\n"), "{text}");
    }
}
