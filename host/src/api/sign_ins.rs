//! Failed sign-ins counted per client address, for the channel's
//! `POST /authentication/sign_in` and the console's `POST /v1/session`
//! together (both take an API key, so both are ways to guess one).
//!
//! Per client, not server-wide: one address guessing must not lock every
//! other client out. IPv6 clients are counted per /64, the block one
//! subscriber usually holds, so that walking the addresses of one's own
//! network does not reset the count. The table is bounded: when it is full
//! of clients still inside their window, new addresses share one overflow
//! count, so a flood of addresses costs memory no larger than the table and
//! still meets a limit.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Clients tracked at once.
const MAX_CLIENTS: usize = 100_000;

pub struct SignIns {
    max_failures: u32,
    window: Duration,
    clients: Mutex<HashMap<Client, (Instant, u32)>>,
    /// Totals for `/metrics`: failed sign-ins, and sign-ins refused
    /// because their address was locked out.
    failed_total: AtomicU64,
    refused_total: AtomicU64,
}

/// An IPv4 address, an IPv6 /64, or the overflow count.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum Client {
    V4(u32),
    V6(u64),
    Overflow,
}

impl Client {
    fn of(ip: IpAddr) -> Client {
        match ip {
            IpAddr::V4(v4) => Client::V4(v4.into()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Client::V4(v4.into()),
                None => Client::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

impl SignIns {
    pub fn new(max_failures: u32, window: Duration) -> SignIns {
        SignIns {
            max_failures: max_failures.max(1),
            window,
            clients: Mutex::new(HashMap::new()),
            failed_total: AtomicU64::new(0),
            refused_total: AtomicU64::new(0),
        }
    }

    pub fn max_failures(&self) -> u32 {
        self.max_failures
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    pub fn failed_total(&self) -> u64 {
        self.failed_total.load(Ordering::Relaxed)
    }

    pub fn refused_total(&self) -> u64 {
        self.refused_total.load(Ordering::Relaxed)
    }

    fn clients(&self) -> std::sync::MutexGuard<'_, HashMap<Client, (Instant, u32)>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Some(wait)` while `ip` may not try again.
    pub fn locked(&self, ip: IpAddr) -> Option<Duration> {
        let mut clients = self.clients();
        let key = Self::key(&clients, Client::of(ip));
        let (start, count) = *clients.get(&key)?;
        let elapsed = start.elapsed();
        if elapsed >= self.window {
            clients.remove(&key);
            return None;
        }
        let locked = (count >= self.max_failures).then(|| self.window - elapsed);
        if locked.is_some() {
            self.refused_total.fetch_add(1, Ordering::Relaxed);
        }
        locked
    }

    /// Counts a failed sign-in from `ip`.
    pub fn failed(&self, ip: IpAddr) {
        self.failed_total.fetch_add(1, Ordering::Relaxed);
        let mut clients = self.clients();
        let mut key = Self::key(&clients, Client::of(ip));
        if !clients.contains_key(&key) && clients.len() >= MAX_CLIENTS {
            let window = self.window;
            clients.retain(|_, (start, _)| start.elapsed() < window);
            if clients.len() >= MAX_CLIENTS {
                key = Client::Overflow;
            }
        }
        let now = Instant::now();
        let entry = clients.entry(key).or_insert((now, 0));
        if entry.0.elapsed() >= self.window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }

    /// A client without an entry of its own, in a full table, is counted
    /// in the overflow.
    fn key(clients: &HashMap<Client, (Instant, u32)>, client: Client) -> Client {
        if clients.contains_key(&client) || clients.len() < MAX_CLIENTS {
            client
        } else {
            Client::Overflow
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_client_locked_out_leaves_the_others_alone() {
        let s = SignIns::new(3, Duration::from_secs(60));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(s.locked(a), None);
            s.failed(a);
        }
        assert!(s.locked(a).is_some());
        assert_eq!(s.locked(b), None);
        // The same IPv4 client over IPv6 (mapped) is the same client.
        assert!(s.locked("::ffff:192.0.2.1".parse().unwrap()).is_some());
    }

    #[test]
    fn ipv6_clients_count_per_64() {
        let s = SignIns::new(2, Duration::from_secs(60));
        s.failed("2001:db8:1:2::1".parse().unwrap());
        s.failed("2001:db8:1:2::ffff".parse().unwrap());
        assert!(s.locked("2001:db8:1:2:abcd::9".parse().unwrap()).is_some());
        assert_eq!(s.locked("2001:db8:1:3::1".parse().unwrap()), None);
    }
}
