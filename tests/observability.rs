//! What an operator sees: `/metrics` read with an independent
//! exposition-format parser (labelled series after deliveries to a good
//! and a failing endpoint, the label cap with 2,000 endpoints), delivery
//! log lines in text and JSON, and OTLP traces received on loopback and
//! decoded with the official OpenTelemetry protobuf definitions.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use serde_json::{Value, json};

use crate::support::receiver::{Answer, Receiver};
use crate::support::server::{Server, setup};
use crate::support::wait_for;

const T: Duration = Duration::from_secs(30);

fn story_created(id: &str) -> Value {
    json!({"id": id, "event_type": "create", "entity_type": "story",
        "scope": {"sharedspace_id": 1001, "workspace_id": 1002},
        "user": {"id": "1001", "email": "admin@example.com"},
        "entity": {"id": "77", "name": "Checkout page", "story_points": 5}})
}

/// The components the build made from `plugins/*` and `tests/plugins/*`.
fn wasm(name: &str) -> PathBuf {
    Path::new(env!("RULEHOOK_WASM_DIR")).join(format!("{name}.wasm"))
}

/// One scrape of `/metrics`, parsed.
struct Scrape(prometheus_parse::Scrape, String);

impl Scrape {
    fn of(server: &Server) -> Scrape {
        let reply = server.admin("GET", "/metrics", None);
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert!(
            reply
                .header("content-type")
                .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
            "{:?}",
            reply.headers
        );
        let text = reply.text();
        let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
            .expect("the exposition parses");
        Scrape(parsed, text)
    }

    /// The samples of `name` whose labels include every pair of `labels`.
    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&prometheus_parse::Sample> {
        self.0
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .collect()
    }

    /// The value of the one sample of `name` with `labels` (0 when absent).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.find(name, labels).iter().map(|s| number(s)).sum()
    }

    /// The declared type of `name` (`# TYPE`).
    fn declares(&self, line: &str) -> bool {
        self.1.lines().any(|l| l == line)
    }
}

fn number(s: &prometheus_parse::Sample) -> f64 {
    match &s.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => *v,
        other => panic!("{}: not a number: {other:?}", s.metric),
    }
}

