//! The wasmtime side of plugins: one engine, components compiled once and
//! cached on disk, pre-instantiated, warm instances reused from a pool, and
//! the per-call limits (CPU deadline, memory cap, output and log caps).
//!
//! Calls are synchronous and CPU-bound; callers run them off the async
//! reactor (`spawn_blocking`). A call that traps, times out or runs out of
//! memory throws its instance away: a trapped instance's state is undefined.
//!
//! The deadline holds in wall time whatever the guest calls: every WASI
//! function that could wait (a clock subscription, and through it `poll`
//! and sleeps) is replaced by one that advances the plugin's virtual clock
//! instead (see `sandbox`), stdout and stderr never block, and there is no
//! file, socket or other source a guest could wait on. Each plugin may hold
//! at most [`MAX_INSTANCES_PER_PLUGIN`] of the engine's pooled instances, so
//! one plugin's slow calls cannot take the slots other plugins need.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::sandbox::{self, Sandbox};

/// The bindings generated from the WIT world, in a module of their own so
/// their names (`Outcome`, `Context`) do not clash with ours.
mod wit {
    wasmtime::component::bindgen!({
        world: "transform",
        path: "../plugin-sdk/wit",
    });
}

use wit::rulehook::plugin::host::Level;
use wit::rulehook::plugin::types::{Context as WitContext, Outcome as WitOutcome};
use wit::{Transform, TransformPre};

/// Per-call limits; the defaults are DESIGN.md's.
#[derive(Clone, Debug)]
pub struct Limits {
    /// CPU time per call, enforced by epoch interruption.
    pub timeout: Duration,
    /// Linear memory per instance.
    pub memory_bytes: usize,
    /// Size of the payload a plugin may return.
    pub output_bytes: usize,
    /// Log text kept per call; the rest is counted and dropped.
    pub log_bytes: usize,
    /// Log lines kept per call (empty lines cost no bytes but still a
    /// line of the host's log each); the rest are counted and dropped.
    pub log_lines: usize,
    /// Size of a skip reason, error message or trap cause; longer ones are
    /// cut, saying how long they were.
    pub message_bytes: usize,
    /// The most a rule's plugin entry may set as its own `timeout`.
    pub timeout_max: Duration,
    /// The most a rule's plugin entry may set as its own `memory`; also the
    /// size of the engine's memory slots.
    pub memory_max: usize,
}

/// What one plugin entry of a rule sets for its own calls instead of the
/// server's defaults (`timeout`, `memory` in the rule file); the rules'
/// check refuses values above [`Limits::timeout_max`] and
/// [`Limits::memory_max`], and a call clamps to them as well.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    pub timeout: Option<Duration>,
    pub memory_bytes: Option<usize>,
}

impl Limits {
    /// The deadline and memory cap of a call with `o`.
    fn effective(&self, o: &Overrides) -> (Duration, usize) {
        (
            o.timeout
                .unwrap_or(self.timeout)
                .min(self.timeout_max.max(self.timeout)),
            o.memory_bytes
                .unwrap_or(self.memory_bytes)
                .min(self.memory_max.max(self.memory_bytes)),
        )
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Duration::from_millis(50),
            memory_bytes: 32 << 20,
            output_bytes: 1 << 20,
            log_bytes: 64 << 10,
            log_lines: 1000,
            message_bytes: 4096,
            timeout_max: Duration::from_secs(1),
            memory_max: 256 << 20,
        }
    }
}

/// The epoch advances this often; the deadline is a whole number of ticks,
/// and one tick is added, so a timeout fires between `timeout` and
/// `timeout + TICK`.
const TICK: Duration = Duration::from_millis(5);
/// The deadline for starting an instance (when the per-call timeout is
/// shorter); see `Compiled::instance`.
const START_TIMEOUT: Duration = Duration::from_secs(1);

/// Epoch ticks for a deadline of `d`. The ticker runs freely, so the next
/// tick may come at once: one tick more makes the deadline at least `d`,
/// never less.
fn ticks(d: Duration) -> u64 {
    (d.as_millis() as u64).div_ceil(TICK.as_millis() as u64) + 1
}

/// Warm instances kept per plugin; more concurrent calls instantiate fresh
/// ones and drop them afterwards.
const WARM_PER_PLUGIN: usize = 8;
/// Instances (in use and warm) one plugin may hold at once. A call past it
/// waits for one to come free, at most for the call's deadline, and then
/// fails as busy; the engine's pool holds [`POOL_INSTANCES`], so it takes
/// `POOL_INSTANCES / MAX_INSTANCES_PER_PLUGIN` plugins at their bound to
/// fill it.
pub const MAX_INSTANCES_PER_PLUGIN: usize = 32;
/// Component instances in the engine's pooling allocator, for all plugins.
pub const POOL_INSTANCES: u32 = 512;

/// The engine's pool sizes; tests shrink them to reach the bounds.
#[derive(Clone, Copy, Debug)]
pub struct PoolSizes {
    /// Component instances for all plugins together.
    pub total: u32,
    /// Instances one plugin may hold at once.
    pub per_plugin: usize,
}

