//! The world a plugin runs in, and everything it can observe of it.
//!
//! DESIGN.md asks for a sandbox that cannot tell the real world apart: the
//! same event through the same chain gives the same bytes in `explain`,
//! `plugin run` and the server, and nothing a guest calls holds a host
//! thread past the call's deadline. So, on top of the deny-all WASI context
//! (no files, environment, arguments or sockets):
//!
//! - **Wall clock**: always [`WALL_CLOCK`] (2020-01-01T00:00:00Z), with a
//!   resolution of one second.
//! - **Monotonic clock**: starts at 0 at the beginning of every call and
//!   advances [`MONOTONIC_STEP`] per read. A sleep (`subscribe-duration`,
//!   `subscribe-instant`, and through them `poll` and `std::thread::sleep`)
//!   advances it by the time asked for and is ready at once: it takes no
//!   real time, so it cannot hold the call past its deadline.
//! - **Random numbers** (`wasi:random/random`, `insecure` and
//!   `insecure-seed` alike): one stream per call, SHA-256 in counter mode
//!   over a seed that is itself the SHA-256 of the component's bytes' hash,
//!   the export called, the rule, the event id, event type and entity type,
//!   the payload text and the config text (see [`seed`]). The same input to
//!   the same component gives the same bytes.
//! - **stdout and stderr**: captured per call, up to the log cap, and added
//!   to the call's log (stdout at `info`, stderr at `error`), so a panic
//!   message or an interpreter's traceback reaches the record.
//! - **Network** (`wasi:sockets`): linked, but every entry point traps with
//!   [`NO_NETWORK`]. `wasi:http` is not linked at all: a component importing
//!   it is refused before compiling (`imports`), naming the build flag that
//!   drops it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{DynPollable, OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock};

use super::runtime::State;

/// What the wall clock always says: 2020-01-01T00:00:00Z, as Unix time.
pub const WALL_CLOCK: Duration = Duration::from_secs(1_577_836_800);
/// How far the monotonic clock moves on each read, in nanoseconds.
pub const MONOTONIC_STEP: u64 = 1_000;
/// The trap message of every network entry point.
pub const NO_NETWORK: &str = "plugins have no network access";
/// The WASI 0.2 version wasmtime-wasi defines its interfaces under; the
/// functions replaced here must be defined under the very same names (a
/// guest importing an older 0.2.x is matched to them by semver).
const WASI: &str = "0.2.12";

/// The monotonic clock of one store, reset at the start of each call.
#[derive(Clone, Default)]
pub struct VirtualTime(Arc<AtomicU64>);

impl VirtualTime {
    fn reset(&self) {
        self.0.store(0, Ordering::Relaxed);
    }

    /// The time now; each read moves the clock on by one step, so a guest
    /// measuring a loop sees time pass, and the same reads give the same
    /// values on every run.
    fn read(&self) -> u64 {
        self.advance(|t| t.saturating_add(MONOTONIC_STEP))
    }

    /// Moves the clock with `f`, returning the time before.
    fn advance(&self, f: impl Fn(u64) -> u64) -> u64 {
        match self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| Some(f(t)))
        {
            Ok(t) | Err(t) => t,
        }
    }

    /// A sleep: the clock jumps forward instead of the thread waiting.
    fn advance_by(&self, nanos: u64) {
        self.advance(|t| t.saturating_add(nanos));
    }

    fn advance_to(&self, instant: u64) {
        self.0.fetch_max(instant, Ordering::Relaxed);
    }
}

impl HostMonotonicClock for VirtualTime {
    fn resolution(&self) -> u64 {
        MONOTONIC_STEP
    }

    fn now(&self) -> u64 {
        self.read()
    }
}

struct FixedWallClock;

impl HostWallClock for FixedWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn now(&self) -> Duration {
        WALL_CLOCK
    }
}