#[test]
fn metrics_label_deliveries_attempts_and_plugins_by_rule_and_endpoint() {
    let good = Receiver::start(vec![Answer::status(204)]);
    let bad = Receiver::start(vec![Answer::status(404)]);
    let rules = format!(
        "rules:\n  \
         - {{name: to-good, events: [create], fields: [name], webhook: {{url: \"{}\"}}}}\n  \
         - {{name: to-bad, events: [create], webhook: {{url: \"{}\", retry: {{policy: fixed, interval: 100ms, retries: 1}}}}}}\n  \
         - {{name: broken-plugin, events: [create], plugins: [{{name: boom}}], webhook: {{url: \"{}\"}}}}\n",
        good.url("/hook"),
        bad.url("/hook"),
        good.url("/never"),
    );
    let (dir, config) = setup(
        "metrics-labels",
        &rules,
        &format!(
            "plugins_dir: plugins\nhttp_ports: [{}, {}]\n",
            good.addr.port(),
            bad.addr.port()
        ),
    );
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    std::fs::copy(wasm("panic"), dir.path().join("plugins/boom.wasm")).unwrap();
    let server = Server::start_logging_to(&dir, &config, &dir.path().join("server.log"));
    for id in ["m-1", "m-2"] {
        assert_eq!(server.post_event(&story_created(id)).status, 202);
    }
    let good_ep = format!("http://127.0.0.1:{}", good.addr.port());
    let bad_ep = format!("http://127.0.0.1:{}", bad.addr.port());
    // Both to-bad deliveries fail after their retry (404 twice each).
    let m = wait_for(T, "both to-bad deliveries to fail", || {
        let m = Scrape::of(&server);
        (m.value(
            "rulehook_deliveries_total",
            &[("rule", "to-bad"), ("outcome", "failed")],
        ) == 2.0
            && m.value(
                "rulehook_deliveries_total",
                &[("rule", "to-good"), ("outcome", "succeeded")],
            ) == 2.0)
            .then_some(m)
    });

    let attempts = "rulehook_attempts_total";
    assert_eq!(
        m.value(
            attempts,
            &[
                ("rule", "to-good"),
                ("endpoint", &good_ep),
                ("result", "success"),
                ("status", "2xx")
            ]
        ),
        2.0,
        "{}",
        m.1
    );
    assert_eq!(
        m.value(
            attempts,
            &[
                ("rule", "to-bad"),
                ("endpoint", &bad_ep),
                ("result", "failure"),
                ("status", "4xx")
            ]
        ),
        4.0,
        "{}",
        m.1
    );
    // Nothing of one endpoint is counted under the other.
    assert!(
        m.find(attempts, &[("rule", "to-bad"), ("endpoint", &good_ep)])
            .is_empty()
    );
    assert_eq!(
        m.value(
            "rulehook_deliveries_total",
            &[
                ("rule", "to-good"),
                ("endpoint", &good_ep),
                ("outcome", "succeeded")
            ]
        ),
        2.0
    );
    assert_eq!(
        m.value(
            "rulehook_deliveries_total",
            &[
                ("rule", "to-bad"),
                ("endpoint", &bad_ep),
                ("outcome", "failed")
            ]
        ),
        2.0
    );
    // The broken plugin failed both of its deliveries before any attempt.
    assert_eq!(
        m.value(
            "rulehook_deliveries_total",
            &[("rule", "broken-plugin"), ("outcome", "failed")]
        ),
        2.0,
        "{}",
        m.1
    );
    assert_eq!(
        m.value("rulehook_plugin_failures_total", &[("plugin", "boom")]),
        2.0
    );
    assert_eq!(
        m.value(
            "rulehook_plugin_call_duration_seconds_count",
            &[("plugin", "select-fields")]
        ),
        2.0,
        "{}",
        m.1
    );
    assert_eq!(
        m.value("rulehook_deliveries_created_total", &[("rule", "to-bad")]),
        2.0
    );
    assert_eq!(
        m.value("rulehook_events_total", &[("result", "accepted")]),
        2.0
    );

    // Latency by endpoint: a histogram whose buckets count every attempt.
    let latency = m.find(
        "rulehook_attempt_duration_seconds",
        &[("endpoint", &bad_ep)],
    );
    assert_eq!(latency.len(), 1, "{}", m.1);
    let prometheus_parse::Value::Histogram(buckets) = &latency[0].value else {
        panic!("not a histogram: {:?}", latency[0]);
    };
    assert_eq!(buckets.last().map(|b| b.count), Some(4.0), "{buckets:?}");
    assert_eq!(
        m.value(
            "rulehook_attempt_duration_seconds_count",
            &[("endpoint", &good_ep)]
        ),
        2.0
    );
    // Ingest latency (request → 202) and the commit batch sizes.
    assert_eq!(m.value("rulehook_ingest_duration_seconds_count", &[]), 2.0);
    assert!(
        m.value("rulehook_outbox_batch_ops_count", &[]) >= 2.0,
        "{}",
        m.1
    );
    // Counters are typed as counters, the commit count included.
    for line in [
        "# TYPE rulehook_attempts_total counter",
        "# TYPE rulehook_deliveries_total counter",
        "# TYPE rulehook_outbox_commits_total counter",
        "# TYPE rulehook_attempt_duration_seconds histogram",
        "# TYPE rulehook_queue_depth gauge",
        "# TYPE rulehook_rule_reloads_total counter",
    ] {
        assert!(m.declares(line), "no `{line}` in:\n{}", m.1);
    }
    assert!(m.value("rulehook_outbox_commits_total", &[]) >= 2.0);
    assert_eq!(
        m.value("rulehook_rules_loaded", &[]),
        3.0,
        "scrape-time gauges are there too"
    );
}

