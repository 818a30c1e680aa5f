//! Policies as WebAssembly components: the chunker, the selector and the evictor that
//! operators write, swap and hot-reload without restarting the gateway.
//!
//! One file per kind in the plugins directory — `chunker.wasm`, `selector.wasm`,
//! `evictor.wasm` — each a component of the matching world of `wit/policy.wit`. A slot per
//! kind holds the serving version behind an `ArcSwap`: a reload compiles, type-checks,
//! self-tests and checks the new component off the request path and only then swaps it in;
//! a request keeps the version it started with. A component that fails to load never
//! replaces a working one.
//!
//! At run time every answer is validated. A trap, a timeout, a memory blow-up or an invalid
//! answer falls back, for that call, to the safe behaviour — fixed-size cuts, recompute every
//! reused token, least recently used — and counts; after [`ROLLBACK_AFTER`] failures in a
//! row the slot rolls back to the previous version (or to the built-in policy). Requests
//! always succeed.
//!
//! Only this module knows wasmtime.
//!
//! - [`runtime`]: the engine, the bindings, loading and calling under limits.
//! - [`watch`]: the debounced directory watcher.

pub mod runtime;
pub mod watch;

use std::collections::VecDeque;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;

use crate::blend::{self, CutInput, Policy, SelectInput};
use crate::store::{Candidate, Evictor, LeastRecentlyUsed};
use runtime::{CallError, ChunkRequest, EvictRequest, Limits, LoadError, LoadedComponent, Runtime, SelectRequest};

/// Failures in a row after which a slot rolls back to its previous version.
pub const ROLLBACK_AFTER: u32 = 3;
/// Call latencies kept per plugin for the p99 of `GET /admin/plugins`.
const LATENCY_WINDOW: usize = 1024;

/// The three kinds of policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginKind {
    Chunker,
    Selector,
    Evictor,
}

impl PluginKind {
    pub const ALL: [PluginKind; 3] = [PluginKind::Chunker, PluginKind::Selector, PluginKind::Evictor];

    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Chunker => "chunker",
            PluginKind::Selector => "selector",
            PluginKind::Evictor => "evictor",
        }
    }

    /// The file the plugins directory holds for this kind.
    pub fn file_name(self) -> &'static str {
        match self {
            PluginKind::Chunker => "chunker.wasm",
            PluginKind::Selector => "selector.wasm",
            PluginKind::Evictor => "evictor.wasm",
        }
    }

    /// What runs when no plugin is loaded or a call fails.
    pub fn fallback(self) -> &'static str {
        match self {
            PluginKind::Chunker => "fixed-size cuts",
            PluginKind::Selector => "recompute every reused token",
            PluginKind::Evictor => "least recently used",
        }
    }
}

/// How the policy host runs.
#[derive(Debug, Clone)]
pub struct PolicyOptions {
    pub dir: PathBuf,
    /// Longest a single call may run.
    pub timeout: Duration,
    /// Most linear memory a component may grow to.
    pub memory_bytes: usize,
}

/// Counters of one loaded version.
#[derive(Default)]
struct PluginStats {
    calls: AtomicU64,
    traps: AtomicU64,
    timeouts: AtomicU64,
    memory: AtomicU64,
    invalid: AtomicU64,
    /// Recent call durations, microseconds.
    latencies: Mutex<VecDeque<u32>>,
}

/// A loaded version of a plugin.
pub struct Plugin {
    component: LoadedComponent,
    loaded_at_ms: u64,
    stats: PluginStats,
}

/// One kind's serving version and what it falls back to.
struct Slot {
    kind: PluginKind,
    current: ArcSwapOption<Plugin>,
    /// The version before the current one, for rollback.
    previous: Mutex<Option<Arc<Plugin>>>,
    failures_in_a_row: AtomicU32,
    /// The file contents last refused (sha256, why), so an unchanged bad file is not
    /// reloaded on every directory event.
    rejected: Mutex<Option<(String, String)>>,
    rollbacks: AtomicU64,
    /// Calls answered by the fallback because the plugin failed.
    fallbacks: AtomicU64,
    /// Serialises reloads of this slot.
    reloading: Mutex<()>,
}

