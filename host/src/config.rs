//! Configuration: `kvgate.toml`, overridden by environment variables, overridden by flags.
//!
//! Precedence, lowest first: built-in defaults < the TOML file (`--config`, `KVGATE_CONFIG`)
//! < `KVGATE_*` environment variables < command-line flags. clap merges the last two (a flag
//! beats its variable); [`Config::apply`] lays the result over the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::blend::{BlendOptions, CacheMode};
use crate::scheduler::SchedulerOptions;
use crate::store::{KvDtype, RemoteOptions, StoreOptions};

/// Errors reading the configuration: each says which file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid setting `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

/// Everything `kvgate serve` can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on; port 0 picks a free port (printed at start).
    pub listen: SocketAddr,
    /// The GGUF model to serve.
    pub model: PathBuf,
    /// The name clients use in `model`; defaults to the file stem.
    pub model_name: Option<String>,
    /// Inference threads; 0 = one per core.
    pub threads: usize,
    /// Requests that may wait for admission; beyond it requests get 429.
    pub queue_capacity: usize,
    /// Requests running at once (prefilling or decoding); their decode steps share one batch.
    pub max_running: usize,
    /// KV bytes the running requests may hold; beyond it requests wait for admission.
    #[serde(deserialize_with = "bytes_setting")]
    pub kv_budget_bytes: u64,
    /// Tokens of prefill per scheduler turn, between decode steps (0: whole prompts at once).
    pub prefill_chunk_tokens: usize,
    /// Largest request body, bytes; beyond it requests get 413.
    pub max_body_bytes: usize,
    /// Log filter (`tracing` syntax), unless `RUST_LOG` is set.
    pub log: String,
    /// Cache mode of requests that do not choose one (`off`, `prefix`, `compose`).
    pub cache_mode: CacheMode,
    /// Share of reused tokens recomputed when stitching chunks, 0..=1.
    pub recompute_budget: f32,
    /// CacheBlend's gradual filtering: the check layer recomputes this many times the tokens
    /// the last layer does, narrowed layer by layer to the most read and the most deviating
    /// (>= 1; 1: none).
    pub recompute_taper: f32,
    /// Tokens per chunk of the built-in chunker.
    pub chunk_tokens: usize,
    /// Layer at which KV deviation is measured for selective recompute.
    pub check_layer: usize,
    /// Tokens at the head of each reused chunk always recomputed (EPIC-style), within the budget.
    pub chunk_head_tokens: usize,
    /// Shortest run of tokens compose mode reuses from inside a stored chunk (at least 8).
    pub min_span: usize,
    /// Byte budget of the chunk store's RAM tier (a number, or `512MiB`, `2GiB`, …).
    #[serde(deserialize_with = "bytes_setting")]
    pub ram_budget_bytes: u64,
    /// Directory of the chunk store's disk tier (sled index + segment files).
    pub data_dir: PathBuf,
    /// Byte budget of the disk tier; 0 turns the disk tier off.
    #[serde(deserialize_with = "bytes_setting")]
    pub disk_budget_bytes: u64,
    /// The fleet's shared chunk tier: `redis://[user:password@]host:port[/db]` (none: this
    /// node's tiers only).
    pub remote_url: Option<String>,
    /// Longest a request waits on the shared tier before serving without it, milliseconds.
    pub remote_timeout_ms: u64,
    /// Element type of stored K/V: `f32`, `f16` (half the bytes) or `bf16`.
    pub kv_dtype: KvDtype,
    /// Element type of prefix-mode chunks: `f32` keeps prefix reuse exact; `f16` rounds it as
    /// production servers do (the floor `kvgate bench rag` compares against).
    pub prefix_kv_dtype: KvDtype,
    /// When set, `/admin/` endpoints need `Authorization: Bearer <admin_token>`.
    pub admin_token: Option<String>,
    /// Directory of the policy components (`chunker.wasm`, `selector.wasm`, `evictor.wasm`).
    pub plugins_dir: PathBuf,
    /// Reload plugins when the directory changes.
    pub watch_plugins: bool,
    /// Longest one plugin call may run, milliseconds.
    pub plugin_timeout_ms: u64,
    /// Most memory a plugin may grow to.
    #[serde(deserialize_with = "bytes_setting")]
    pub plugin_memory_bytes: u64,
    /// API keys of the `default` tenant (`--api-key`, repeatable). With no key configured
    /// anywhere the API is open (one warning at start).
    pub api_keys: Vec<String>,
    /// Keys with their tenants and limits (`[[api_key]]`).
    #[serde(rename = "api_key")]
    pub api_key_entries: Vec<ApiKeyConfig>,
    /// A TOML file of hashed keys (`[[api_key]]` with `sha256` instead of `key`), reloaded
    /// when it changes.
    pub api_keys_file: Option<PathBuf>,
    /// Chunk-store namespaces shared by several tenants (`[[shared_namespace]]`).
    #[serde(rename = "shared_namespace")]
    pub shared_namespaces: Vec<SharedNamespaceConfig>,
    /// Share of each chunk-store tier one namespace (tenant) may fill, 0 < share <= 1.
    pub namespace_share: f64,
    /// Requests one key may have in flight (0: no limit); a key's own setting wins.
    pub key_max_concurrent: usize,
    /// Requests one key may start per minute (0: no limit); a key's own setting wins.
    pub key_requests_per_minute: u32,
    /// Longest prompt accepted, tokens (0: the context).
    pub max_prompt_tokens: usize,
    /// Most tokens one request may generate (0: the rest of the context).
    pub max_completion_tokens: usize,
    /// Longest a request may run, seconds, before it is cut off with a 504 (0: no limit).
    pub request_timeout_secs: u64,
    /// `/health`, `/ready` and `/metrics` answer without an API key.
    pub public_health: bool,
    /// `text` or `json` (one JSON object per line).
    pub log_format: LogFormat,
    /// OpenAI-compatible servers that requests for other models are passed to (`[[upstream]]`).
    #[serde(rename = "upstream")]
    pub upstreams: Vec<UpstreamConfig>,
    /// This node's name in a fleet: on the shared tier's event stream and to routers. Default:
    /// `<hostname>:<port>` (stable across restarts, so a router keeps what it learnt).
    pub node_id: Option<String>,
    /// `kvgate route`: the nodes it spreads requests over, and how (`[router]`).
    pub router: RouterConfig,
}