#[test]
fn metrics_fold_endpoints_and_rules_past_the_cap_into_other() {
    // 2,000 rules, each to its own endpoint: its own loopback address, port 9,
    // where nothing listens (other tests' receivers are all on 127.0.0.1),
    // so each attempt fails at once with no reply.
    const N: usize = 2_000;
    let mut rules = String::from("rules:\n");
    let mut endpoints = HashSet::new();
    for i in 0..N {
        let host = format!("127.{}.{}.1", 1 + i / 250, i % 250);
        endpoints.insert(format!("http://{host}:9"));
        rules.push_str(&format!(
            "  - {{name: fan-{i}, events: [create], webhook: {{url: \"http://{host}:9/h\", retry: {{policy: fixed, interval: 1h, retries: 0}}}}}}\n"
        ));
    }
    assert_eq!(endpoints.len(), N);
    let (dir, config) = setup("metrics-cap", &rules, "http_ports: [9]\n");
    let server = Server::start_logging_to(&dir, &config, &dir.path().join("server.log"));
    assert_eq!(server.post_event(&story_created("fan-out")).status, 202);
    let m = wait_for(Duration::from_secs(120), "2,000 deliveries to fail", || {
        let m = Scrape::of(&server);
        (m.value("rulehook_deliveries_total", &[("outcome", "failed")]) == N as f64).then_some(m)
    });
    let series = m.find("rulehook_attempts_total", &[]);
    let labels = |key: &str| -> HashSet<String> {
        series
            .iter()
            .filter_map(|s| s.labels.get(key).map(str::to_string))
            .collect()
    };
    let (seen_endpoints, seen_rules) = (labels("endpoint"), labels("rule"));
    assert_eq!(seen_endpoints.len(), 1_001, "1,000 endpoints and `other`");
    assert!(seen_endpoints.contains("other"));
    assert!(
        seen_endpoints
            .iter()
            .all(|e| e == "other" || endpoints.contains(e))
    );
    assert_eq!(seen_rules.len(), 1_001, "1,000 rules and `other`");
    // Folding loses no count: every attempt is in some series.
    let total: f64 = series.iter().map(|s| number(s)).sum();
    assert_eq!(total, N as f64);
    assert_eq!(
        m.value("rulehook_attempts_total", &[("endpoint", "other")]),
        1_000.0
    );
    // The latency histograms and the per-endpoint gauges obey the same cap.
    let histograms = m.find("rulehook_attempt_duration_seconds", &[]);
    assert_eq!(histograms.len(), 1_001);
    let failures = m.find("rulehook_endpoint_consecutive_failures", &[]);
    assert_eq!(failures.len(), 1_001, "{}", failures.len());
    // Each endpoint had one attempt; those that failed in transport (no
    // reply, rather than refused before sending) count one failure in a
    // row, folded or not.
    let failing: f64 = failures.iter().map(|s| number(s)).sum();
    let transport: f64 = ["no_reply", "timeout", "invalid_http"]
        .iter()
        .map(|status| m.value("rulehook_attempts_total", &[("status", status)]))
        .sum();
    assert!(transport > 0.0, "{}", m.1);
    assert_eq!(failing, transport);
}

#[test]
fn metrics_count_each_endpoints_pending_deliveries_from_the_store() {
    let good = Receiver::start(vec![Answer::status(204)]);
    let slow = Receiver::start(vec![Answer::status(503)]);
    let rules = format!(
        "rules:\n  \
         - {{name: to-good, events: [create], webhook: {{url: \"{}\"}}}}\n  \
         - {{name: to-slow, events: [create], webhook: {{url: \"{}\", retry: {{policy: fixed, interval: 1h, retries: 3}}}}}}\n",
        good.url("/hook"),
        slow.url("/hook"),
    );
    let (dir, config) = setup(
        "metrics-pending",
        &rules,
        &format!("http_ports: [{}, {}]\n", good.addr.port(), slow.addr.port()),
    );
    let slow_ep = format!("http://127.0.0.1:{}", slow.addr.port());
    let good_ep = format!("http://127.0.0.1:{}", good.addr.port());
    let log = dir.path().join("server.log");
    let server = Server::start_logging_to(&dir, &config, &log);
    for id in ["p-1", "p-2", "p-3"] {
        assert_eq!(server.post_event(&story_created(id)).status, 202);
    }
    // Every first attempt recorded: to-good's are final, to-slow's wait an
    // hour. (Asked of the deliveries API: a scrape would count too early
    // and keep that count for 10 s.)
    good.wait_for(3, T);
    slow.wait_for(3, T);
    let recorded = |q: &str| {
        let r = server.admin("GET", &format!("/v1/deliveries?{q}"), None);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["deliveries"].as_array().map_or(0, Vec::len)
    };
    wait_for(T, "every first attempt to be recorded", || {
        (recorded("rule=to-good&state=succeeded") == 3
            && recorded("rule=to-slow&state=pending") == 3
            && server
                .admin("GET", "/v1/deliveries?rule=to-slow", None)
                .json()["deliveries"]
                .as_array()
                .is_some_and(|d| d.iter().all(|d| d["attempts"] == 1)))
        .then_some(())
    });
    let check = |m: &Scrape| {
        assert_eq!(
            m.value("rulehook_endpoint_pending", &[("endpoint", &slow_ep)]),
            3.0,
            "{}",
            m.1
        );
        assert!(
            m.find("rulehook_endpoint_pending", &[("endpoint", &good_ep)])
                .is_empty(),
            "{}",
            m.1
        );
        assert_eq!(m.value("rulehook_pending_by_endpoint_complete", &[]), 1.0);
        assert_eq!(m.value("rulehook_queue_depth", &[]), 3.0);
    };
    check(&Scrape::of(&server));
    // The count is the store's, not the dispatcher's memory: a restarted
    // server, which has loaded none of them, shows the same.
    drop(server);
    let server = Server::start_logging_to(&dir, &config, &log);
    let m = Scrape::of(&server);
    check(&m);
    assert!(
        m.declares("# TYPE rulehook_endpoint_pending gauge"),
        "{}",
        m.1
    );
}