/// What a reload did to one slot.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadOutcome {
    pub kind: PluginKind,
    /// `loaded`, `unchanged`, `rejected`, `removed` or `absent`.
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What `kvgate plugin check` found a component to be.
#[derive(Debug, Clone)]
pub struct CheckedComponent {
    pub kind: PluginKind,
    pub name: String,
    pub version: String,
    pub sha256: String,
    /// The `kvgate:policy` version it was built against.
    pub wit: &'static str,
}

/// One slot as `GET /admin/plugins` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PluginStatus {
    pub kind: PluginKind,
    pub file: String,
    /// `plugin` when a component serves, else `builtin`.
    pub serving: &'static str,
    pub fallback: &'static str,
    pub name: Option<String>,
    pub version: Option<String>,
    pub sha256: Option<String>,
    /// The `kvgate:policy` version the component was built against.
    pub wit: Option<&'static str>,
    pub loaded_at_ms: Option<u64>,
    pub calls: u64,
    pub traps: u64,
    pub timeouts: u64,
    pub memory_exceeded: u64,
    pub invalid_answers: u64,
    pub p99_call_us: Option<u32>,
    pub fallbacks: u64,
    pub rollbacks: u64,
    pub previous_version: Option<String>,
    pub last_rejected: Option<String>,
}

