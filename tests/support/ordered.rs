//! A receiver for the ordering tests: it fails a share of requests at
//! random (seeded, so a failing run can be replayed), answers after a short
//! delay so that two requests of one key would overlap if they were sent
//! together, and notes per key what it saw: every request, which were in
//! flight at once, and the order of first successes.
//!
//! Events are named `KEY.SEQ` (`e17.4`: key `e17`, the fifth update), and
//! the receiver reads that from `X-Rulehook-Event`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// What the receiver saw of one path.
#[derive(Default, Debug)]
pub struct Seen {
    /// Requests in flight now, per key.
    in_flight: HashMap<String, usize>,
    /// Keys that had two requests in flight at once, with the events.
    pub overlaps: Vec<(String, String)>,
    /// Per key, the sequence numbers of first successes, in the order they
    /// were answered.
    pub first_successes: BTreeMap<String, Vec<u32>>,
    /// Delivery ids answered 2xx (the first time).
    succeeded: HashSet<String>,
    /// Every request: (key, seq, status answered).
    pub requests: Vec<(String, u32, u16)>,
}

pub struct OrderedReceiver {
    pub addr: SocketAddr,
    /// Per path (`/ordered`, `/unordered`).
    pub seen: Arc<Mutex<HashMap<String, Seen>>>,
    /// Keys whose requests are all answered 500 (to halt a lane).
    pub failing_keys: Arc<Mutex<HashSet<String>>>,
    /// While set, every request is answered 503.
    pub down: Arc<AtomicBool>,
    _runtime: tokio::runtime::Runtime,
}

/// `KEY.SEQ` split.
pub fn key_seq(event: &str) -> (String, u32) {
    let (k, s) = event.rsplit_once('.').expect("event ids are KEY.SEQ");
    (k.to_string(), s.parse().expect("SEQ is a number"))
}

impl OrderedReceiver {
    /// Fails `fail_percent` of requests (at random from `seed`), answering
    /// each after `delay`.
    pub fn start(fail_percent: u64, delay: Duration, seed: u64) -> OrderedReceiver {
        OrderedReceiver::start_on(0, fail_percent, delay, seed)
    }

    /// `start` on a given port (to bring an endpoint up).
    pub fn start_on(port: u16, fail_percent: u64, delay: Duration, seed: u64) -> OrderedReceiver {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen: Arc<Mutex<HashMap<String, Seen>>> = Arc::default();
        let failing_keys: Arc<Mutex<HashSet<String>>> = Arc::default();
        let down = Arc::new(AtomicBool::new(false));
        let rng = Arc::new(AtomicU64::new(seed | 1));
        let (seen2, failing2, down2) = (seen.clone(), failing_keys.clone(), down.clone());
        rt.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (seen, failing, down, rng) =
                    (seen2.clone(), failing2.clone(), down2.clone(), rng.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (seen, failing, down, rng) =
                            (seen.clone(), failing.clone(), down.clone(), rng.clone());
                        async move {
                            let path = req.uri().path().to_string();
                            let header = |name: &str| {
                                req.headers()
                                    .get(name)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or_default()
                                    .to_string()
                            };
                            let event = header("x-rulehook-event");
                            let delivery = header("x-rulehook-delivery");
                            let _ = req.into_body().collect().await;
                            let (key, seq) = key_seq(&event);
                            {
                                let mut all = seen.lock().expect("lock");
                                let s = all.entry(path.clone()).or_default();
                                let n = s.in_flight.entry(key.clone()).or_default();
                                *n += 1;
                                if *n > 1 {
                                    s.overlaps.push((key.clone(), event.clone()));
                                }
                            }
                            // Out of flight when answered, or when hyper drops
                            // this future because the sender went away (a
                            // killed node): either way it is no longer sent.
                            let _in_flight = InFlight {
                                seen: seen.clone(),
                                path: path.clone(),
                                key: key.clone(),
                            };
                            tokio::time::sleep(delay).await;
                            let status = if down.load(Ordering::SeqCst) {
                                503
                            } else if failing.lock().expect("lock").contains(&key)
                                || next_random(&rng) % 100 < fail_percent
                            {
                                500
                            } else {
                                200
                            };
                            {
                                let mut all = seen.lock().expect("lock");
                                let s = all.entry(path).or_default();
                                s.requests.push((key.clone(), seq, status));
                                if status == 200 && s.succeeded.insert(delivery) {
                                    s.first_successes.entry(key).or_default().push(seq);
                                }
                            }
                            let mut resp =
                                http::Response::new(Full::new(Bytes::from_static(b"{}")));
                            *resp.status_mut() =
                                http::StatusCode::from_u16(status).expect("status");
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        OrderedReceiver {
            addr,
            seen,
            failing_keys,
            down,
            _runtime: rt,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// How many deliveries of `path` succeeded.
    pub fn successes(&self, path: &str) -> usize {
        self.seen
            .lock()
            .expect("lock")
            .get(path)
            .map_or(0, |s| s.succeeded.len())
    }

    /// Runs `f` on what `path` saw.
    pub fn with<T>(&self, path: &str, f: impl FnOnce(&Seen) -> T) -> T {
        let all = self.seen.lock().expect("lock");
        let empty = Seen::default();
        f(all.get(path).unwrap_or(&empty))
    }
}

/// Counts a request out of flight when dropped.
struct InFlight {
    seen: Arc<Mutex<HashMap<String, Seen>>>,
    path: String,
    key: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut all = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = all
            .get_mut(&self.path)
            .and_then(|s| s.in_flight.get_mut(&self.key))
        {
            *n = n.saturating_sub(1);
        }
    }
}

/// xorshift64: a seeded sequence, shared by the receiver's tasks.
fn next_random(state: &AtomicU64) -> u64 {
    let mut x = state.load(Ordering::Relaxed);
    loop {
        let mut y = x;
        y ^= y << 13;
        y ^= y >> 7;
        y ^= y << 17;
        match state.compare_exchange_weak(x, y, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return y,
            Err(now) => x = now,
        }
    }
}

/// Keys whose first successes are not exactly `0..n` in order, with what
/// came; empty when every key of `keys` is complete and in order.
pub fn out_of_order(seen: &Seen, keys: &[String], n: u32) -> Vec<(String, Vec<u32>)> {
    let want: Vec<u32> = (0..n).collect();
    keys.iter()
        .filter_map(|k| {
            let got = seen.first_successes.get(k).cloned().unwrap_or_default();
            (got != want).then(|| (k.clone(), got))
        })
        .collect()
}