/// The server's log lines that concern `delivery`.
fn lines_about<'a>(log: &'a str, delivery: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(delivery)).collect()
}

#[test]
fn logs_name_event_delivery_rule_and_endpoint_in_text_and_json() {
    let bad = Receiver::start(vec![Answer::status(404)]);
    let rules = format!(
        "rules:\n  - name: logged\n    events: [create]\n    webhook: {{url: \"{}\", retry: {{policy: fixed, interval: 1h, retries: 0}}}}\n",
        bad.url("/hook?token=s3cret-in-the-query")
    );
    let endpoint = format!("http://127.0.0.1:{}", bad.addr.port());
    for format in ["text", "json"] {
        let (dir, config) = setup(
            &format!("logs-{format}"),
            &rules,
            &format!("http_ports: [{}]\n", bad.addr.port()),
        );
        let log = dir.path().join("server.log");
        let server =
            Server::start_logging_with_env(&dir, &config, &log, &[("RULEHOOK_LOG_FORMAT", format)]);
        let event = format!("log-{format}");
        let reply = server.post_event(&story_created(&event));
        assert_eq!(reply.status, 202);
        let delivery = reply.json()["deliveries"][0].as_str().unwrap().to_string();
        let text = wait_for(T, "the failed delivery's log line", || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            (!lines_about(&text, &delivery).is_empty()).then_some(text)
        });
        let lines = lines_about(&text, &delivery);
        for line in &lines {
            match format {
                "json" => {
                    let v: Value = serde_json::from_str(line)
                        .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                    let f = &v["fields"];
                    assert_eq!(f["event"], event.as_str(), "{line}");
                    assert_eq!(f["delivery"], delivery.as_str(), "{line}");
                    assert_eq!(f["rule"], "logged", "{line}");
                    assert_eq!(f["endpoint"], endpoint.as_str(), "{line}");
                }
                _ => {
                    for field in [
                        format!("event={event}"),
                        format!("delivery={delivery}"),
                        "rule=logged".to_string(),
                        format!("endpoint={endpoint}"),
                    ] {
                        assert!(line.contains(&field), "no {field} in: {line}");
                    }
                }
            }
            assert!(
                !line.contains("s3cret"),
                "the URL's query is logged: {line}"
            );
        }
        let failed = lines
            .iter()
            .find(|l| l.contains("delivery failed"))
            .unwrap_or_else(|| panic!("no failure line: {lines:?}"));
        // The status says what the endpoint answered.
        match format {
            "json" => {
                let v: Value = serde_json::from_str(failed).unwrap();
                assert_eq!(v["fields"]["status"], "404", "{failed}");
                assert_eq!(v["level"], "WARN", "{failed}");
            }
            _ => assert!(failed.contains("status=404"), "{failed}"),
        }
        drop(server);
    }
}