/// The policy host: the runtime and the three slots.
pub struct Policies {
    runtime: Runtime,
    slots: [Slot; 3],
    options: PolicyOptions,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Policies {
    /// Starts the runtime and loads whatever the directory holds (creating it if missing).
    pub fn start(options: PolicyOptions) -> anyhow::Result<Arc<Self>> {
        std::fs::create_dir_all(&options.dir)
            .map_err(|e| anyhow::anyhow!("cannot create the plugins directory {}: {e}", options.dir.display()))?;
        let runtime = Runtime::new(Limits { timeout: options.timeout, memory_bytes: options.memory_bytes })?;
        let slot = |kind| Slot {
            kind,
            current: ArcSwapOption::empty(),
            previous: Mutex::new(None),
            failures_in_a_row: AtomicU32::new(0),
            rejected: Mutex::new(None),
            rollbacks: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
            reloading: Mutex::new(()),
        };
        let slots = [slot(PluginKind::Chunker), slot(PluginKind::Selector), slot(PluginKind::Evictor)];
        let p = Arc::new(Self { runtime, slots, options });
        for o in p.reload() {
            match o.outcome {
                "loaded" => {
                    tracing::info!(
                        kind = o.kind.as_str(),
                        name = o.name.as_deref().unwrap_or_default(),
                        version = o.version.as_deref().unwrap_or_default(),
                        "plugin loaded"
                    )
                }
                "rejected" => {
                    tracing::error!(
                        kind = o.kind.as_str(),
                        error = o.error.as_deref().unwrap_or_default(),
                        "plugin rejected; using the built-in policy"
                    )
                }
                _ => tracing::info!(kind = o.kind.as_str(), "no plugin; using the built-in policy"),
            }
        }
        Ok(p)
    }

    pub fn dir(&self) -> &Path {
        &self.options.dir
    }

    fn slot(&self, kind: PluginKind) -> &Slot {
        &self.slots[kind as usize]
    }

    /// Checks a component file offline: which world it implements, its info, self-test and
    /// canned check. Nothing is loaded anywhere.
    pub fn check_file(path: &Path, timeout: Duration, memory_bytes: usize) -> Result<CheckedComponent, LoadError> {
        let bytes =
            std::fs::read(path).map_err(|source| LoadError::Read { path: path.display().to_string(), source })?;
        let runtime = Runtime::new(Limits { timeout, memory_bytes }).map_err(|e| LoadError::Compile(e.to_string()))?;
        let c = runtime.load(&bytes, None)?;
        Ok(CheckedComponent { kind: c.kind, name: c.name, version: c.version, sha256: c.sha256, wit: c.wit })
    }

    /// Re-reads the directory: each kind's file is loaded if it changed, and swapped in only
    /// if it passes every check. A removed file returns the slot to the built-in policy.
    pub fn reload(&self) -> Vec<ReloadOutcome> {
        PluginKind::ALL.iter().map(|&k| self.reload_kind(k)).collect()
    }

    fn reload_kind(&self, kind: PluginKind) -> ReloadOutcome {
        let slot = self.slot(kind);
        let _one_at_a_time = slot.reloading.lock().unwrap();
        let path = self.options.dir.join(kind.file_name());
        let outcome = |outcome, plugin: Option<&Plugin>, error| ReloadOutcome {
            kind,
            outcome,
            name: plugin.map(|p| p.component.name.clone()),
            version: plugin.map(|p| p.component.version.clone()),
            error,
        };
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return match slot.current.swap(None) {
                    Some(old) => {
                        *slot.previous.lock().unwrap() = Some(old);
                        tracing::info!(kind = kind.as_str(), "plugin file removed; using the built-in policy");
                        outcome("removed", None, None)
                    }
                    None => outcome("absent", None, None),
                };
            }
            Err(e) => return outcome("rejected", None, Some(format!("cannot read {}: {e}", path.display()))),
        };
        let sha: String = {
            use sha2::{Digest, Sha256};
            Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
        };
        if let Some(cur) = slot.current.load_full().filter(|c| c.component.sha256 == sha) {
            return outcome("unchanged", Some(&cur), None);
        }
        if let Some((_, why)) = slot.rejected.lock().unwrap().clone().filter(|(s, _)| *s == sha) {
            return outcome("rejected", None, Some(why));
        }
        match self.runtime.load(&bytes, Some(kind)) {
            Ok(component) => {
                let plugin = Arc::new(Plugin { component, loaded_at_ms: now_ms(), stats: PluginStats::default() });
                let old = slot.current.swap(Some(plugin.clone()));
                if old.is_some() {
                    *slot.previous.lock().unwrap() = old;
                }
                slot.failures_in_a_row.store(0, Ordering::Relaxed);
                *slot.rejected.lock().unwrap() = None;
                tracing::info!(kind = kind.as_str(), name = %plugin.component.name, version = %plugin.component.version, "plugin swapped in");
                outcome("loaded", Some(&plugin), None)
            }
            Err(e) => {
                let why = e.to_string();
                tracing::error!(kind = kind.as_str(), file = %path.display(), error = %why, "plugin rejected; the serving version stays");
                *slot.rejected.lock().unwrap() = Some((sha, why.clone()));
                outcome("rejected", None, Some(why))
            }
        }
    }

    /// Every slot's state and counters.
    pub fn status(&self) -> Vec<PluginStatus> {
        self.slots
            .iter()
            .map(|s| {
                let cur = s.current.load_full();
                let st = cur.as_ref().map(|p| &p.stats);
                let count = |f: fn(&PluginStats) -> &AtomicU64| st.map_or(0, |s| f(s).load(Ordering::Relaxed));
                let p99 = st.and_then(|s| {
                    let mut v: Vec<u32> = s.latencies.lock().unwrap().iter().copied().collect();
                    v.sort_unstable();
                    (!v.is_empty()).then(|| v[(v.len() * 99 / 100).min(v.len() - 1)])
                });
                PluginStatus {
                    kind: s.kind,
                    file: self.options.dir.join(s.kind.file_name()).display().to_string(),
                    serving: if cur.is_some() { "plugin" } else { "builtin" },
                    fallback: s.kind.fallback(),
                    name: cur.as_ref().map(|p| p.component.name.clone()),
                    version: cur.as_ref().map(|p| p.component.version.clone()),
                    sha256: cur.as_ref().map(|p| p.component.sha256.clone()),
                    wit: cur.as_ref().map(|p| p.component.wit),
                    loaded_at_ms: cur.as_ref().map(|p| p.loaded_at_ms),
                    calls: count(|s| &s.calls),
                    traps: count(|s| &s.traps),
                    timeouts: count(|s| &s.timeouts),
                    memory_exceeded: count(|s| &s.memory),
                    invalid_answers: count(|s| &s.invalid),
                    p99_call_us: p99,
                    fallbacks: s.fallbacks.load(Ordering::Relaxed),
                    rollbacks: s.rollbacks.load(Ordering::Relaxed),
                    previous_version: s.previous.lock().unwrap().as_ref().map(|p| p.component.version.clone()),
                    last_rejected: s.rejected.lock().unwrap().as_ref().map(|(_, why)| why.clone()),
                }
            })
            .collect()
    }

    /// Prometheus text for the plugins.
    pub fn metrics(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let status = self.status();
        let mut family = |name: &str, help: &str, f: &dyn Fn(&PluginStatus) -> u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for s in &status {
                let _ = writeln!(out, "{name}{{kind=\"{}\"}} {}", s.kind.as_str(), f(s));
            }
        };
        family("kvgate:plugin_calls_total", "Calls into the serving plugin version.", &|s| s.calls);
        family("kvgate:plugin_traps_total", "Plugin calls that trapped.", &|s| s.traps);
        family("kvgate:plugin_timeouts_total", "Plugin calls stopped at the time limit.", &|s| s.timeouts);
        family("kvgate:plugin_memory_exceeded_total", "Plugin calls stopped at the memory limit.", &|s| {
            s.memory_exceeded
        });
        family("kvgate:plugin_invalid_answers_total", "Plugin answers that failed validation.", &|s| s.invalid_answers);
        family("kvgate:plugin_fallbacks_total", "Calls answered by the built-in fallback after a failure.", &|s| {
            s.fallbacks
        });
        family("kvgate:plugin_rollbacks_total", "Rollbacks to a previous version after repeated failures.", &|s| {
            s.rollbacks
        });
        out
    }

    /// The chunker and selector versions serving now, fixed for one request.
    pub fn for_request(self: &Arc<Self>, chunk_head_tokens: usize) -> RequestPolicy {
        RequestPolicy {
            policies: self.clone(),
            chunker: self.slot(PluginKind::Chunker).current.load_full(),
            selector: self.slot(PluginKind::Selector).current.load_full(),
            builtin: blend::BuiltinPolicy { chunk_head_tokens },
        }
    }

    /// Runs one call of `plugin`, validates the answer, keeps the counters, and rolls the slot
    /// back after repeated failures. `None`: use the fallback.
    fn call<T>(
        &self,
        plugin: &Arc<Plugin>,
        run: impl FnOnce(&Runtime, &LoadedComponent) -> Result<T, CallError>,
        validate: impl FnOnce(&T) -> Result<(), String>,
    ) -> Option<T> {
        let slot = self.slot(plugin.component.kind);
        let st = &plugin.stats;
        st.calls.fetch_add(1, Ordering::Relaxed);
        let (answer, took) = runtime::timed(|| run(&self.runtime, &plugin.component));
        {
            let mut l = st.latencies.lock().unwrap();
            if l.len() == LATENCY_WINDOW {
                l.pop_front();
            }
            l.push_back(took.as_micros().min(u32::MAX as u128) as u32);
        }
        let answer = answer.and_then(|a| validate(&a).map(|()| a).map_err(CallError::Invalid));
        match answer {
            Ok(a) => {
                slot.failures_in_a_row.store(0, Ordering::Relaxed);
                Some(a)
            }
            Err(e) => {
                match &e {
                    CallError::Timeout => &st.timeouts,
                    CallError::Memory => &st.memory,
                    CallError::Trap(_) => &st.traps,
                    CallError::Invalid(_) => &st.invalid,
                }
                .fetch_add(1, Ordering::Relaxed);
                slot.fallbacks.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    kind = slot.kind.as_str(), plugin = %plugin.component.name, error = %e,
                    "plugin call failed; {} for this call", slot.kind.fallback()
                );
                if slot.failures_in_a_row.fetch_add(1, Ordering::Relaxed) + 1 >= ROLLBACK_AFTER {
                    self.roll_back(slot, plugin, &e);
                }
                None
            }
        }
    }

    fn roll_back(&self, slot: &Slot, failing: &Arc<Plugin>, why: &CallError) {
        let _one_at_a_time = slot.reloading.lock().unwrap();
        let is_current = slot.current.load().as_ref().is_some_and(|c| Arc::ptr_eq(c, failing));
        if !is_current {
            return; // already replaced
        }
        let previous = slot.previous.lock().unwrap().take();
        tracing::error!(
            kind = slot.kind.as_str(), failing = %failing.component.version,
            back_to = ?previous.as_ref().map(|p| p.component.version.clone()),
            "plugin failed {ROLLBACK_AFTER} calls in a row ({why}); rolling back"
        );
        slot.current.store(previous);
        slot.failures_in_a_row.store(0, Ordering::Relaxed);
        slot.rollbacks.fetch_add(1, Ordering::Relaxed);
        *slot.rejected.lock().unwrap() =
            Some((failing.component.sha256.clone(), format!("rolled back after {ROLLBACK_AFTER} failed calls: {why}")));
    }

    /// The evictor seam for the store: the plugin when one serves, else least recently used.
    pub fn evictor(self: &Arc<Self>) -> Arc<dyn Evictor> {
        Arc::new(PluginEvictor { policies: self.clone() })
    }
}

