//! The wasmtime side of policies: one engine, the three worlds' bindings, loading a
//! component (compile → type-check → self-test → canned call, validated) and calling it
//! under a time and memory limit.
//!
//! Sandbox: components are linked against WASI preview 2 (a Rust guest imports it through
//! std even when it never uses it) with an **empty** context — no preopened directories, no
//! environment, arguments, sockets or stdio, and clocks that stand still. A call runs in a fresh store whose memory may not grow
//! past the limit and whose epoch deadline interrupts it at the time limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::PluginKind;

/// Bindings of the `chunker` world.
pub mod chunker {
    wasmtime::component::bindgen!({ world: "chunker", path: "../wit" });
}
/// Bindings of the `selector` world.
pub mod selector {
    wasmtime::component::bindgen!({ world: "selector", path: "../wit" });
}
/// Bindings of the `evictor` world.
pub mod evictor {
    wasmtime::component::bindgen!({ world: "evictor", path: "../wit" });
}

/// Bindings of `kvgate:policy@0.1.0`, whose components keep loading: their requests are the
/// current ones less what 0.2.0 added.
pub mod v1 {
    /// The 0.1.0 `chunker` world.
    pub mod chunker {
        wasmtime::component::bindgen!({ world: "chunker", path: "../wit/v0.1.0" });
    }
    /// The 0.1.0 `selector` world (no `attention` in its request).
    pub mod selector {
        wasmtime::component::bindgen!({ world: "selector", path: "../wit/v0.1.0" });
    }
    /// The 0.1.0 `evictor` world.
    pub mod evictor {
        wasmtime::component::bindgen!({ world: "evictor", path: "../wit/v0.1.0" });
    }
}

pub use chunker::kvgate::policy::types::ChunkRequest;
pub use evictor::kvgate::policy::types::{Candidate as WitCandidate, EvictRequest};
pub use selector::kvgate::policy::types::SelectRequest;

/// How often the epoch ticks: the granularity of call time limits.
const TICK: Duration = Duration::from_millis(2);

/// Why a call did not give an answer.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum CallError {
    #[error("timed out")]
    Timeout,
    #[error("hit its memory limit")]
    Memory,
    #[error("trapped: {0}")]
    Trap(String),
    #[error("invalid answer: {0}")]
    Invalid(String),
}

impl CallError {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            CallError::Timeout => "timeout",
            CallError::Memory => "memory",
            CallError::Trap(_) => "trap",
            CallError::Invalid(_) => "invalid",
        }
    }
}

/// Why a component was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("not a valid WebAssembly component: {0}")]
    Compile(String),
    #[error("does not implement the kvgate:policy/{kind} world: {message}")]
    World { kind: &'static str, message: String },
    #[error("its self-test failed: {0}")]
    SelfTest(String),
    #[error("answered its canned check wrongly: {0}")]
    Canned(CallError),
}

/// Per-store state: the empty WASI context and the memory limit.
pub struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    limit: MemoryLimit,
}

/// Like wasmtime's `StoreLimits`, but it remembers that it refused, so a memory blow-up is
/// reported as such rather than as the trap the guest's allocator turns it into.
struct MemoryLimit {
    max_bytes: usize,
    refused: bool,
}

impl ResourceLimiter for MemoryLimit {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.refused = true;
            wasmtime::bail!("memory limit of {} bytes reached", self.max_bytes);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// The clocks a component sees: always the epoch (wall) and zero (monotonic).
struct FrozenClock;

impl wasmtime_wasi::HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl wasmtime_wasi::HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// Limits every call runs under.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub timeout: Duration,
    pub memory_bytes: usize,
}