/// Every span in the OTLP requests `collector` received, decoded with the
/// official protobuf definitions.
fn spans(collector: &Receiver) -> Vec<Span> {
    collector
        .received()
        .iter()
        .filter(|r| r.path == "/v1/traces")
        .flat_map(|r| {
            assert_eq!(r.header("content-type"), Some("application/x-protobuf"));
            ExportTraceServiceRequest::decode(r.body.as_slice())
                .expect("an OTLP ExportTraceServiceRequest")
                .resource_spans
        })
        .flat_map(|rs| rs.scope_spans)
        .flat_map(|ss| ss.spans)
        .collect()
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.clone())
        .map(|v| match v {
            Any::StringValue(s) => s,
            Any::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
}

#[test]
fn traces_reach_an_otlp_collector_as_one_tree_per_event_and_per_attempt() {
    let collector = Receiver::start(vec![Answer::status(200)]);
    let rx = Receiver::start(vec![Answer::status(200)]);
    let rules = format!(
        "rules:\n  - name: traced\n    events: [create]\n    fields: [name]\n    webhook: {{url: \"{}\", secret: {{env: TRACED_SECRET}}}}\n",
        rx.url("/hook")
    );
    let (dir, config) = setup(
        "otlp",
        &rules,
        &format!(
            "http_ports: [{}]\notlp_endpoint: http://{}\notlp_sample_ratio: 1\n",
            rx.addr.port(),
            collector.addr
        ),
    );
    let server = Server::start_logging_with_env(
        &dir,
        &config,
        &dir.path().join("server.log"),
        &[("TRACED_SECRET", "never-in-a-span-0123")],
    );
    let reply = server.post_event(&story_created("evt-traced"));
    assert_eq!(reply.status, 202);
    let delivery = reply.json()["deliveries"][0].as_str().unwrap().to_string();
    rx.wait_for(1, T);
    // A root ends after its children, and spans go out in the order they
    // end: once both roots are in, so is every span under them.
    let spans = wait_for(T, "the event's and the attempt's spans", || {
        let spans = spans(&collector);
        let root = |name: &str, key: &str, value: &str| {
            spans
                .iter()
                .any(|s| s.name == name && attr(s, key).as_deref() == Some(value))
        };
        (root("ingest", "event.id", "evt-traced") && root("attempt", "delivery.id", &delivery))
            .then_some(spans)
    });
    let by_id: HashMap<&[u8], &Span> = spans.iter().map(|s| (s.span_id.as_slice(), s)).collect();
    let parent = |s: &Span| {
        by_id
            .get(s.parent_span_id.as_slice())
            .map(|p| p.name.as_str())
    };
    let named = |name: &str, trace: &[u8]| -> Vec<&Span> {
        spans
            .iter()
            .filter(|s| s.name == name && s.trace_id == trace)
            .collect()
    };

    // The event's tree: ingest → event → match, plugins → plugin; commit.
    let ingest = spans
        .iter()
        .find(|s| s.name == "ingest" && attr(s, "event.id").as_deref() == Some("evt-traced"))
        .expect("an ingest span with the event id");
    assert!(ingest.parent_span_id.is_empty(), "ingest is a root");
    let trace = ingest.trace_id.as_slice();
    let event = named("event", trace);
    assert_eq!(event.len(), 1);
    assert_eq!(parent(event[0]), Some("ingest"));
    assert_eq!(attr(event[0], "event.id").as_deref(), Some("evt-traced"));
    assert_eq!(parent(named("match", trace)[0]), Some("event"));
    let plugins = named("plugins", trace);
    assert_eq!(plugins.len(), 1);
    assert_eq!(parent(plugins[0]), Some("event"));
    assert_eq!(
        attr(plugins[0], "delivery.id").as_deref(),
        Some(delivery.as_str())
    );
    assert_eq!(attr(plugins[0], "rule").as_deref(), Some("traced"));
    let plugin = named("plugin", trace);
    assert_eq!(parent(plugin[0]), Some("plugins"));
    assert_eq!(attr(plugin[0], "plugin").as_deref(), Some("select-fields"));
    assert_eq!(parent(named("commit", trace)[0]), Some("ingest"));

    // The attempt's tree: attempt → sign, send, record, with the ids.
    let attempt = spans
        .iter()
        .find(|s| {
            s.name == "attempt" && attr(s, "delivery.id").as_deref() == Some(delivery.as_str())
        })
        .expect("an attempt span with the delivery id");
    assert!(attempt.parent_span_id.is_empty(), "attempt is a root");
    assert_eq!(attr(attempt, "event.id").as_deref(), Some("evt-traced"));
    assert_eq!(
        attr(attempt, "endpoint").as_deref(),
        Some(format!("http://127.0.0.1:{}", rx.addr.port()).as_str())
    );
    assert_eq!(
        attr(attempt, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(attr(attempt, "outcome").as_deref(), Some("succeeded"));
    for child in ["sign", "send", "record"] {
        let c = named(child, attempt.trace_id.as_slice());
        assert_eq!(c.len(), 1, "{child}");
        assert_eq!(parent(c[0]), Some("attempt"), "{child}");
    }
    // No secret in any attribute.
    let all = format!("{spans:?}");
    assert!(!all.contains("never-in-a-span"), "a secret is in a span");
}

#[test]
fn traces_to_a_collector_that_never_answers_hold_no_delivery_up() {
    // A collector that takes connections and never answers: each export
    // waits for its timeout, and spans pile up behind it.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = hole.local_addr().unwrap();
    let held = std::thread::spawn(move || {
        let mut open = Vec::new();
        for conn in hole.incoming().take(64) {
            match conn {
                Ok(c) => open.push(c),
                Err(_) => break,
            }
        }
        open
    });
    let rx = Receiver::start(vec![Answer::status(200)]);
    let rules = format!(
        "rules:\n  - name: traced\n    events: [create]\n    webhook: {{url: \"{}\"}}\n",
        rx.url("/hook")
    );
    let (dir, config) = setup(
        "otlp-hole",
        &rules,
        &format!(
            "http_ports: [{}]\notlp_endpoint: http://{addr}\notlp_sample_ratio: 1\n",
            rx.addr.port()
        ),
    );
    let server = Server::start_logging_to(&dir, &config, &dir.path().join("server.log"));
    let n = 200;
    let body: String = (0..n)
        .map(|i| format!("{}\n", story_created(&format!("hole-{i}"))))
        .collect();
    let reply = server.post_ndjson(&body);
    assert_eq!(reply.status, 202, "{}", reply.text());
    let got = rx.wait_for(n, T);
    assert_eq!(got.len(), n);
    wait_for(T, "every delivery recorded", || {
        (server.deliveries("state=succeeded&limit=1000").len() == n).then_some(())
    });
    drop(server);
    drop(held);
}

#[test]
fn traces_sample_an_event_with_all_its_attempts_or_not_at_all() {
    let collector = Receiver::start(vec![Answer::status(200)]);
    let rx = Receiver::start(vec![Answer::status(200)]);
    let rules = format!(
        "rules:\n  - name: sampled\n    events: [create]\n    webhook: {{url: \"{}\"}}\n",
        rx.url("/hook")
    );
    let (dir, config) = setup(
        "otlp-sampled",
        &rules,
        &format!(
            "http_ports: [{}]\notlp_endpoint: http://{}\notlp_sample_ratio: 0.5\n",
            rx.addr.port(),
            collector.addr
        ),
    );
    let server = Server::start_logging_to(&dir, &config, &dir.path().join("server.log"));
    let n = 40;
    for i in 0..n {
        assert_eq!(
            server.post_event(&story_created(&format!("s-{i}"))).status,
            202
        );
    }
    rx.wait_for(n, T);
    // Each traced event's attempt comes after its ingest; wait until every
    // traced event has both.
    let (ingested, attempted) = wait_for(T, "every traced event's attempt span", || {
        let spans = spans(&collector);
        let ids = |name: &str| -> HashSet<String> {
            spans
                .iter()
                .filter(|s| s.name == name)
                .filter_map(|s| attr(s, "event.id"))
                .collect()
        };
        let (ingested, attempted) = (ids("ingest"), ids("attempt"));
        (!ingested.is_empty() && ingested.is_subset(&attempted)).then_some((ingested, attempted))
    });
    assert_eq!(ingested, attempted, "an attempt traced without its event");
    assert!(
        ingested.len() < n,
        "every event was traced at 0.5: {ingested:?}"
    );
    // An unsampled event made no span at all, not even an orphan stage.
    let spans = spans(&collector);
    for s in &spans {
        let root = spans
            .iter()
            .filter(|r| r.trace_id == s.trace_id && r.parent_span_id.is_empty())
            .count();
        assert_eq!(root, 1, "{} is in a trace without one root", s.name);
    }
}