/// Checks a component's answer on a canned request of its kind (part of loading).
fn canned_check(rt: &Runtime, c: &LoadedComponent) -> Result<(), CallError> {
    match c.kind {
        PluginKind::Chunker => {
            let n = 300u32;
            let mut text = String::new();
            let mut offsets = Vec::new();
            for i in 0..n {
                offsets.push(text.len() as u32);
                text.push_str(if i % 50 == 49 { "\n\n" } else { " tok" });
            }
            let req = ChunkRequest {
                tokens: (0..n).map(|i| (i * 7919) % 49152).collect(),
                offsets,
                text,
                segment_starts: vec![0, 100],
                target_tokens: 64,
            };
            let cuts = rt.cut(c, &req)?;
            validate_cuts(&cuts, n as usize).map_err(CallError::Invalid)
        }
        PluginKind::Selector => {
            let n = 60u32;
            let req = SelectRequest {
                deviations: (0..n).map(|i| ((i * 37) % 11) as f32).collect(),
                positions: (100..100 + n).collect(),
                chunk_starts: vec![0, 20, 45],
                attention: (0..n).map(|i| ((i * 13) % 7) as f32 / 100.0).collect(),
                budget: 10,
            };
            let sel = rt.select(c, &req)?;
            crate::blend::select::validate(&sel, n as usize, 10).map_err(CallError::Invalid)
        }
        PluginKind::Evictor => {
            let cands: Vec<Candidate> = (0..8)
                .map(|i| Candidate {
                    bytes: 1000,
                    tokens: 10,
                    created_ms: 1_000 + i,
                    last_access_ms: 2_000 + i * 10,
                    hits: i as u32 % 3,
                    cost_us: 500 * (i + 1),
                })
                .collect();
            let req = evict_request(&cands, 3000, 10_000);
            let v = rt.victims(c, &req)?;
            validate_victims(&v, &cands, 3000).map_err(CallError::Invalid)
        }
    }
}