/// The one wasmtime engine, its linker, and the epoch ticker.
pub struct Runtime {
    engine: Engine,
    linker: Linker<State>,
    limits: Limits,
    stop: Arc<AtomicBool>,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A compiled, type-checked component of one world, ready to instantiate.
pub enum Pre {
    Chunker(chunker::ChunkerPre<State>),
    Selector(selector::SelectorPre<State>),
    Evictor(evictor::EvictorPre<State>),
    ChunkerV1(v1::chunker::ChunkerPre<State>),
    SelectorV1(v1::selector::SelectorPre<State>),
    EvictorV1(v1::evictor::EvictorPre<State>),
}

/// A loaded component: what it is and how to run it.
pub struct LoadedComponent {
    pub kind: PluginKind,
    pub name: String,
    pub version: String,
    pub sha256: String,
    /// The `kvgate:policy` version it was built against.
    pub wit: &'static str,
    pre: Pre,
}

impl Runtime {
    pub fn new(limits: Limits) -> anyhow::Result<Self> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(64)
            .total_core_instances(128)
            .total_memories(64)
            .total_tables(128)
            .max_memory_size(limits.memory_bytes.max(1 << 20));
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (e, s) = (engine.clone(), stop.clone());
        std::thread::Builder::new().name("kvgate-wasm-epoch".into()).spawn(move || {
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(TICK);
                e.increment_epoch();
            }
        })?;
        Ok(Self { engine, linker, limits, stop })
    }

    fn store(&self) -> Store<State> {
        let limit = MemoryLimit { max_bytes: self.limits.memory_bytes, refused: false };
        // Nothing granted: no directories, environment, arguments, sockets or stdio; the clocks
        // stand still, so an answer can depend on nothing but the call's arguments.
        let wasi = WasiCtx::builder().wall_clock(FrozenClock).monotonic_clock(FrozenClock).build();
        let state = State { wasi, table: ResourceTable::new(), limit };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limit);
        let ticks = (self.limits.timeout.as_nanos() / TICK.as_nanos()).max(1) as u64 + 1;
        store.set_epoch_deadline(ticks);
        store
    }

    /// Compiles and checks a component as `kind` (or, with `None`, as whichever world it
    /// implements), runs its self-test and a canned call; only a component that passes all
    /// of them is returned.
    pub fn load(&self, bytes: &[u8], kind: Option<PluginKind>) -> Result<LoadedComponent, LoadError> {
        let sha256: String = Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
        let component = Component::new(&self.engine, bytes).map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        let instance_pre = self.linker.instantiate_pre(&component).map_err(|e| LoadError::World {
            kind: kind.map_or("any", PluginKind::as_str),
            message: format!("{e:#}"),
        })?;
        let kinds = match kind {
            Some(k) => vec![k],
            None => vec![PluginKind::Chunker, PluginKind::Selector, PluginKind::Evictor],
        };
        let mut last = String::new();
        let mut found = None;
        for k in kinds.iter().copied() {
            // The current version first, then 0.1.0.
            let pre = match k {
                PluginKind::Chunker => chunker::ChunkerPre::new(instance_pre.clone())
                    .map(Pre::Chunker)
                    .or_else(|e| v1::chunker::ChunkerPre::new(instance_pre.clone()).map(Pre::ChunkerV1).map_err(|_| e)),
                PluginKind::Selector => {
                    selector::SelectorPre::new(instance_pre.clone()).map(Pre::Selector).or_else(|e| {
                        v1::selector::SelectorPre::new(instance_pre.clone()).map(Pre::SelectorV1).map_err(|_| e)
                    })
                }
                PluginKind::Evictor => evictor::EvictorPre::new(instance_pre.clone())
                    .map(Pre::Evictor)
                    .or_else(|e| v1::evictor::EvictorPre::new(instance_pre.clone()).map(Pre::EvictorV1).map_err(|_| e)),
            };
            match pre {
                Ok(p) => {
                    found = Some((k, p));
                    break;
                }
                Err(e) => last = format!("{e:#}"),
            }
        }
        let (kind, pre) = found.ok_or_else(|| LoadError::World {
            kind: kinds.first().filter(|_| kinds.len() == 1).map_or("chunker, selector or evictor", |k| k.as_str()),
            message: last,
        })?;
        let (name, version) = self.info(&pre).map_err(|e| LoadError::SelfTest(format!("info(): {e}")))?;
        let wit = match pre {
            Pre::Chunker(_) | Pre::Selector(_) | Pre::Evictor(_) => "0.2.0",
            Pre::ChunkerV1(_) | Pre::SelectorV1(_) | Pre::EvictorV1(_) => "0.1.0",
        };
        let loaded = LoadedComponent { kind, name, version, sha256, wit, pre };
        match self.self_test(&loaded.pre) {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => return Err(LoadError::SelfTest(msg)),
            Err(e) => return Err(LoadError::SelfTest(e.to_string())),
        }
        super::canned_check(self, &loaded).map_err(LoadError::Canned)?;
        Ok(loaded)
    }

    fn info(&self, pre: &Pre) -> Result<(String, String), CallError> {
        let info = self.run(|store| match pre {
            Pre::Chunker(p) => p.instantiate(&mut *store)?.call_info(&mut *store),
            Pre::Selector(p) => {
                let i = p.instantiate(&mut *store)?.call_info(&mut *store)?;
                Ok(chunker::kvgate::policy::types::PluginInfo { name: i.name, version: i.version })
            }
            Pre::Evictor(p) => {
                let i = p.instantiate(&mut *store)?.call_info(&mut *store)?;
                Ok(chunker::kvgate::policy::types::PluginInfo { name: i.name, version: i.version })
            }
            Pre::ChunkerV1(p) => {
                let i = p.instantiate(&mut *store)?.call_info(&mut *store)?;
                Ok(chunker::kvgate::policy::types::PluginInfo { name: i.name, version: i.version })
            }
            Pre::SelectorV1(p) => {
                let i = p.instantiate(&mut *store)?.call_info(&mut *store)?;
                Ok(chunker::kvgate::policy::types::PluginInfo { name: i.name, version: i.version })
            }
            Pre::EvictorV1(p) => {
                let i = p.instantiate(&mut *store)?.call_info(&mut *store)?;
                Ok(chunker::kvgate::policy::types::PluginInfo { name: i.name, version: i.version })
            }
        })?;
        Ok((info.name, info.version))
    }

    fn self_test(&self, pre: &Pre) -> Result<Result<(), String>, CallError> {
        self.run(|store| match pre {
            Pre::Chunker(p) => p.instantiate(&mut *store)?.call_self_test(&mut *store),
            Pre::Selector(p) => p.instantiate(&mut *store)?.call_self_test(&mut *store),
            Pre::Evictor(p) => p.instantiate(&mut *store)?.call_self_test(&mut *store),
            Pre::ChunkerV1(p) => p.instantiate(&mut *store)?.call_self_test(&mut *store),
            Pre::SelectorV1(p) => p.instantiate(&mut *store)?.call_self_test(&mut *store),
            Pre::EvictorV1(p) => p.instantiate(&mut *store)?.call_self_test(&mut *store),
        })
    }

    /// Runs `f` in a fresh store under the limits, telling timeouts and memory blow-ups
    /// apart from other traps.
    fn run<R>(&self, f: impl FnOnce(&mut Store<State>) -> wasmtime::Result<R>) -> Result<R, CallError> {
        let mut store = self.store();
        let result = f(&mut store);
        result.map_err(|e| {
            if let Some(wasmtime::Trap::Interrupt) = e.downcast_ref::<wasmtime::Trap>() {
                return CallError::Timeout;
            }
            if store.data().limit.refused {
                return CallError::Memory;
            }
            CallError::Trap(format!("{e:#}"))
        })
    }

    pub fn cut(&self, c: &LoadedComponent, req: &ChunkRequest) -> Result<Vec<u32>, CallError> {
        match &c.pre {
            Pre::Chunker(p) => self.run(|store| p.instantiate(&mut *store)?.call_cut(&mut *store, req)),
            Pre::ChunkerV1(p) => {
                let req = v1::chunker::kvgate::policy::types::ChunkRequest {
                    tokens: req.tokens.clone(),
                    offsets: req.offsets.clone(),
                    text: req.text.clone(),
                    segment_starts: req.segment_starts.clone(),
                    target_tokens: req.target_tokens,
                };
                self.run(|store| p.instantiate(&mut *store)?.call_cut(&mut *store, &req))
            }
            _ => Err(CallError::Invalid("not a chunker".into())),
        }
    }

    pub fn select(&self, c: &LoadedComponent, req: &SelectRequest) -> Result<Vec<u32>, CallError> {
        match &c.pre {
            Pre::Selector(p) => self.run(|store| p.instantiate(&mut *store)?.call_select(&mut *store, req)),
            Pre::SelectorV1(p) => {
                let req = v1::selector::kvgate::policy::types::SelectRequest {
                    deviations: req.deviations.clone(),
                    positions: req.positions.clone(),
                    chunk_starts: req.chunk_starts.clone(),
                    budget: req.budget,
                };
                self.run(|store| p.instantiate(&mut *store)?.call_select(&mut *store, &req))
            }
            _ => Err(CallError::Invalid("not a selector".into())),
        }
    }

    pub fn victims(&self, c: &LoadedComponent, req: &EvictRequest) -> Result<Vec<u32>, CallError> {
        match &c.pre {
            Pre::Evictor(p) => self.run(|store| p.instantiate(&mut *store)?.call_victims(&mut *store, req)),
            Pre::EvictorV1(p) => {
                use v1::evictor::kvgate::policy::types as old;
                let req = old::EvictRequest {
                    candidates: req
                        .candidates
                        .iter()
                        .map(|c| old::Candidate {
                            bytes: c.bytes,
                            tokens: c.tokens,
                            created_ms: c.created_ms,
                            last_access_ms: c.last_access_ms,
                            hits: c.hits,
                            cost_us: c.cost_us,
                        })
                        .collect(),
                    bytes_to_free: req.bytes_to_free,
                    now_ms: req.now_ms,
                };
                self.run(|store| p.instantiate(&mut *store)?.call_victims(&mut *store, &req))
            }
            _ => Err(CallError::Invalid("not an evictor".into())),
        }
    }
}

/// Time a closure (call latency for the plugin table).
pub fn timed<R>(f: impl FnOnce() -> R) -> (R, Duration) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed())
}
