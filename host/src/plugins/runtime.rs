//! The wasmtime side of plugins: one engine, components compiled once and
//! cached on disk, pre-instantiated, warm instances reused from a pool, and
//! the per-call limits (CPU deadline, memory cap, output and log caps).
//!
//! Calls are synchronous and CPU-bound; callers run them off the async
//! reactor (`spawn_blocking`). A call that traps, times out or runs out of
//! memory throws its instance away: a trapped instance's state is undefined.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Duration::from_millis(50),
            memory_bytes: 32 << 20,
            output_bytes: 1 << 20,
            log_bytes: 64 << 10,
        }
    }
}

/// The epoch advances this often; the deadline is a whole number of ticks,
/// and one tick is added, so a timeout fires between `timeout` and
/// `timeout + TICK`.
const TICK: Duration = Duration::from_millis(5);
/// Warm instances kept per plugin; more concurrent calls instantiate fresh
/// ones and drop them afterwards.
const WARM_PER_PLUGIN: usize = 8;

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
struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    memory_cap: usize,
    memory_exceeded: bool,
    log_cap: usize,
    log_used: usize,
    logs: Vec<LogLine>,
    logs_dropped: usize,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
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

impl wit::rulehook::plugin::host::Host for State {
    fn log(&mut self, level: Level, message: String) {
        if self.log_used + message.len() > self.log_cap {
            self.logs_dropped += message.len();
            return;
        }
        self.log_used += message.len();
        let level = match level {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        };
        self.logs.push(LogLine { level, message });
    }
}

impl wit::rulehook::plugin::types::Host for State {}

/// The engine, its linker and the epoch ticker, shared by every plugin.
pub struct Runtime {
    engine: Engine,
    linker: Linker<State>,
    limits: Limits,
    cache_dir: Option<PathBuf>,
}

impl Runtime {
    /// Creates the engine. `cache_dir` holds compiled components (none: no
    /// disk cache, as for `rulehook plugin run`).
    pub fn new(limits: Limits, cache_dir: Option<PathBuf>) -> Result<Arc<Runtime>, String> {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        let mut pool = wasmtime::PoolingAllocationConfig::default();
        // Instance slots come from a preallocated pool: instantiation is a
        // few page resets instead of mmap calls. Sizes: a Rust wasip2
        // component has a handful of core instances and one memory.
        pool.total_component_instances(512)
            .total_core_instances(4096)
            .total_memories(1024)
            .total_tables(2048)
            .max_memory_size(limits.memory_bytes.next_multiple_of(65536));
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| format!("cannot start wasmtime: {e}"))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| format!("cannot link WASI: {e}"))?;
        Transform::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| format!("cannot link the host interface: {e}"))?;
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
        });
        spawn_ticker(Arc::downgrade(&runtime));
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
        let state = State {
            // Nothing granted: no preopened directories, no environment, no
            // arguments, no sockets; stdio goes nowhere.
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            memory_cap: self.limits.memory_bytes,
            memory_exceeded: false,
            log_cap: self.limits.log_bytes,
            log_used: 0,
            logs: Vec::new(),
            logs_dropped: 0,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| s);
        store
    }
}