/// The seed of one call: SHA-256 over each part, every part preceded by its
/// length (u64, little-endian) so that no two different inputs can give the
/// same byte string. `plugin_hash` is the hex SHA-256 of the component.
pub fn seed(plugin_hash: &str, export: &str, parts: &[&str]) -> [u8; 32] {
    let mut input = Vec::new();
    seed_input(&mut input, plugin_hash, export, parts);
    Sha256::digest(&input).into()
}

/// The bytes [`seed`] hashes, written into `out` (cleared first).
fn seed_input(out: &mut Vec<u8>, plugin_hash: &str, export: &str, parts: &[&str]) {
    out.clear();
    for part in ["rulehook plugin seed v1", plugin_hash, export]
        .iter()
        .chain(parts)
    {
        out.extend_from_slice(&(part.len() as u64).to_le_bytes());
        out.extend_from_slice(part.as_bytes());
    }
}

/// Random bytes of one call: block `i` is SHA-256(seed ‖ i as u64 LE).
/// Independent of any RNG crate's version, so the documented seed keeps
/// meaning the same bytes.
pub struct SeededRandom {
    seed: [u8; 32],
    counter: u64,
    block: [u8; 32],
    used: usize,
}

impl SeededRandom {
    pub fn new(seed: [u8; 32]) -> Self {
        SeededRandom {
            seed,
            counter: 0,
            block: [0; 32],
            used: 32,
        }
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            if self.used == self.block.len() {
                let mut h = Sha256::new();
                h.update(self.seed);
                h.update(self.counter.to_le_bytes());
                self.block = h.finalize().into();
                self.counter += 1;
                self.used = 0;
            }
            *b = self.block[self.used];
            self.used += 1;
        }
    }

    fn next_u64(&mut self) -> u64 {
        let mut b = [0; 8];
        self.fill(&mut b);
        u64::from_le_bytes(b)
    }
}

/// Output a guest wrote to stdout or stderr during one call, up to a cap.
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Captured>>);

#[derive(Default)]
pub struct Captured {
    pub bytes: Vec<u8>,
    /// Bytes written past the cap, counted and dropped.
    pub dropped: usize,
    cap: usize,
}

impl Capture {
    fn lock(&self) -> std::sync::MutexGuard<'_, Captured> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Empties the capture for a new call that may keep `cap` bytes.
    pub fn reset(&self, cap: usize) {
        let mut c = self.lock();
        c.bytes.clear();
        c.dropped = 0;
        c.cap = cap;
    }

    /// What was written since the last reset.
    pub fn take(&self) -> (Vec<u8>, usize) {
        let mut c = self.lock();
        (std::mem::take(&mut c.bytes), std::mem::take(&mut c.dropped))
    }

    fn push(&self, data: &[u8]) {
        let mut c = self.lock();
        let room = c.cap.saturating_sub(c.bytes.len());
        let kept = data.len().min(room);
        c.bytes.extend_from_slice(&data[..kept]);
        c.dropped += data.len() - kept;
    }
}

impl IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Capture {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

/// Writing never waits: past the cap bytes are counted and dropped, so a
/// guest flooding stdout cannot block on a full pipe.
const WRITE_BUDGET: usize = 64 << 10;

#[wasmtime_wasi::async_trait]
impl Pollable for Capture {
    async fn ready(&mut self) {}
}

impl OutputStream for Capture {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_BUDGET)
    }
}