impl Default for PoolSizes {
    fn default() -> Self {
        PoolSizes {
            total: POOL_INSTANCES,
            per_plugin: MAX_INSTANCES_PER_PLUGIN,
        }
    }
}

/// What went wrong in a call, in words that name the cause.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum CallError {
    #[error("timed out after {0} ms")]
    Timeout(u64),
    #[error("exceeded its memory limit of {0} MiB")]
    Memory(usize),
    #[error("returned {got} bytes, more than the {max}-byte output limit")]
    OutputTooLarge { got: usize, max: usize },
    #[error("trapped: {0}")]
    Trap(String),
    /// The plugin answered `Err(message)`.
    #[error("returned an error: {0}")]
    Plugin(String),
    #[error("could not be instantiated: {0}")]
    Instantiate(String),
    /// Every instance this plugin may hold was in use for the whole deadline.
    #[error("is busy: {0} calls of it were running for the whole {1} ms deadline")]
    Busy(usize, u64),
}

/// A log line a plugin wrote during one call.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LogLine {
    pub level: &'static str,
    pub message: String,
}

/// What one call produced.
#[derive(Debug)]
pub struct Call {
    pub result: Result<Outcome, CallError>,
    pub logs: Vec<LogLine>,
    /// Log bytes dropped over the cap.
    pub logs_dropped: usize,
    /// Log lines dropped over either cap.
    pub log_lines_dropped: usize,
    pub elapsed: Duration,
}

/// A plugin's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// JSON text to send on.
    Send(String),
    Skip(String),
}

/// The store's data: a deny-all WASI context and the call's bookkeeping.
pub struct State {
    wasi: WasiCtx,
    pub(super) table: ResourceTable,
    /// Virtual clock, seeded random numbers, captured stdio.
    pub(super) sandbox: Sandbox,
    /// This call's memory cap and deadline (the plugin entry's, else the
    /// server's), for the limiter and for naming a trap.
    memory_cap: usize,
    call_timeout: Duration,
    /// The instance's linear memory, as last grown: a warm instance bigger
    /// than a later call's cap is not reused for it.
    memory_size: usize,
    memory_exceeded: bool,
    log_cap: usize,
    log_used: usize,
    log_line_cap: usize,
    logs: Vec<LogLine>,
    logs_dropped: usize,
    log_lines_dropped: usize,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl State {
    pub(super) fn memory_cap(&self) -> usize {
        self.memory_cap
    }
}

impl ResourceLimiter for State {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_cap {
            // Trap right here rather than let `memory.grow` fail: a Rust
            // guest would abort anyway, and this way the error says why.
            self.memory_exceeded = true;
            return Err(wasmtime::Error::msg("memory limit exceeded"));
        }
        self.memory_size = self.memory_size.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

impl State {
    /// Keeps a log line if it fits the call's caps on bytes and lines;
    /// counts it as dropped otherwise. Control characters are escaped, so
    /// a message cannot forge a line of the host's log.
    fn push_log(&mut self, level: &'static str, message: String) {
        if self.logs.len() >= self.log_line_cap || self.log_used + message.len() > self.log_cap {
            self.logs_dropped += message.len();
            self.log_lines_dropped += 1;
            return;
        }
        self.log_used += message.len();
        let message = escape_controls(&message).into_owned();
        self.logs.push(LogLine { level, message });
    }
}

impl wit::rulehook::plugin::host::Host for State {
    fn log(&mut self, level: Level, message: String) {
        let level = match level {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        };
        self.push_log(level, message);
    }
}

impl wit::rulehook::plugin::types::Host for State {}

/// The engine, its linker and the epoch ticker, shared by every plugin.
pub struct Runtime {
    engine: Engine,
    linker: Linker<State>,
    limits: Limits,
    cache_dir: Option<PathBuf>,
    /// Instances one plugin may hold at once.
    per_plugin: usize,
    ticker: Arc<Ticker>,
}

/// The epoch ticker's state. It ticks only while some call's deadline may
/// still need a tick, and sleeps otherwise: an idle server (or one whose
/// rules run no plugin) was woken 200 times a second for nothing, which on
/// this machine was two of the 17 thread wake-ups a delivery cost at
/// 100 events/s (BENCHMARKS.md, "What a delivery costs").
#[derive(Default)]
struct Ticker {
    /// The epoch the ticker runs up to: the latest deadline armed so far.
    until: Mutex<u64>,
    wake: Condvar,
    /// Ticks made (the ticker is the only one that advances the epoch).
    epoch: std::sync::atomic::AtomicU64,
}

impl Runtime {
    /// Keeps the ticker going until a deadline of `d` set now has passed:
    /// counted in ticks, not time, so a ticker that oversleeps on a loaded
    /// machine still makes every tick a deadline waits for.
    fn arm(&self, d: Duration) {
        let t = &self.ticker;
        // One more than `ticks`: the epoch may advance between this read
        // and the store's `set_epoch_deadline`.
        let target = t.epoch.load(std::sync::atomic::Ordering::Acquire) + ticks(d) + 1;
        let mut until = t.until.lock().unwrap_or_else(|e| e.into_inner());
        if target > *until {
            *until = target;
            t.wake.notify_one();
        }
    }
}

/// The threads compiling a component may use: half the cores, at least
/// one. wasmtime compiles a component's functions in parallel on rayon's
/// global pool, which by default has a thread per core, so compiling an
/// 18 MB Python component at a reload took every core for seconds while
/// ingest and deliveries needed them; components are compiled one after
/// another (`PluginSet::load`), so this is also the most a reload compiles
/// on at once.
pub fn compile_threads(cores: usize) -> usize {
    (cores / 2).max(1)
}

/// Sizes rayon's global pool to [`compile_threads`], once per process,
/// before the first compile (a pool something else built first is left as
/// it is: nothing else in rulehook uses rayon).
fn limit_compile_threads() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = compile_threads(cores);
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("rulehook-compile-{i}"))
            .build_global()
        {
            tracing::debug!(error = %e, "the compile thread pool was already set up");
        }
    });
}