/// How `kvgate route` chooses a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RoutePolicy {
    /// The node expected to answer first: the tokens it can reuse from its RAM and disk
    /// (learnt from the shared tier's event stream) against the work queued on it.
    #[default]
    CacheAware,
    /// Each node in turn (nodes that are down are skipped).
    RoundRobin,
}

/// `[router]`: the settings of `kvgate route`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterConfig {
    /// Base URLs of the kvgate nodes, e.g. `http://10.0.0.5:8080`.
    pub nodes: Vec<String>,
    pub policy: RoutePolicy,
    /// Imbalance override (SGLang's router's rule): when the busiest node has more than this
    /// many requests in flight beyond the idlest...
    pub balance_abs_threshold: usize,
    /// ...and more than this many times the idlest's, requests go to the idlest node.
    pub balance_rel_threshold: f64,
    /// How often each node's `/v1/kvgate/node` is asked for its queue and health, ms.
    pub poll_ms: u64,
    /// A node that does not answer its poll (or a connection) within this is skipped, ms.
    pub node_timeout_ms: u64,
    /// What reading a token's KV from the shared tier costs against computing it (0..1):
    /// weighs a node holding a chunk locally against one that would fetch it from Redis.
    pub fetch_cost: f64,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            nodes: Vec::new(),
            policy: RoutePolicy::CacheAware,
            balance_abs_threshold: 2,
            balance_rel_threshold: 1.5,
            poll_ms: 250,
            node_timeout_ms: 1000,
            fetch_cost: 0.05,
        }
    }
}

/// One API key and whose it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// The key itself (config) — or, in a keys file, `sha256`, its hash in hex.
    pub key: Option<String>,
    pub sha256: Option<String>,
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// Overrides `key_max_concurrent`.
    pub max_concurrent: Option<usize>,
    /// Overrides `key_requests_per_minute`.
    pub requests_per_minute: Option<u32>,
}

fn default_tenant() -> String {
    "default".into()
}