impl tokio::io::AsyncWrite for Capture {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.push(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// The per-store handles the replaced WASI functions work on.
#[derive(Default)]
pub struct Sandbox {
    pub time: VirtualTime,
    /// The call's [`seed`] input; hashed only when the guest first asks for
    /// a random number, so calls that never do pay a copy, not a hash.
    seed_input: Vec<u8>,
    random: Option<SeededRandom>,
    pub stdout: Capture,
    pub stderr: Capture,
}

impl Sandbox {
    /// The WASI context over these handles: nothing granted, clocks and
    /// stdio replaced.
    pub fn wasi_ctx(&self) -> wasmtime_wasi::WasiCtx {
        wasmtime_wasi::WasiCtx::builder()
            .wall_clock(FixedWallClock)
            .monotonic_clock(self.time.clone())
            .stdout(self.stdout.clone())
            .stderr(self.stderr.clone())
            .build()
    }

    /// Starts a call of `export` of the component `plugin_hash` on
    /// `parts`: time back to 0, random numbers from their [`seed`], empty
    /// stdio.
    pub fn begin(&mut self, plugin_hash: &str, export: &str, parts: &[&str], stdio_cap: usize) {
        self.time.reset();
        seed_input(&mut self.seed_input, plugin_hash, export, parts);
        self.random = None;
        self.stdout.reset(stdio_cap);
        self.stderr.reset(stdio_cap);
    }

    /// The call's random stream, seeded on first use.
    pub fn random(&mut self) -> &mut SeededRandom {
        let input = &self.seed_input;
        self.random
            .get_or_insert_with(|| SeededRandom::new(Sha256::digest(input).into()))
    }
}

/// A pollable that is always ready: what a sleep becomes.
struct Elapsed;

#[wasmtime_wasi::async_trait]
impl Pollable for Elapsed {
    async fn ready(&mut self) {}
}

fn elapsed(cx: &mut StoreContextMut<'_, State>) -> wasmtime::Result<Resource<DynPollable>> {
    let table = &mut cx.data_mut().table;
    let r = table.push(Elapsed)?;
    wasmtime_wasi::p2::subscribe(table, r)
}

/// Most random bytes one WASI call may ask for; more traps. A guest asking
/// for more than its memory could hold is broken, and the host should not
/// allocate it on the guest's behalf.
fn check_random_len(len: u64, cx: &StoreContextMut<'_, State>) -> wasmtime::Result<usize> {
    let cap = cx.data().memory_cap() as u64;
    if len > cap {
        wasmtime::bail!("asked for {len} random bytes, more than its memory limit of {cap} bytes");
    }
    Ok(len as usize)
}

/// Replaces the WASI functions that would tell the real world apart or
/// block: clock subscriptions, randomness, and the network entry points.
pub fn add_to_linker(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    {
        let mut clock = linker.instance(&format!("wasi:clocks/monotonic-clock@{WASI}"))?;
        clock.func_wrap(
            "subscribe-duration",
            |mut cx: StoreContextMut<'_, State>, (nanos,): (u64,)| {
                cx.data_mut().sandbox.time.advance_by(nanos);
                Ok((elapsed(&mut cx)?,))
            },
        )?;
        clock.func_wrap(
            "subscribe-instant",
            |mut cx: StoreContextMut<'_, State>, (instant,): (u64,)| {
                cx.data_mut().sandbox.time.advance_to(instant);
                Ok((elapsed(&mut cx)?,))
            },
        )?;
    }
    for (interface, bytes_fn, u64_fn) in [
        ("random", "get-random-bytes", "get-random-u64"),
        (
            "insecure",
            "get-insecure-random-bytes",
            "get-insecure-random-u64",
        ),
    ] {
        let mut random = linker.instance(&format!("wasi:random/{interface}@{WASI}"))?;
        random.func_wrap(
            bytes_fn,
            |mut cx: StoreContextMut<'_, State>, (len,): (u64,)| {
                let len = check_random_len(len, &cx)?;
                let mut out = vec![0; len];
                cx.data_mut().sandbox.random().fill(&mut out);
                Ok((out,))
            },
        )?;
        random.func_wrap(u64_fn, |mut cx: StoreContextMut<'_, State>, (): ()| {
            Ok((cx.data_mut().sandbox.random().next_u64(),))
        })?;
    }
    linker
        .instance(&format!("wasi:random/insecure-seed@{WASI}"))?
        .func_wrap(
            "insecure-seed",
            |mut cx: StoreContextMut<'_, State>, (): ()| {
                let r = cx.data_mut().sandbox.random();
                Ok(((r.next_u64(), r.next_u64()),))
            },
        )?;
    // Every socket needs a network or a socket made by these; trapping
    // here leaves no way to reach one.
    for (interface, func) in [
        ("instance-network", "instance-network"),
        ("ip-name-lookup", "resolve-addresses"),
        ("tcp-create-socket", "create-tcp-socket"),
        ("udp-create-socket", "create-udp-socket"),
    ] {
        linker
            .instance(&format!("wasi:sockets/{interface}@{WASI}"))?
            .func_new(func, |_, _, _, _| wasmtime::bail!(NO_NETWORK))?;
    }
    linker.allow_shadowing(false);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_depends_on_every_part_and_on_where_parts_split() {
        let base = seed("abc", "transform", &["rule", "evt-1", "{}"]);
        assert_eq!(base, seed("abc", "transform", &["rule", "evt-1", "{}"]));
        assert_ne!(base, seed("abd", "transform", &["rule", "evt-1", "{}"]));
        assert_ne!(
            base,
            seed("abc", "validate-config", &["rule", "evt-1", "{}"])
        );
        assert_ne!(base, seed("abc", "transform", &["rule", "evt-2", "{}"]));
        // Length prefixes: moving a character across a boundary changes it.
        assert_ne!(base, seed("abc", "transform", &["rul", "eevt-1", "{}"]));
    }

    #[test]
    fn a_call_draws_from_the_documented_seed() {
        let mut sandbox = Sandbox::default();
        sandbox.begin("abc", "transform", &["rule", "evt-1"], 0);
        let mut got = [0u8; 40];
        sandbox.random().fill(&mut got);
        let mut want = [0u8; 40];
        SeededRandom::new(seed("abc", "transform", &["rule", "evt-1"])).fill(&mut want);
        assert_eq!(got, want);
        // The next call starts its own stream.
        sandbox.begin("abc", "transform", &["rule", "evt-1"], 0);
        let mut again = [0u8; 40];
        sandbox.random().fill(&mut again);
        assert_eq!(again, want);
    }

    #[test]
    fn seeded_random_is_a_stream_independent_of_how_it_is_read() {
        let mut a = SeededRandom::new([7; 32]);
        let mut b = SeededRandom::new([7; 32]);
        let mut whole = [0u8; 100];
        a.fill(&mut whole);
        let mut parts = [0u8; 100];
        for chunk in parts.chunks_mut(13) {
            b.fill(chunk);
        }
        assert_eq!(whole, parts);
        assert_ne!(whole[..32], whole[32..64]);
        let mut c = SeededRandom::new([8; 32]);
        let mut other = [0u8; 100];
        c.fill(&mut other);
        assert_ne!(whole, other);
    }

    #[test]
    fn the_monotonic_clock_steps_per_read_and_sleeps_take_no_time() {
        let t = VirtualTime::default();
        assert_eq!(t.read(), 0);
        assert_eq!(t.read(), MONOTONIC_STEP);
        t.advance_by(5_000_000_000);
        assert_eq!(t.read(), 2 * MONOTONIC_STEP + 5_000_000_000);
        t.advance_to(10);
        assert_eq!(t.read(), 3 * MONOTONIC_STEP + 5_000_000_000);
        t.advance_by(u64::MAX);
        assert_eq!(t.read(), u64::MAX);
        t.reset();
        assert_eq!(t.read(), 0);
    }

    #[test]
    fn capture_keeps_up_to_its_cap_and_counts_the_rest() {
        let c = Capture::default();
        c.reset(5);
        c.push(b"abc");
        c.push(b"defg");
        assert_eq!(c.take(), (b"abcde".to_vec(), 2));
        assert_eq!(c.take(), (Vec::new(), 0));
    }
}