/// Cut points: strictly ascending, each in `1..n`.
pub fn validate_cuts(cuts: &[u32], n: usize) -> Result<(), String> {
    let mut last = 0;
    for &c in cuts {
        if c as usize >= n || c == 0 {
            return Err(format!("cut point {c} outside 1..{n}"));
        }
        if c <= last {
            return Err(format!("cut points not strictly ascending ({last} then {c})"));
        }
        last = c;
    }
    Ok(())
}

/// Victims: in range, no repeats, freeing at least `to_free` bytes (or every candidate).
pub fn validate_victims(v: &[u32], cands: &[Candidate], to_free: u64) -> Result<(), String> {
    let mut seen = vec![false; cands.len()];
    let mut freed = 0;
    for &i in v {
        let slot = seen.get_mut(i as usize).ok_or_else(|| format!("victim {i} out of {} candidates", cands.len()))?;
        if std::mem::replace(slot, true) {
            return Err(format!("victim {i} named twice"));
        }
        freed += cands[i as usize].bytes;
    }
    if freed < to_free && v.len() < cands.len() {
        return Err(format!("victims free {freed} bytes, {to_free} needed"));
    }
    Ok(())
}

fn evict_request(cands: &[Candidate], to_free: u64, now_ms: u64) -> EvictRequest {
    EvictRequest {
        candidates: cands
            .iter()
            .map(|c| runtime::WitCandidate {
                bytes: c.bytes,
                tokens: c.tokens,
                created_ms: c.created_ms,
                last_access_ms: c.last_access_ms,
                hits: c.hits,
                cost_us: c.cost_us,
            })
            .collect(),
        bytes_to_free: to_free,
        now_ms,
    }
}

/// The policies one request runs with: the versions serving when it started.
pub struct RequestPolicy {
    policies: Arc<Policies>,
    chunker: Option<Arc<Plugin>>,
    selector: Option<Arc<Plugin>>,
    builtin: blend::BuiltinPolicy,
}