/// A namespace of the chunk store that several tenants read (and may write, with
/// `"kvgate": {"namespace": NAME}`): a public corpus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedNamespaceConfig {
    pub name: String,
    /// Tenants that use it; `["*"]`: every tenant.
    pub tenants: Vec<String>,
}

/// An upstream OpenAI-compatible server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    /// Base URL, e.g. `http://host:8000/v1` (`/v1/chat/completions` goes to
    /// `<url>/chat/completions`). Plain HTTP.
    pub url: String,
    /// Model ids it serves; `["*"]` takes every model nothing else serves.
    pub models: Vec<String>,
    /// Sent as `Authorization: Bearer` (clients' keys are never passed on).
    pub api_key: Option<String>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// Longest wait for the response to start, and between two pieces of its body.
    #[serde(default = "default_upstream_timeout")]
    pub timeout_secs: u64,
}

fn default_connect_timeout() -> u64 {
    2000
}

fn default_upstream_timeout() -> u64 {
    60
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Whether `name` can name a tenant or a namespace: 1–64 of `A-Za-z0-9._-`.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            model: default_model_path(),
            model_name: None,
            threads: 0,
            queue_capacity: 64,
            max_running: SchedulerOptions::default().max_running,
            kv_budget_bytes: SchedulerOptions::default().kv_budget_bytes,
            prefill_chunk_tokens: SchedulerOptions::default().prefill_chunk_tokens,
            max_body_bytes: 8 << 20,
            log: "info".into(),
            cache_mode: CacheMode::Compose,
            recompute_budget: BlendOptions::default().recompute_budget,
            recompute_taper: BlendOptions::default().recompute_taper,
            chunk_tokens: BlendOptions::default().chunk_tokens,
            check_layer: BlendOptions::default().check_layer,
            chunk_head_tokens: BlendOptions::default().chunk_head_tokens,
            min_span: BlendOptions::default().min_span,
            ram_budget_bytes: 2 << 30,
            data_dir: PathBuf::from("data"),
            disk_budget_bytes: 16 << 30,
            remote_url: None,
            remote_timeout_ms: RemoteOptions::default().timeout.as_millis() as u64,
            kv_dtype: KvDtype::F16,
            prefix_kv_dtype: KvDtype::F32,
            admin_token: None,
            plugins_dir: kvgate_home().join("plugins"),
            watch_plugins: true,
            plugin_timeout_ms: 50,
            plugin_memory_bytes: 64 << 20,
            api_keys: Vec::new(),
            api_key_entries: Vec::new(),
            api_keys_file: None,
            shared_namespaces: Vec::new(),
            namespace_share: 1.0,
            key_max_concurrent: 0,
            key_requests_per_minute: 0,
            max_prompt_tokens: 0,
            max_completion_tokens: 0,
            request_timeout_secs: 0,
            public_health: true,
            log_format: LogFormat::Text,
            upstreams: Vec::new(),
            node_id: None,
            router: RouterConfig::default(),
        }
    }
}

/// Reads a byte size: a whole number, or a number with a unit (`k`/`KiB`, `M`/`MiB`,
/// `G`/`GiB`, `T`/`TiB`, binary either way; `B` optional).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_lowercase().trim_end_matches('b').trim_end_matches('i') {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return Err(format!("`{text}` is not a byte size (e.g. 1048576, 512MiB, 2GiB)")),
    };
    let n: f64 = num.parse().map_err(|_| format!("`{text}` is not a byte size (e.g. 1048576, 512MiB, 2GiB)"))?;
    Ok((n * scale as f64) as u64)
}

fn bytes_setting<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Number(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Number(n) => Ok(n),
        Size::Text(t) => parse_bytes(&t).map_err(serde::de::Error::custom),
    }
}