impl Runtime {
    /// Creates the engine. `cache_dir` holds compiled components (none: no
    /// disk cache, as for `rulehook plugin run`).
    pub fn new(limits: Limits, cache_dir: Option<PathBuf>) -> Result<Arc<Runtime>, String> {
        Self::with_pool(limits, cache_dir, PoolSizes::default())
    }

    /// [`Runtime::new`] with pool sizes of its own.
    pub fn with_pool(
        limits: Limits,
        cache_dir: Option<PathBuf>,
        sizes: PoolSizes,
    ) -> Result<Arc<Runtime>, String> {
        limit_compile_threads();
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        let mut pool = wasmtime::PoolingAllocationConfig::default();
        // Instance slots come from a preallocated pool: instantiation is a
        // few page resets instead of mmap calls. Sizes: a Rust wasip2
        // component has a handful of core instances and one memory.
        pool.total_component_instances(sizes.total)
            .total_core_instances(4096)
            .total_memories(1024)
            .total_tables(2048)
            .max_memory_size(
                limits
                    .memory_max
                    .max(limits.memory_bytes)
                    .next_multiple_of(65536),
            );
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| format!("cannot start wasmtime: {e}"))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| format!("cannot link WASI: {e}"))?;
        Transform::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| format!("cannot link the host interface: {e}"))?;
        sandbox::add_to_linker(&mut linker)
            .map_err(|e| format!("cannot link the plugin sandbox: {e:#}"))?;
        if let Some(dir) = &cache_dir {
            // A cache that cannot be created only costs compile time.
            if let Err(e) = std::fs::create_dir_all(dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot create the plugin cache directory; compiling without it");
            }
        }
        let runtime = Arc::new(Runtime {
            engine,
            linker,
            limits,
            cache_dir,
            per_plugin: sizes.per_plugin.max(1),
            ticker: Arc::default(),
        });
        spawn_ticker(Arc::downgrade(&runtime), runtime.ticker.clone());
        Ok(runtime)
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Compiles (or loads from the disk cache) and pre-instantiates a
    /// component. `name` is only for messages.
    pub fn load(self: &Arc<Self>, name: &str, bytes: &[u8]) -> Result<Compiled, String> {
        self.load_hashed(name, bytes, &hex(&Sha256::digest(bytes)))
    }

    /// [`Runtime::load`] for a caller that already has the bytes' SHA-256
    /// (hex), which keys the disk cache.
    pub fn load_hashed(
        self: &Arc<Self>,
        name: &str,
        bytes: &[u8],
        hash: &str,
    ) -> Result<Compiled, String> {
        let hash = hash.to_string();
        let component = self.component(name, bytes, &hash)?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| format!("plugin {name} cannot be linked: {e:#}"))?;
        let pre = TransformPre::new(pre).map_err(|e| {
            format!("plugin {name} does not implement the rulehook:plugin/transform world: {e:#}")
        })?;
        Ok(Compiled {
            name: name.to_string(),
            hash,
            runtime: self.clone(),
            pre,
            warm: Mutex::new(Vec::new()),
            live: Mutex::new(Slots::default()),
            freed: Condvar::new(),
        })
    }

    fn component(&self, name: &str, bytes: &[u8], hash: &str) -> Result<Component, String> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        let cached = self
            .cache_dir
            .as_ref()
            .map(|d| d.join(format!("{hash}-{:016x}.cwasm", h.finish())));
        if let Some(path) = &cached
            && path.exists()
        {
            // SAFETY: the file was written by `Component::serialize` of an
            // engine with the same compatibility hash (it is in the name),
            // in a directory only rulehook writes. wasmtime still checks the
            // header and refuses a mismatch; then we recompile.
            match unsafe { Component::deserialize_file(&self.engine, path) } {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::warn!(plugin = name, file = %path.display(), error = %e, "cached plugin unusable; recompiling")
                }
            }
        }
        // Before compiling: a big component takes seconds to compile, and
        // wasmtime would only then find an import it cannot link. (A cached
        // one passed this check when it was compiled; linking below still
        // checks it against this host.)
        super::imports::check(name, bytes).map_err(|e| e.to_string())?;
        let component = Component::new(&self.engine, bytes)
            .map_err(|e| format!("plugin {name} is not a valid component: {e:#}"))?;
        if let Some(path) = &cached {
            match component.serialize() {
                Ok(data) => write_atomically(path, &data),
                Err(e) => {
                    tracing::warn!(plugin = name, error = %e, "cannot serialize the compiled plugin")
                }
            }
        }
        Ok(component)
    }

    fn new_store(&self) -> Store<State> {
        let sandbox = Sandbox::default();
        let state = State {
            // Nothing granted: no preopened directories, no environment, no
            // arguments, no sockets; clocks, random and stdio are the
            // sandbox's.
            wasi: sandbox.wasi_ctx(),
            sandbox,
            table: ResourceTable::new(),
            memory_cap: self.limits.memory_bytes,
            call_timeout: self.limits.timeout,
            memory_size: 0,
            memory_exceeded: false,
            log_cap: self.limits.log_bytes,
            log_used: 0,
            log_line_cap: self.limits.log_lines,
            logs: Vec::new(),
            logs_dropped: 0,
            log_lines_dropped: 0,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| s);
        store
    }
}