impl Policy for RequestPolicy {
    fn cut(&self, input: &CutInput) -> Vec<Range<usize>> {
        let Some(plugin) = &self.chunker else { return self.builtin.cut(input) };
        let n = input.ids.len();
        let req = ChunkRequest {
            tokens: input.ids.to_vec(),
            offsets: input.offsets.to_vec(),
            text: input.text.to_string(),
            segment_starts: input.segment_starts.iter().map(|&s| s as u32).collect(),
            target_tokens: input.chunk_tokens as u32,
        };
        match self.policies.call(plugin, |rt, c| rt.cut(c, &req), |cuts| validate_cuts(cuts, n)) {
            Some(cuts) => {
                // The host cuts at every segment start whatever the plugin said.
                let mut bounds: Vec<usize> = cuts.iter().map(|&c| c as usize).collect();
                bounds.extend(input.segment_starts.iter().copied().filter(|&s| s > 0 && s < n));
                bounds.push(0);
                bounds.push(n);
                bounds.sort_unstable();
                bounds.dedup();
                bounds.windows(2).map(|w| w[0]..w[1]).collect()
            }
            None => blend::chunk::fixed_cuts(n, input.segment_starts, input.chunk_tokens),
        }
    }

    fn select(&self, input: &SelectInput) -> Vec<u32> {
        let Some(plugin) = &self.selector else { return self.builtin.select(input) };
        let n = input.deviations.len();
        let req = SelectRequest {
            deviations: input.deviations.to_vec(),
            positions: input.positions.to_vec(),
            chunk_starts: input.chunk_starts.to_vec(),
            attention: input.attention.to_vec(),
            budget: input.budget as u32,
        };
        let valid = |sel: &Vec<u32>| blend::select::validate(sel, n, input.budget);
        match self.policies.call(plugin, |rt, c| rt.select(c, &req), valid) {
            Some(sel) => {
                let mut sel = sel;
                sel.sort_unstable();
                sel
            }
            // The safe choice: recompute every reused token (exactly what `off` computes).
            None => (0..n as u32).collect(),
        }
    }
}

/// The store's eviction seam, answered by the evictor plugin when one serves.
struct PluginEvictor {
    policies: Arc<Policies>,
}

impl Evictor for PluginEvictor {
    fn victims(&self, candidates: &[Candidate], bytes_to_free: u64, now_ms: u64) -> Vec<u32> {
        let slot = self.policies.slot(PluginKind::Evictor);
        let Some(plugin) = slot.current.load_full() else {
            return LeastRecentlyUsed.victims(candidates, bytes_to_free, now_ms);
        };
        let req = evict_request(candidates, bytes_to_free, now_ms);
        let valid = |v: &Vec<u32>| validate_victims(v, candidates, bytes_to_free);
        self.policies
            .call(&plugin, |rt, c| rt.victims(c, &req), valid)
            .unwrap_or_else(|| LeastRecentlyUsed.victims(candidates, bytes_to_free, now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_points_must_be_inside_and_ascending() {
        assert!(validate_cuts(&[1, 5, 9], 10).is_ok());
        assert!(validate_cuts(&[], 10).is_ok());
        assert!(validate_cuts(&[0, 5], 10).unwrap_err().contains("outside"));
        assert!(validate_cuts(&[5, 10], 10).unwrap_err().contains("outside"));
        assert!(validate_cuts(&[5, 5], 10).unwrap_err().contains("ascending"));
        assert!(validate_cuts(&[6, 5], 10).is_err());
    }

    #[test]
    fn victims_must_be_unique_in_range_and_enough() {
        let c = |bytes| Candidate { bytes, tokens: 1, created_ms: 0, last_access_ms: 0, hits: 0, cost_us: 0 };
        let cands = [c(10), c(20), c(30)];
        assert!(validate_victims(&[2], &cands, 25).is_ok());
        assert!(validate_victims(&[0], &cands, 25).unwrap_err().contains("free 10"));
        assert!(validate_victims(&[0, 1, 2], &cands, 1000).is_ok(), "everything is all there is");
        assert!(validate_victims(&[3], &cands, 1).unwrap_err().contains("out of"));
        assert!(validate_victims(&[1, 1], &cands, 1).unwrap_err().contains("twice"));
    }
}