/// Where `make model` puts the embedded default model: `$KVGATE_HOME/models/…`, with
/// `KVGATE_HOME` defaulting to `~/.cache/kvgate`.
pub fn default_model_path() -> PathBuf {
    kvgate_home().join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// kvgate's cache directory (models, build output): `$KVGATE_HOME` or `~/.cache/kvgate`.
pub fn kvgate_home() -> PathBuf {
    if let Some(h) = std::env::var_os("KVGATE_HOME") {
        return PathBuf::from(h);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("."));
    cache.join("kvgate")
}

/// Settings given on the command line or in the environment; `None` = not given.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub model: Option<PathBuf>,
    pub model_name: Option<String>,
    pub threads: Option<usize>,
    pub queue_capacity: Option<usize>,
    pub max_running: Option<usize>,
    pub kv_budget_bytes: Option<u64>,
    pub prefill_chunk_tokens: Option<usize>,
    pub max_body_bytes: Option<usize>,
    pub log: Option<String>,
    pub cache_mode: Option<CacheMode>,
    pub recompute_budget: Option<f32>,
    pub recompute_taper: Option<f32>,
    pub min_span: Option<usize>,
    pub check_layer: Option<usize>,
    pub ram_budget_bytes: Option<u64>,
    pub data_dir: Option<PathBuf>,
    pub disk_budget_bytes: Option<u64>,
    pub remote_url: Option<String>,
    pub remote_timeout_ms: Option<u64>,
    pub kv_dtype: Option<KvDtype>,
    pub prefix_kv_dtype: Option<KvDtype>,
    pub admin_token: Option<String>,
    pub plugins_dir: Option<PathBuf>,
    pub watch_plugins: Option<bool>,
    pub plugin_timeout_ms: Option<u64>,
    pub plugin_memory_bytes: Option<u64>,
    /// Added to the file's keys.
    pub api_keys: Vec<String>,
    pub api_keys_file: Option<PathBuf>,
    pub namespace_share: Option<f64>,
    pub key_max_concurrent: Option<usize>,
    pub key_requests_per_minute: Option<u32>,
    pub max_prompt_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub request_timeout_secs: Option<u64>,
    pub log_format: Option<LogFormat>,
    pub node_id: Option<String>,
    /// Replace the file's `[router] nodes` when not empty.
    pub router_nodes: Vec<String>,
    pub route_policy: Option<RoutePolicy>,
}

impl Config {
    /// The scheduler's options from these settings (`layers`: the model's, which turns tokens
    /// of prefill into the token-layers the scheduler counts).
    pub fn scheduler_options(&self) -> SchedulerOptions {
        SchedulerOptions {
            queue_capacity: self.queue_capacity,
            cache_mode: self.cache_mode,
            blend: BlendOptions {
                chunk_tokens: self.chunk_tokens,
                recompute_budget: self.recompute_budget,
                recompute_taper: self.recompute_taper,
                check_layer: self.check_layer,
                chunk_head_tokens: self.chunk_head_tokens,
                min_span: self.min_span,
            },
            max_running: self.max_running,
            kv_budget_bytes: self.kv_budget_bytes,
            reserve_tokens: SchedulerOptions::default().reserve_tokens,
            prefill_chunk_tokens: self.prefill_chunk_tokens,
        }
    }

    /// The policy host's options from these settings.
    pub fn policy_options(&self) -> crate::policy::PolicyOptions {
        crate::policy::PolicyOptions {
            dir: self.plugins_dir.clone(),
            timeout: std::time::Duration::from_millis(self.plugin_timeout_ms),
            memory_bytes: self.plugin_memory_bytes as usize,
        }
    }