/// Advances the engine's epoch every `TICK` while a deadline armed with
/// `Runtime::arm` may need it, while the runtime lives. Idle, it looks
/// once a second whether the runtime is gone.
fn spawn_ticker(runtime: Weak<Runtime>, ticker: Arc<Ticker>) {
    use std::sync::atomic::Ordering;
    let _ = std::thread::Builder::new()
        .name("rulehook-plugin-epoch".into())
        .spawn(move || {
            loop {
                {
                    let mut until = ticker.until.lock().unwrap_or_else(|e| e.into_inner());
                    while ticker.epoch.load(Ordering::Acquire) >= *until {
                        if runtime.strong_count() == 0 {
                            return;
                        }
                        until = ticker
                            .wake
                            .wait_timeout(until, Duration::from_secs(1))
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                }
                let Some(rt) = runtime.upgrade() else { return };
                rt.engine.increment_epoch();
                ticker.epoch.fetch_add(1, Ordering::AcqRel);
                drop(rt);
                std::thread::sleep(TICK);
            }
        });
}

fn write_atomically(path: &Path, data: &[u8]) {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let done = std::fs::write(&tmp, data).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = done {
        let _ = std::fs::remove_file(&tmp);
        tracing::warn!(file = %path.display(), error = %e, "cannot write the plugin cache");
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct Warm {
    store: Store<State>,
    bindings: Transform,
}

/// The instance count of one plugin.
#[derive(Default)]
struct Slots {
    /// Instances alive (in use or warm), at most the runtime's `per_plugin`.
    live: usize,
    /// Calls waiting for an instance to come free.
    waiting: usize,
}

/// A compiled, pre-instantiated plugin with its pool of warm instances.
pub struct Compiled {
    pub name: String,
    /// SHA-256 of the component bytes.
    pub hash: String,
    runtime: Arc<Runtime>,
    pre: TransformPre<State>,
    warm: Mutex<Vec<Warm>>,
    /// Instances of this plugin alive now and calls waiting for one.
    live: Mutex<Slots>,
    /// Signalled whenever `live` goes down or a warm instance comes back.
    freed: Condvar,
}

/// The rule and event a call is for.
#[derive(Clone, Debug, Default)]
pub struct CallContext {
    pub rule: String,
    pub event_id: String,
    pub event_type: String,
    pub entity_type: String,
}

impl CallContext {
    /// The context of `rule`'s chain for `event`, accepted as `event_id`.
    pub fn for_event(rule: &str, event_id: &str, event: &crate::event::Event) -> Self {
        CallContext {
            rule: rule.to_string(),
            event_id: event_id.to_string(),
            event_type: event.event_type.clone(),
            entity_type: event.entity_type.clone(),
        }
    }
}

impl Compiled {
    /// A warm instance, or a fresh one if this plugin is under its bound;
    /// at the bound, waits for one to come back, at most for the deadline.
    fn instance(&self, timeout: Duration, memory_cap: usize) -> Result<Warm, CallError> {
        // A warm instance that grew past this call's cap (under an entry
        // that allows more) is dropped rather than run: its memory never
        // shrinks. Dropped ones free their slot, so this ends with a fresh
        // instance at the latest.
        loop {
            let w = self.any_instance(timeout, memory_cap)?;
            if w.store.data().memory_size <= memory_cap {
                return Ok(w);
            }
            self.release(None);
        }
    }

    fn any_instance(&self, timeout: Duration, memory_cap: usize) -> Result<Warm, CallError> {
        let limit = self.runtime.per_plugin;
        let give_up = Instant::now() + timeout;
        let mut slots = self.live.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(w) = self.warm.lock().unwrap_or_else(|e| e.into_inner()).pop() {
                return Ok(w);
            }
            if slots.live < limit {
                slots.live += 1;
                break;
            }
            let now = Instant::now();
            if now >= give_up {
                return Err(CallError::Busy(limit, timeout.as_millis() as u64));
            }
            slots.waiting += 1;
            slots = self
                .freed
                .wait_timeout(slots, give_up - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            slots.waiting -= 1;
        }
        drop(slots);
        let mut store = self.runtime.new_store();
        // Initial memory counts against the cap of the call it starts for.
        store.data_mut().memory_cap = memory_cap;
        // Instantiation runs the component's start code: give it a deadline
        // too, but its own. Starting a snapshotted interpreter (an 18 MB
        // Python component) is mostly the host mapping its memory and
        // linking hundreds of functions; on a loaded machine that took
        // more than the 50 ms a call gets, and the instance then serves many
        // calls from the pool.
        let start = self.runtime.limits.timeout.max(START_TIMEOUT);
        store.set_epoch_deadline(ticks(start));
        self.runtime.arm(start);
        match self.pre.instantiate(&mut store) {
            Ok(bindings) => Ok(Warm { store, bindings }),
            Err(e) => {
                self.release(None);
                if e.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::Interrupt) {
                    return Err(CallError::Instantiate(format!(
                        "its start-up ran past the {} ms start deadline",
                        start.as_millis()
                    )));
                }
                // The root cause: the outer layers are backtrace headers.
                let max = self.runtime.limits.message_bytes;
                Err(CallError::Instantiate(plain_text(
                    &e.root_cause().to_string(),
                    max,
                )))
            }
        }
    }

    /// Gives an instance back: kept warm if `w` is reusable and there is
    /// room, dropped otherwise (freeing its slot of the plugin's bound).
    fn release(&self, w: Option<Warm>) {
        let mut slots = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = w {
            let mut warm = self.warm.lock().unwrap_or_else(|e| e.into_inner());
            if warm.len() < WARM_PER_PLUGIN {
                warm.push(w);
                drop(warm);
                self.freed.notify_one();
                return;
            }
        }
        slots.live = slots.live.saturating_sub(1);
        self.freed.notify_one();
    }

    /// Instances of this plugin alive now (in use or warm), and calls
    /// waiting for one.
    pub fn instances(&self) -> (usize, usize) {
        let slots = self.live.lock().unwrap_or_else(|e| e.into_inner());
        (slots.live, slots.waiting)
    }

    /// Prepares a warm or fresh instance for one call of `export`: caps
    /// reset, the sandbox's clock at 0 and its random numbers seeded from
    /// the call's input, the deadline set.
    fn begin(&self, w: &mut Warm, export: &str, parts: &[&str], limits: (Duration, usize)) {
        let (timeout, memory_cap) = limits;
        let s = w.store.data_mut();
        s.call_timeout = timeout;
        s.memory_cap = memory_cap;
        s.log_used = 0;
        s.logs_dropped = 0;
        s.log_lines_dropped = 0;
        s.logs.clear();
        s.memory_exceeded = false;
        s.sandbox
            .begin(&self.hash, export, parts, self.runtime.limits.log_bytes);
        w.store.set_epoch_deadline(ticks(timeout));
        self.runtime.arm(timeout);
    }

    /// The server's limits this plugin runs under.
    pub fn limits(&self) -> &Limits {
        &self.runtime.limits
    }

    /// Runs `transform` once under the server's limits.
    pub fn transform(&self, ctx: &CallContext, payload: &str, config: &str) -> Call {
        self.transform_with(ctx, payload, config, &Overrides::default())
    }

    /// Runs `transform` once, with a plugin entry's own limits.
    pub fn transform_with(
        &self,
        ctx: &CallContext,
        payload: &str,
        config: &str,
        overrides: &Overrides,
    ) -> Call {
        let started = Instant::now();
        let limits = self.runtime.limits.effective(overrides);
        let mut w = match self.instance(limits.0, limits.1) {
            Ok(w) => w,
            Err(e) => {
                return Call {
                    result: Err(e),
                    logs: Vec::new(),
                    logs_dropped: 0,
                    log_lines_dropped: 0,
                    elapsed: started.elapsed(),
                };
            }
        };
        self.begin(
            &mut w,
            "transform",
            &[
                &ctx.rule,
                &ctx.event_id,
                &ctx.event_type,
                &ctx.entity_type,
                payload,
                config,
            ],
            limits,
        );
        let wit_ctx = WitContext {
            rule: ctx.rule.clone(),
            event_id: ctx.event_id.clone(),
            event_type: ctx.event_type.clone(),
            entity_type: ctx.entity_type.clone(),
        };
        let raw = w
            .bindings
            .call_transform(&mut w.store, &wit_ctx, payload, config);
        let stderr = collect_stdio(w.store.data_mut());
        let limits = &self.runtime.limits;
        let text = |t: &str| plain_text(t, limits.message_bytes);
        let (result, reusable) = match raw {
            Ok(Ok(WitOutcome::Send(out))) if out.len() > limits.output_bytes => (
                Err(CallError::OutputTooLarge {
                    got: out.len(),
                    max: limits.output_bytes,
                }),
                true,
            ),
            Ok(Ok(WitOutcome::Send(out))) => (Ok(Outcome::Send(out)), true),
            Ok(Ok(WitOutcome::Skip(reason))) => (Ok(Outcome::Skip(text(&reason))), true),
            Ok(Err(message)) => (Err(CallError::Plugin(text(&message))), true),
            Err(e) => (Err(self.describe_trap(&e, w.store.data(), &stderr)), false),
        };
        let state = w.store.data_mut();
        let logs = std::mem::take(&mut state.logs);
        let logs_dropped = state.logs_dropped;
        let log_lines_dropped = state.log_lines_dropped;
        self.release(reusable.then_some(w));
        Call {
            result,
            logs,
            logs_dropped,
            log_lines_dropped,
            elapsed: started.elapsed(),
        }
    }

    /// A trap as its root cause: the memory cap or the deadline when one
    /// of them stopped it, else what the guest said about it (the SDK's
    /// panic log, or the end of what it printed to stderr, which is where
    /// interpreters put their traceback), else the trap itself.
    fn describe_trap(&self, e: &wasmtime::Error, state: &State, stderr: &str) -> CallError {
        match self.trap_cause(e, state, stderr) {
            CallError::Trap(cause) => {
                CallError::Trap(plain_text(&cause, self.runtime.limits.message_bytes))
            }
            other => other,
        }
    }

    fn trap_cause(&self, e: &wasmtime::Error, state: &State, stderr: &str) -> CallError {
        if state.memory_exceeded {
            return CallError::Memory(state.memory_cap >> 20);
        }
        if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            return CallError::Timeout(state.call_timeout.as_millis() as u64);
        }
        let panic = state
            .logs
            .iter()
            .rev()
            .find(|l| l.message.starts_with("plugin panicked"))
            .map(|l| l.message.clone());
        if let Some(p) = panic {
            return CallError::Trap(p);
        }
        if let Some(cause) = stderr_cause(stderr) {
            return CallError::Trap(cause);
        }
        if let Some(exit) = e.downcast_ref::<wasmtime_wasi::I32Exit>() {
            return CallError::Trap(format!("exited with status {}", exit.0));
        }
        if let Some(trap) = e.downcast_ref::<Trap>() {
            return CallError::Trap(trap.to_string());
        }
        // A host function's error (a network trap, a refused request) is
        // the root of the chain; the outer layers are backtrace headers.
        CallError::Trap(e.root_cause().to_string())
    }

    /// Runs `validate-config` once; `Err` is the plugin's message. Bounded
    /// by the same deadline, memory cap and sandbox as a transform.
    pub fn validate_config(&self, config: &str) -> Result<(), CallError> {
        self.validate_config_with(config, &Overrides::default())
    }

    /// [`Compiled::validate_config`] with a plugin entry's own limits.
    pub fn validate_config_with(
        &self,
        config: &str,
        overrides: &Overrides,
    ) -> Result<(), CallError> {
        let limits = self.runtime.limits.effective(overrides);
        let mut w = self.instance(limits.0, limits.1)?;
        self.begin(&mut w, "validate-config", &[config], limits);
        let raw = w.bindings.call_validate_config(&mut w.store, config);
        let stderr = collect_stdio(w.store.data_mut());
        match raw {
            Ok(r) => {
                self.release(Some(w));
                r.map_err(|m| CallError::Plugin(plain_text(&m, self.runtime.limits.message_bytes)))
            }
            Err(e) => {
                let err = self.describe_trap(&e, w.store.data(), &stderr);
                self.release(None);
                Err(err)
            }
        }
    }
}

/// Moves what the guest printed during the call into its log, one line per
/// log entry (stdout at `info`, stderr at `error`) under the same caps as
/// the log import, and returns the stderr text for [`stderr_cause`].
fn collect_stdio(state: &mut State) -> String {
    let (out, out_dropped) = state.sandbox.stdout.take();
    let (err, err_dropped) = state.sandbox.stderr.take();
    state.logs_dropped += out_dropped + err_dropped;
    let out = String::from_utf8_lossy(&out).into_owned();
    let err = String::from_utf8_lossy(&err).into_owned();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        state.push_log("info", line.to_string());
    }
    for line in err.lines().filter(|l| !l.trim().is_empty()) {
        state.push_log("error", line.to_string());
    }
    err
}