/// Advances the engine's epoch every `TICK` while the runtime lives.
fn spawn_ticker(runtime: Weak<Runtime>) {
    let _ = std::thread::Builder::new()
        .name("rulehook-plugin-epoch".into())
        .spawn(move || {
            while let Some(rt) = runtime.upgrade() {
                rt.engine.increment_epoch();
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

/// A compiled, pre-instantiated plugin with its pool of warm instances.
pub struct Compiled {
    pub name: String,
    /// SHA-256 of the component bytes.
    pub hash: String,
    runtime: Arc<Runtime>,
    pre: TransformPre<State>,
    warm: Mutex<Vec<Warm>>,
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
    fn instance(&self) -> Result<Warm, CallError> {
        if let Some(w) = self.warm.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(w);
        }
        let mut store = self.runtime.new_store();
        // Instantiation runs the component's start code: give it a deadline too.
        store.set_epoch_deadline(self.deadline_ticks());
        let bindings = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| CallError::Instantiate(format!("{e:#}")))?;
        Ok(Warm { store, bindings })
    }

    fn deadline_ticks(&self) -> u64 {
        let t = self.runtime.limits.timeout.as_millis() as u64;
        // The ticker runs freely, so the next tick may come at once: one
        // tick more makes the deadline at least `timeout`, never less.
        t.div_ceil(TICK.as_millis() as u64) + 1
    }

    /// Runs `transform` once.
    pub fn transform(&self, ctx: &CallContext, payload: &str, config: &str) -> Call {
        let started = Instant::now();
        let mut w = match self.instance() {
            Ok(w) => w,
            Err(e) => {
                return Call {
                    result: Err(e),
                    logs: Vec::new(),
                    logs_dropped: 0,
                    elapsed: started.elapsed(),
                };
            }
        };
        {
            let s = w.store.data_mut();
            s.log_used = 0;
            s.logs_dropped = 0;
            s.memory_exceeded = false;
        }
        w.store.set_epoch_deadline(self.deadline_ticks());
        let wit_ctx = WitContext {
            rule: ctx.rule.clone(),
            event_id: ctx.event_id.clone(),
            event_type: ctx.event_type.clone(),
            entity_type: ctx.entity_type.clone(),
        };
        let raw = w
            .bindings
            .call_transform(&mut w.store, &wit_ctx, payload, config);
        let limits = &self.runtime.limits;
        let (result, reusable) = match raw {
            Ok(Ok(WitOutcome::Send(out))) if out.len() > limits.output_bytes => (
                Err(CallError::OutputTooLarge {
                    got: out.len(),
                    max: limits.output_bytes,
                }),
                true,
            ),
            Ok(Ok(WitOutcome::Send(out))) => (Ok(Outcome::Send(out)), true),
            Ok(Ok(WitOutcome::Skip(reason))) => (Ok(Outcome::Skip(reason)), true),
            Ok(Err(message)) => (Err(CallError::Plugin(message)), true),
            Err(e) => (Err(self.describe_trap(&e, w.store.data())), false),
        };
        let state = w.store.data_mut();
        let logs = std::mem::take(&mut state.logs);
        let logs_dropped = state.logs_dropped;
        if reusable {
            let mut warm = self.warm.lock().unwrap_or_else(|e| e.into_inner());
            if warm.len() < WARM_PER_PLUGIN {
                warm.push(w);
            }
        }
        Call {
            result,
            logs,
            logs_dropped,
            elapsed: started.elapsed(),
        }
    }

    fn describe_trap(&self, e: &wasmtime::Error, state: &State) -> CallError {
        if state.memory_exceeded {
            return CallError::Memory(self.runtime.limits.memory_bytes >> 20);
        }
        if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            return CallError::Timeout(self.runtime.limits.timeout.as_millis() as u64);
        }
        // A Rust panic reaches us as `unreachable`; the SDK logged the panic
        // message just before, which is the useful part.
        let panic = state
            .logs
            .iter()
            .rev()
            .find(|l| l.message.starts_with("plugin panicked"))
            .map(|l| l.message.clone());
        CallError::Trap(
            panic.unwrap_or_else(|| format!("{e:#}").lines().next().unwrap_or("").to_string()),
        )
    }

    /// Runs `validate-config` once; `Err` is the plugin's message.
    pub fn validate_config(&self, config: &str) -> Result<(), CallError> {
        let mut w = self.instance()?;
        w.store.set_epoch_deadline(self.deadline_ticks());
        match w.bindings.call_validate_config(&mut w.store, config) {
            Ok(r) => {
                let mut warm = self.warm.lock().unwrap_or_else(|e| e.into_inner());
                if warm.len() < WARM_PER_PLUGIN {
                    warm.push(w);
                }
                r.map_err(CallError::Plugin)
            }
            Err(e) => Err(self.describe_trap(&e, w.store.data())),
        }
    }
}