    /// The chunk store's options from these settings.
    /// This node's name in a fleet: `node_id`, else `<hostname>:<port>`.
    pub fn node_name(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .or_else(|| std::env::var("HOSTNAME").ok())
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "localhost".into());
            format!("{host}:{}", self.listen.port())
        })
    }

    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            ram_budget_bytes: self.ram_budget_bytes,
            data_dir: (self.disk_budget_bytes > 0).then(|| self.data_dir.clone()),
            disk_budget_bytes: self.disk_budget_bytes,
            dtype: self.kv_dtype,
            prefix_dtype: self.prefix_kv_dtype,
            min_span: self.min_span,
            namespace_share: self.namespace_share,
            remote: self.remote_url.as_ref().map(|url| RemoteOptions {
                url: url.clone(),
                timeout: Duration::from_millis(self.remote_timeout_ms),
                node: self.node_name(),
                ..RemoteOptions::default()
            }),
            ..StoreOptions::default()
        }
    }

    /// Reads `path`, or the defaults when `None`.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else { return Ok(Self::default()) };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })
    }

    /// Lays flags and environment over the file's settings, then checks the result.
    pub fn apply(mut self, o: Overrides) -> Result<Self, ConfigError> {
        if let Some(v) = o.listen {
            self.listen = v;
        }
        if let Some(v) = o.model {
            self.model = v;
        }
        if o.model_name.is_some() {
            self.model_name = o.model_name;
        }
        if let Some(v) = o.threads {
            self.threads = v;
        }
        if let Some(v) = o.queue_capacity {
            self.queue_capacity = v;
        }
        if let Some(v) = o.max_running {
            self.max_running = v;
        }
        if let Some(v) = o.kv_budget_bytes {
            self.kv_budget_bytes = v;
        }
        if let Some(v) = o.prefill_chunk_tokens {
            self.prefill_chunk_tokens = v;
        }
        if let Some(v) = o.max_body_bytes {
            self.max_body_bytes = v;
        }
        if let Some(v) = o.log {
            self.log = v;
        }
        if let Some(v) = o.cache_mode {
            self.cache_mode = v;
        }
        if let Some(v) = o.recompute_budget {
            self.recompute_budget = v;
        }
        if let Some(v) = o.recompute_taper {
            self.recompute_taper = v;
        }
        if let Some(v) = o.min_span {
            self.min_span = v;
        }
        if let Some(v) = o.check_layer {
            self.check_layer = v;
        }
        if let Some(v) = o.ram_budget_bytes {
            self.ram_budget_bytes = v;
        }
        if let Some(v) = o.data_dir {
            self.data_dir = v;
        }
        if let Some(v) = o.disk_budget_bytes {
            self.disk_budget_bytes = v;
        }
        if let Some(v) = o.remote_url {
            self.remote_url = Some(v);
        }
        if let Some(v) = o.remote_timeout_ms {
            self.remote_timeout_ms = v;
        }
        if let Some(v) = o.kv_dtype {
            self.kv_dtype = v;
        }
        if let Some(v) = o.prefix_kv_dtype {
            self.prefix_kv_dtype = v;
        }
        if o.admin_token.is_some() {
            self.admin_token = o.admin_token;
        }
        if let Some(v) = o.plugins_dir {
            self.plugins_dir = v;
        }
        if let Some(v) = o.watch_plugins {
            self.watch_plugins = v;
        }
        if let Some(v) = o.plugin_timeout_ms {
            self.plugin_timeout_ms = v;
        }
        if let Some(v) = o.plugin_memory_bytes {
            self.plugin_memory_bytes = v;
        }
        self.api_keys.extend(o.api_keys);
        if o.api_keys_file.is_some() {
            self.api_keys_file = o.api_keys_file;
        }
        if let Some(v) = o.namespace_share {
            self.namespace_share = v;
        }
        if let Some(v) = o.key_max_concurrent {
            self.key_max_concurrent = v;
        }
        if let Some(v) = o.key_requests_per_minute {
            self.key_requests_per_minute = v;
        }
        if let Some(v) = o.max_prompt_tokens {
            self.max_prompt_tokens = v;
        }
        if let Some(v) = o.max_completion_tokens {
            self.max_completion_tokens = v;
        }
        if let Some(v) = o.request_timeout_secs {
            self.request_timeout_secs = v;
        }
        if let Some(v) = o.log_format {
            self.log_format = v;
        }
        if let Some(v) = o.node_id {
            self.node_id = Some(v);
        }
        if !o.router_nodes.is_empty() {
            self.router.nodes = o.router_nodes;
        }
        if let Some(v) = o.route_policy {
            self.router.policy = v;
        }
        self.check_gateway()?;
        self.check_router()?;
        if self.plugin_timeout_ms == 0 {
            return Err(ConfigError::Invalid { key: "plugin_timeout_ms", message: "must be at least 1".into() });
        }
        if self.plugin_memory_bytes < 1 << 20 {
            return Err(ConfigError::Invalid { key: "plugin_memory_bytes", message: "must be at least 1MiB".into() });
        }
        if self.admin_token.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err(ConfigError::Invalid { key: "admin_token", message: "must not be empty".into() });
        }
        if !(0.0..=1.0).contains(&self.recompute_budget) {
            return Err(ConfigError::Invalid { key: "recompute_budget", message: "must be between 0 and 1".into() });
        }
        if !(self.recompute_taper >= 1.0 && self.recompute_taper.is_finite()) {
            return Err(ConfigError::Invalid {
                key: "recompute_taper",
                message: "must be a number of at least 1 (1: the same tokens at every layer)".into(),
            });
        }
        if let Some(url) = &self.remote_url {
            crate::store::remote::check_url(url)
                .map_err(|message| ConfigError::Invalid { key: "remote_url", message })?;
        }
        if self.remote_timeout_ms == 0 {
            return Err(ConfigError::Invalid { key: "remote_timeout_ms", message: "must be at least 1".into() });
        }
        if self.chunk_tokens == 0 {
            return Err(ConfigError::Invalid { key: "chunk_tokens", message: "must be at least 1".into() });
        }
        if self.min_span < crate::store::span::ANCHOR_TOKENS {
            return Err(ConfigError::Invalid {
                key: "min_span",
                message: format!("must be at least {} tokens", crate::store::span::ANCHOR_TOKENS),
            });
        }
        if self.check_layer == 0 {
            return Err(ConfigError::Invalid {
                key: "check_layer",
                message: "must be at least 1 (layer 0's K/V do not depend on the context: nothing deviates there)"
                    .into(),
            });
        }
        if self.max_running == 0 {
            return Err(ConfigError::Invalid { key: "max_running", message: "must be at least 1".into() });
        }
        if self.kv_budget_bytes < 1 << 20 {
            return Err(ConfigError::Invalid { key: "kv_budget_bytes", message: "must be at least 1MiB".into() });
        }
        if self.queue_capacity == 0 {
            return Err(ConfigError::Invalid { key: "queue_capacity", message: "must be at least 1".into() });
        }
        if self.max_body_bytes < 1024 {
            return Err(ConfigError::Invalid { key: "max_body_bytes", message: "must be at least 1024".into() });
        }
        Ok(self)
    }

    /// Checks the node's name and the router's settings (its nodes are needed only by
    /// `kvgate route`, which checks that there are some).
    fn check_router(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, message: String| Err(ConfigError::Invalid { key, message });
        if let Some(id) = &self.node_id {
            if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_graphic()) {
                return invalid("node_id", "use 1-128 visible ASCII characters".into());
            }
        }
        let r = &self.router;
        for (i, url) in r.nodes.iter().enumerate() {
            if let Err(e) = crate::api::upstream::parse_base_url(url) {
                return invalid("router.nodes", format!("node {} (`{url}`): {e}", i + 1));
            }
            if r.nodes[..i].contains(url) {
                return invalid("router.nodes", format!("`{url}` is listed twice"));
            }
        }
        if r.nodes.len() > crate::fleet::MAX_NODES {
            return invalid("router.nodes", format!("at most {} nodes", crate::fleet::MAX_NODES));
        }
        if !(r.balance_rel_threshold >= 1.0 && r.balance_rel_threshold.is_finite()) {
            return invalid("router.balance_rel_threshold", "must be a number of at least 1".into());
        }
        if r.poll_ms == 0 || r.node_timeout_ms == 0 {
            return invalid("router.poll_ms", "poll_ms and node_timeout_ms must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&r.fetch_cost) {
            return invalid("router.fetch_cost", "must be between 0 and 1".into());
        }
        Ok(())
    }

    /// Checks keys, tenants, shared namespaces and upstreams.
    fn check_gateway(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, message: String| Err(ConfigError::Invalid { key, message });
        if self.api_keys.iter().any(|k| k.trim().is_empty()) {
            return invalid("api_keys", "a key must not be empty".into());
        }
        for (i, k) in self.api_key_entries.iter().enumerate() {
            match (&k.key, &k.sha256) {
                (Some(key), None) if !key.trim().is_empty() => {}
                _ => return invalid("api_key", format!("entry {}: give `key` (a non-empty key)", i + 1)),
            }
            if !valid_name(&k.tenant) {
                return invalid(
                    "api_key",
                    format!("entry {}: tenant `{}`: use 1-64 of A-Z a-z 0-9 . _ -", i + 1, k.tenant),
                );
            }
        }
        let mut keys: Vec<&str> = self.api_keys.iter().map(String::as_str).collect();
        keys.extend(self.api_key_entries.iter().filter_map(|k| k.key.as_deref()));
        keys.sort_unstable();
        if keys.windows(2).any(|w| w[0] == w[1]) {
            return invalid("api_key", "the same key is configured twice".into());
        }
        for ns in &self.shared_namespaces {
            if !valid_name(&ns.name) {
                return invalid("shared_namespace", format!("name `{}`: use 1-64 of A-Z a-z 0-9 . _ -", ns.name));
            }
            if ns.tenants.is_empty() || ns.tenants.iter().any(|t| t != "*" && !valid_name(t)) {
                return invalid("shared_namespace", format!("`{}`: list its tenants, or `*` for all", ns.name));
            }
        }
        if !(self.namespace_share > 0.0 && self.namespace_share <= 1.0) {
            return invalid("namespace_share", "must be above 0 and at most 1".into());
        }
        let mut names: Vec<&str> = Vec::new();
        for u in &self.upstreams {
            if !valid_name(&u.name) || names.contains(&u.name.as_str()) {
                return invalid("upstream", format!("name `{}`: unique, 1-64 of A-Z a-z 0-9 . _ -", u.name));
            }
            names.push(&u.name);
            if let Err(e) = crate::api::upstream::parse_base_url(&u.url) {
                return invalid("upstream", format!("`{}`: url `{}`: {e}", u.name, u.url));
            }
            if u.models.is_empty() || u.models.iter().any(|m| m.trim().is_empty()) {
                return invalid("upstream", format!("`{}`: list the models it serves, or `*`", u.name));
            }
            if u.timeout_secs == 0 || u.connect_timeout_ms == 0 {
                return invalid("upstream", format!("`{}`: timeouts must be at least 1", u.name));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvgate.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:9000\"\nqueue_capacity = 3\n").unwrap();
        let c = Config::load(Some(&path)).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.queue_capacity, 3);
        assert_eq!(c.max_body_bytes, Config::default().max_body_bytes);
        let c = c.apply(Overrides { queue_capacity: Some(5), ..Default::default() }).unwrap();
        assert_eq!((c.listen.port(), c.queue_capacity), (9000, 5));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvgate.toml");
        std::fs::write(&path, "lisen = \"127.0.0.1:9000\"\n").unwrap();
        let e = Config::load(Some(&path)).unwrap_err().to_string();
        assert!(e.contains("lisen") && e.contains("kvgate.toml"), "{e}");
        let e = Config::default().apply(Overrides { queue_capacity: Some(0), ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("queue_capacity"));
        let e = Config::default().apply(Overrides { recompute_taper: Some(0.5), ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("recompute_taper"), "{e}");
        let e = Config::default().apply(Overrides { check_layer: Some(0), ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("check_layer"), "{e}");
        let c = Config::default().apply(Overrides { check_layer: Some(3), ..Default::default() }).unwrap();
        assert_eq!(c.scheduler_options().blend.check_layer, 3);
        for (url, says) in [("http://10.0.0.5:6379", "not a Redis URL"), ("rediss://10.0.0.5", "TLS")] {
            let o = Overrides { remote_url: Some(url.into()), ..Default::default() };
            let e = Config::default().apply(o).unwrap_err().to_string();
            assert!(e.contains("remote_url") && e.contains(says), "{url}: {e}");
        }
        let o = Overrides { remote_url: Some("redis://:secret@10.0.0.5:6379/2".into()), ..Default::default() };
        let remote = Config::default().apply(o).unwrap().store_options().remote.unwrap();
        assert_eq!(
            (remote.url.as_str(), remote.timeout),
            ("redis://:secret@10.0.0.5:6379/2", Duration::from_millis(250))
        );
        assert!(
            Config::load(Some(Path::new("/nonexistent/kvgate.toml"))).unwrap_err().to_string().contains("cannot read")
        );
    }

    #[test]
    fn byte_sizes_read_with_or_without_units() {
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        assert_eq!(parse_bytes("1.5 GiB"), Ok(3 << 29));
        assert!(parse_bytes("lots").unwrap_err().contains("lots"));
        assert!(parse_bytes("5 parsecs").is_err());
        let c: Config = toml::from_str("ram_budget_bytes = \"64MiB\"\ndisk_budget_bytes = 1000\n").unwrap();
        assert_eq!((c.ram_budget_bytes, c.disk_budget_bytes), (64 << 20, 1000));
    }
}
