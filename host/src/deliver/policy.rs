//! What to do after an attempt: succeed, retry when, give up, or park.
//! And how an endpoint's cool-down moves. Pure: time and the jitter sample
//! come in as arguments, so retry timing is tested without clocks.

use std::time::Duration;

use crate::config::Protection;
use crate::rules::RetryPolicy;
use crate::store::Endpoint;

/// How an attempt ended, as far as the retry decision cares.
#[derive(Clone, Debug, PartialEq)]
pub enum Result {
    /// An HTTP answer. `retry_after` from the header, if any.
    Status {
        code: u16,
        retry_after: Option<Duration>,
    },
    /// No answer: connection refused or reset, DNS failure.
    NoReply(String),
    Timeout(String),
    /// The endpoint answered something that is not HTTP.
    InvalidHttp(String),
    /// rulehook refused to send (outbound policy, missing rule): retrying
    /// cannot help until an admin changes something.
    Refused(String),
}

impl Result {
    /// Failures that count towards blocking an endpoint: it is not answering.
    pub fn is_transport_failure(&self) -> bool {
        matches!(
            self,
            Result::NoReply(_) | Result::Timeout(_) | Result::InvalidHttp(_)
        )
    }

    pub fn describe(&self) -> String {
        match self {
            Result::Status { code, .. } => format!("HTTP {code}"),
            Result::NoReply(e) => format!("no reply: {e}"),
            Result::Timeout(e) => format!("timed out: {e}"),
            Result::InvalidHttp(e) => format!("invalid HTTP: {e}"),
            Result::Refused(e) => format!("refused: {e}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Succeeded,
    Retry {
        at: u64,
    },
    Failed(String),
    /// 410 Gone: stop sending to this endpoint until an admin re-enables it.
    Gone,
}

/// Decides after attempt number `attempt` (1-based). `jitter` is a sample
/// in [-1, 1]; the exponential policy varies its wait by `jitter × fraction`.
pub fn decide(
    policy: &RetryPolicy,
    attempt: u32,
    result: &Result,
    now_ms: u64,
    jitter: f64,
    retry_after_cap: Duration,
) -> Decision {
    let retry_after = match result {
        Result::Status { code, .. } if (200..300).contains(code) => return Decision::Succeeded,
        Result::Status { code: 410, .. } => return Decision::Gone,
        Result::Refused(why) => return Decision::Failed(format!("refused: {why}")),
        Result::Status { retry_after, .. } => *retry_after,
        _ => None,
    };
    let Some(wait) = wait_before_retry(policy, attempt, jitter) else {
        return Decision::Failed(format!(
            "gave up after {attempt} attempts; last: {}",
            result.describe()
        ));
    };
    // Retry-After asks for at least that long; a huge value is capped so a
    // misbehaving endpoint cannot park deliveries for days.
    let wait = match retry_after {
        Some(ra) => wait.max(ra.min(retry_after_cap)),
        None => wait,
    };
    Decision::Retry {
        at: now_ms.saturating_add(wait.as_millis() as u64),
    }
}

/// The wait before retry number `attempt` (after the `attempt`-th send), or
/// `None` when the policy has no more retries.
pub fn wait_before_retry(policy: &RetryPolicy, attempt: u32, jitter: f64) -> Option<Duration> {
    match policy {
        RetryPolicy::None => None,
        RetryPolicy::Fixed { interval, retries } => (attempt <= *retries).then_some(*interval),
        RetryPolicy::Exponential {
            intervals,
            jitter: fraction,
        } => {
            let base = intervals.get(attempt.checked_sub(1)? as usize)?;
            let factor = 1.0 + fraction * jitter.clamp(-1.0, 1.0);
            Some(base.mul_f64(factor.max(0.0)))
        }
    }
}

/// How an endpoint's state changed after a result.
#[derive(Clone, Debug, PartialEq)]
pub enum EndpointChange {
    None,
    /// Blocked until this time (ms) after too many failures in a row.
    Blocked {
        until: u64,
    },
    /// 410 Gone.
    Disabled,
    /// It answered again after failing: the failure count was reset.
    Recovered,
}

/// Updates the cool-down state: transport failures count up and block the
/// endpoint at the threshold, for `block`, doubling per block in a row up
/// to `max_block`; any HTTP answer resets the count; a 2xx resets the
/// doubling; 410 disables it.
/// The record's `updated_at` moves only when something else in it did, so
/// an answer that changes nothing leaves a record that need not be stored.
pub fn endpoint_after(
    ep: &mut Endpoint,
    result: &Result,
    now_ms: u64,
    p: &Protection,
) -> EndpointChange {
    let before = ep.clone();
    let change = apply_result(ep, result, now_ms, p);
    if *ep != before {
        ep.updated_at = now_ms;
    }
    change
}

fn apply_result(ep: &mut Endpoint, result: &Result, now_ms: u64, p: &Protection) -> EndpointChange {
    match result {
        Result::Status { code: 410, .. } => {
            ep.disabled = true;
            ep.last_error = Some("answered 410 Gone".into());
            EndpointChange::Disabled
        }
        Result::Status { code, .. } => {
            let was_failing = ep.consecutive_failures > 0;
            ep.consecutive_failures = 0;
            if (200..300).contains(code) {
                ep.blocks = 0;
                ep.last_error = None;
            }
            if was_failing {
                EndpointChange::Recovered
            } else {
                EndpointChange::None
            }
        }
        r if r.is_transport_failure() => {
            ep.consecutive_failures += 1;
            ep.last_error = Some(r.describe());
            if ep.consecutive_failures < p.failures {
                return EndpointChange::None;
            }
            ep.consecutive_failures = 0;
            ep.blocks = ep.blocks.saturating_add(1);
            let doubling = 1u32 << (ep.blocks - 1).min(20);
            let block = p.block.saturating_mul(doubling).min(p.max_block);
            let until = now_ms.saturating_add(block.as_millis() as u64);
            ep.blocked_until = Some(until);
            EndpointChange::Blocked { until }
        }
        _ => EndpointChange::None,
    }
}

/// Whether deliveries to this endpoint must wait (parked) right now.
pub fn is_blocked(ep: &Endpoint, now_ms: u64) -> Option<String> {
    if ep.disabled {
        return Some(format!(
            "endpoint {} answered 410 Gone; re-enable it with `rulehook endpoints unblock`",
            ep.endpoint
        ));
    }
    match ep.blocked_until {
        Some(until) if until > now_ms => Some(format!(
            "endpoint {} is blocked for {} s more after repeated failures ({})",
            ep.endpoint,
            (until - now_ms).div_ceil(1000),
            ep.last_error.as_deref().unwrap_or("no reply")
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: Duration = Duration::from_secs(3600);

    fn status(code: u16) -> Result {
        Result::Status {
            code,
            retry_after: None,
        }
    }

    #[test]
    fn default_policy_retries_three_times_every_minute() {
        let p = RetryPolicy::default_fixed();
        let cases = [
            (1, status(500), Decision::Retry { at: 60_000 }),
            (
                2,
                Result::NoReply("refused".into()),
                Decision::Retry { at: 60_000 },
            ),
            (3, status(404), Decision::Retry { at: 60_000 }),
            (
                4,
                status(503),
                Decision::Failed("gave up after 4 attempts; last: HTTP 503".into()),
            ),
            (1, status(204), Decision::Succeeded),
            (1, status(410), Decision::Gone),
            (1, status(302), Decision::Retry { at: 60_000 }),
            (
                1,
                Result::Refused("plain HTTP is not allowed".into()),
                Decision::Failed("refused: plain HTTP is not allowed".into()),
            ),
        ];
        for (attempt, result, want) in cases {
            assert_eq!(
                decide(&p, attempt, &result, 0, 0.0, CAP),
                want,
                "attempt {attempt} {result:?}"
            );
        }
    }

    #[test]
    fn exponential_policy_follows_the_schedule_with_jitter() {
        let p = RetryPolicy::Exponential {
            intervals: RetryPolicy::default_exponential_intervals(),
            jitter: 0.2,
        };
        assert_eq!(wait_before_retry(&p, 1, 0.0), Some(Duration::from_secs(5)));
        assert_eq!(
            wait_before_retry(&p, 2, 1.0),
            Some(Duration::from_secs(360))
        );
        assert_eq!(
            wait_before_retry(&p, 3, -1.0),
            Some(Duration::from_secs(1440))
        );
        assert_eq!(
            wait_before_retry(&p, 9, 0.0),
            Some(Duration::from_secs(86_400))
        );
        assert_eq!(wait_before_retry(&p, 10, 0.0), None);
    }

    #[test]
    fn retry_after_is_honoured_and_capped() {
        let p = RetryPolicy::Fixed {
            interval: Duration::from_secs(1),
            retries: 3,
        };
        let ra = |s| Result::Status {
            code: 429,
            retry_after: Some(Duration::from_secs(s)),
        };
        assert_eq!(
            decide(&p, 1, &ra(30), 1000, 0.0, CAP),
            Decision::Retry { at: 31_000 }
        );
        assert_eq!(
            decide(&p, 1, &ra(86_400), 0, 0.0, CAP),
            Decision::Retry { at: 3_600_000 }
        );
        // A Retry-After shorter than the policy's wait does not shorten it.
        let slow = RetryPolicy::Fixed {
            interval: Duration::from_secs(60),
            retries: 3,
        };
        assert_eq!(
            decide(&slow, 1, &ra(2), 0, 0.0, CAP),
            Decision::Retry { at: 60_000 }
        );
    }

    /// Blocking after 5 failures for 300 s, doubling up to an hour, and a
    /// fresh endpoint.
    fn five_failures_block() -> (Protection, Endpoint) {
        let p = Protection {
            failures: 5,
            block: Duration::from_secs(300),
            max_block: Duration::from_secs(3600),
        };
        let ep = Endpoint {
            endpoint: "https://x.test:443".into(),
            ..Default::default()
        };
        (p, ep)
    }

    #[test]
    fn endpoints_block_after_five_failures_doubling_up_to_the_cap() {
        let (p, mut ep) = five_failures_block();
        let fail = Result::Timeout("reply after 20 s".into());
        let mut blocks = Vec::new();
        for i in 0..25 {
            if let EndpointChange::Blocked { until } = endpoint_after(&mut ep, &fail, 0, &p) {
                blocks.push((i + 1, until / 1000));
            }
        }
        assert_eq!(
            blocks,
            [(5, 300), (10, 600), (15, 1200), (20, 2400), (25, 3600)]
        );
        assert!(is_blocked(&ep, 1000).is_some());
        // An HTTP answer (even an error) resets the count; a 2xx the doubling.
        assert_eq!(
            endpoint_after(&mut ep, &status(500), 0, &p),
            EndpointChange::None
        );
        assert_eq!(ep.blocks, 5);
        endpoint_after(&mut ep, &status(200), 0, &p);
        assert_eq!((ep.blocks, ep.consecutive_failures), (0, 0));
        assert_eq!(
            endpoint_after(&mut ep, &status(410), 0, &p),
            EndpointChange::Disabled
        );
        assert!(is_blocked(&ep, u64::MAX).unwrap().contains("410 Gone"));
    }

    /// The dispatcher stores an endpoint's record only when it changed, so
    /// an answer that changes nothing (a healthy endpoint answering again)
    /// must leave it as it was, its time included: otherwise every attempt
    /// wrote the record (measured: 0.85 upserts per delivery in postgres
    /// mode at 500/s).
    #[test]
    fn an_answer_that_changes_nothing_leaves_the_record_as_it_was() {
        let (p, mut ep) = five_failures_block();
        endpoint_after(&mut ep, &status(200), 1_000, &p);
        let before = ep.clone();
        for (at, result) in [
            (2_000, status(200)),
            (3_000, status(204)),
            (4_000, status(500)),
        ] {
            assert_eq!(
                endpoint_after(&mut ep, &result, at, &p),
                EndpointChange::None
            );
            assert_eq!(ep, before, "after {result:?}");
        }
        // A change is stamped with its time.
        endpoint_after(&mut ep, &Result::Timeout("no reply".into()), 5_000, &p);
        assert_eq!((ep.consecutive_failures, ep.updated_at), (1, 5_000));
        endpoint_after(&mut ep, &status(200), 6_000, &p);
        assert_eq!((ep.consecutive_failures, ep.updated_at), (0, 6_000));
    }
}