/// `text` with its control characters escaped (`\\n`, `\\u{1b}`, and the
/// Unicode line and paragraph separators), so that a guest's text logged
/// or shown by the host stays on one line and cannot forge another.
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    let needs = |c: char| c.is_control() || c == '\u{2028}' || c == '\u{2029}';
    if !text.chars().any(needs) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if needs(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// A guest's reason or message as the host keeps it: control characters
/// escaped, and cut to `max` bytes with a note of how long it was.
pub fn plain_text(text: &str, max: usize) -> String {
    let escaped = escape_controls(text);
    if escaped.len() <= max {
        return escaped.into_owned();
    }
    let note = format!("… ({} bytes in all; cut to {max})", text.len());
    let mut cut = max.saturating_sub(note.len());
    while !escaped.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{note}", &escaped[..cut])
}

/// Most of the guest's stderr a trap message quotes.
const CAUSE_BYTES: usize = 1024;

/// The last lines of `stderr` (within [`CAUSE_BYTES`]), without Rust's
/// "run with RUST_BACKTRACE" hint; `None` when it printed nothing.
fn stderr_cause(stderr: &str) -> Option<String> {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE"))
        .collect();
    let mut kept: Vec<&str> = Vec::new();
    let mut used = 0;
    for line in lines.iter().rev() {
        if used + line.len() > CAUSE_BYTES {
            if kept.is_empty() {
                // One long line: keep its end, where the message usually is.
                let mut cut = line.len() - CAUSE_BYTES;
                while !line.is_char_boundary(cut) {
                    cut += 1;
                }
                kept.push(&line[cut..]);
            }
            break;
        }
        used += line.len() + 1;
        kept.push(line);
    }
    kept.reverse();
    (!kept.is_empty()).then(|| kept.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wasm(name: &str) -> Vec<u8> {
        std::fs::read(Path::new(env!("RULEHOOK_WASM_DIR")).join(format!("{name}.wasm")))
            .expect("the build made the test plugins")
    }

    /// The ticker does not tick while no deadline needs it, makes every
    /// tick an armed deadline needs, and stops after it.
    #[test]
    fn the_epoch_ticks_only_while_a_deadline_needs_it() {
        use std::sync::atomic::Ordering::Acquire;
        let rt = Runtime::new(Limits::default(), None).unwrap();
        let epoch = || rt.ticker.epoch.load(Acquire);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(epoch(), 0, "an idle runtime ticked");
        rt.arm(Duration::from_millis(20));
        let needed = ticks(Duration::from_millis(20)) + 1;
        let started = Instant::now();
        while epoch() < needed && started.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(epoch(), needed, "the ticks a 20 ms deadline needs");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(epoch(), needed, "it went on ticking after the deadline");
    }

    #[test]
    fn compiling_takes_half_the_cores_at_most() {
        for (cores, threads) in [(1, 1), (2, 1), (3, 1), (4, 2), (8, 4), (64, 32)] {
            assert_eq!(compile_threads(cores), threads, "{cores} cores");
        }
        // The pool wasmtime compiles on is that size once a runtime exists.
        let _rt = Runtime::new(Limits::default(), None).unwrap();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(rayon::current_num_threads(), compile_threads(cores));
    }

    #[test]
    fn one_plugins_slow_calls_leave_pool_slots_for_the_others() {
        // A pool of 4 instances, at most 2 per plugin; spin holds each
        // instance for its whole 1.5 s deadline.
        let limits = Limits {
            timeout: Duration::from_millis(1500),
            ..Limits::default()
        };
        let sizes = PoolSizes {
            total: 4,
            per_plugin: 2,
        };
        let rt = Runtime::with_pool(limits, None, sizes).unwrap();
        let spin = rt.load("spin", &wasm("spin")).unwrap();
        let noop = rt.load("noop", &wasm("noop")).unwrap();
        let ctx = CallContext::default();
        std::thread::scope(|s| {
            let calls: Vec<_> = (0..4)
                .map(|_| s.spawn(|| spin.transform(&ctx, "{}", "null").result))
                .collect();
            let waited = Instant::now();
            // Until every spin call holds an instance or waits for one.
            loop {
                let (live, waiting) = spin.instances();
                if live + waiting == 4 {
                    break;
                }
                assert!(
                    waited.elapsed() < Duration::from_secs(5),
                    "spin never started"
                );
                std::thread::yield_now();
            }
            // Spin is at its bound, with two more calls waiting: the pool
            // still has room for another plugin.
            let call = noop.transform(&ctx, "{}", "null");
            assert_eq!(call.result, Ok(Outcome::Send("{}".into())));
            assert_eq!(spin.instances(), (2, 2));
            let results: Vec<_> = calls.into_iter().map(|c| c.join().unwrap()).collect();
            let timeouts = results
                .iter()
                .filter(|r| **r == Err(CallError::Timeout(1500)))
                .count();
            assert!(timeouts >= 2, "{results:?}");
            assert!(
                results
                    .iter()
                    .all(|r| matches!(r, Err(CallError::Timeout(_) | CallError::Busy(2, 1500)))),
                "{results:?}"
            );
        });
        assert_eq!(spin.instances(), (0, 0));
    }

    #[test]
    fn an_entry_sets_its_own_deadline_and_memory_cap_within_the_maxima() {
        let limits = Limits {
            timeout_max: Duration::from_millis(300),
            memory_max: 48 << 20,
            ..Limits::default()
        };
        let rt = Runtime::new(limits, None).unwrap();
        let ctx = CallContext::default();
        let spin = rt.load("spin", &wasm("spin")).unwrap();
        let with = |timeout: Option<u64>, memory: Option<usize>| Overrides {
            timeout: timeout.map(Duration::from_millis),
            memory_bytes: memory,
        };
        let result = |p: &Compiled, o: Overrides| p.transform_with(&ctx, "{}", "null", &o).result;
        assert_eq!(result(&spin, with(None, None)), Err(CallError::Timeout(50)));
        assert_eq!(
            result(&spin, with(Some(100), None)),
            Err(CallError::Timeout(100))
        );
        // Above the maximum (which the rules' check refuses), a call is
        // held to the maximum.
        assert_eq!(
            result(&spin, with(Some(60_000), None)),
            Err(CallError::Timeout(300))
        );
        // The memory bomb gets the longest deadline, so it meets its cap
        // first however loaded the machine is.
        let membomb = rt.load("membomb", &wasm("membomb")).unwrap();
        let memory = |cap: Option<usize>| result(&membomb, with(Some(300), cap));
        assert_eq!(memory(None), Err(CallError::Memory(32)));
        assert_eq!(memory(Some(40 << 20)), Err(CallError::Memory(40)));
        assert_eq!(memory(Some(1 << 30)), Err(CallError::Memory(48)));
        // A lower cap than the default holds too.
        assert_eq!(memory(Some(20 << 20)), Err(CallError::Memory(20)));
    }

    #[test]
    fn stderr_cause_keeps_the_last_lines_without_the_backtrace_hint() {
        let rust = "\nthread '<unnamed>' panicked at src/lib.rs:9:13:\nboom\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n";
        assert_eq!(
            stderr_cause(rust).as_deref(),
            Some("thread '<unnamed>' panicked at src/lib.rs:9:13:\nboom")
        );
        assert_eq!(stderr_cause("  \n\n"), None);
        let long = format!("{}é the end", "x".repeat(3000));
        let cause = stderr_cause(&long).unwrap();
        assert!(
            cause.len() <= CAUSE_BYTES && cause.ends_with("é the end"),
            "{cause}"
        );
    }

    /// A runtime with a deadline long enough for calls that log or build
    /// megabytes, so the caps are what stops them, not the clock.
    fn patient() -> Arc<Runtime> {
        let limits = Limits {
            timeout: Duration::from_secs(20),
            ..Limits::default()
        };
        Runtime::new(limits, None).unwrap()
    }

    #[test]
    fn log_lines_are_capped_as_well_as_bytes() {
        let rt = patient();
        let flood = rt.load("log-flood", &wasm("log-flood")).unwrap();
        let call = flood.transform(&CallContext::default(), "{}", r#"{"empty": 20000}"#);
        assert_eq!(call.result, Ok(Outcome::Send("{}".into())));
        assert_eq!(call.logs.len(), Limits::default().log_lines, "lines kept");
        assert_eq!(call.log_lines_dropped, 20000 - call.logs.len());
    }

    #[test]
    fn skip_reasons_and_error_messages_are_capped_like_the_output() {
        let rt = patient();
        let skip = rt.load("skip", &wasm("skip")).unwrap();
        let ctx = CallContext::default();
        let six_mib = r#"{"reason": "0123456789abcdef", "repeat": 393216}"#;
        match skip.transform(&ctx, "{}", six_mib).result {
            Ok(Outcome::Skip(reason)) => {
                assert!(reason.len() <= 4096, "a {}-byte reason", reason.len());
                assert!(reason.starts_with("0123456789abcdef"), "{reason:.100}");
                assert!(
                    reason.ends_with("(6291456 bytes in all; cut to 4096)"),
                    "{reason:.100}"
                );
            }
            other => panic!("{other:?}"),
        }
        let failing = r#"{"reason": "0123456789abcdef", "repeat": 393216, "fail": true}"#;
        match skip.transform(&ctx, "{}", failing).result {
            Err(CallError::Plugin(message)) => {
                assert!(message.len() <= 4096, "a {}-byte message", message.len());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn control_characters_in_plugin_text_are_escaped() {
        let rt = patient();
        let ctx = CallContext::default();
        let flood = rt.load("log-flood", &wasm("log-flood")).unwrap();
        let forged = r#"{"message": "hello\n2026-01-01T00:00:00Z ERROR forged\u001b[31m"}"#;
        let call = flood.transform(&ctx, "{}", forged);
        assert_eq!(call.logs.len(), 1, "{:?}", call.logs);
        assert_eq!(
            call.logs[0].message,
            "hello\\n2026-01-01T00:00:00Z ERROR forged\\u{1b}[31m"
        );
        let skip = rt.load("skip", &wasm("skip")).unwrap();
        let call = skip.transform(&ctx, "{}", r#"{"reason": "one\rtwo"}"#);
        assert_eq!(call.result, Ok(Outcome::Skip("one\\rtwo".into())));
    }

    #[test]
    fn a_component_importing_what_the_host_lacks_is_refused_naming_it() {
        let rt = Runtime::new(Limits::default(), None).unwrap();
        let kv = super::super::imports::tests::importing("wasi:keyvalue/store@0.2.0-draft");
        let err = rt.load("kv", &kv).err().unwrap();
        assert!(
            err.starts_with(
                "plugin kv imports wasi:keyvalue/store@0.2.0-draft, which the host does not provide"
            ),
            "{err}"
        );
        // wasi:http is not linked: refused before compiling, with the
        // componentize-js flag that leaves it out.
        let http = super::super::imports::tests::importing("wasi:http/outgoing-handler@0.2.0");
        let err = rt.load("http", &http).err().unwrap();
        assert!(
            err.starts_with("plugin http imports wasi:http/outgoing-handler@0.2.0, which the host does not provide (plugins have no network access"),
            "{err}"
        );
    }
}
