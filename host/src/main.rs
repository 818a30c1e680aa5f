//! The `kvgate` binary: argument parsing and wiring only; the work is in the library.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use kvgate::api::{self, AppState};
use kvgate::config::{Config, Overrides};
use kvgate::engine::LoadedModel;
use kvgate::policy::{self, Policies};
use kvgate::scheduler::Scheduler;
use kvgate::store::{Layout, Store};

#[derive(Parser)]
#[command(name = "kvgate", version, about = "LLM cache gateway with compositional KV reuse")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible API.
    Serve(ServeArgs),
    /// Run a benchmark.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Check policy components offline, or reload / list them on a running server.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Print the version, the CPU and the SIMD paths the kernels take on it.
    Info,
    /// API keys: what a keys file holds for a key.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Store a corpus's chunks on a running server ahead of traffic (POST /v1/kvgate/ingest).
    Ingest(IngestArgs),
    /// Route requests over a fleet of kvgate nodes: each to the node expected to answer
    /// first, by the tokens it holds (learnt from the shared tier) and the work queued on it.
    Route(RouteArgs),
}

#[derive(clap::Args)]
struct RouteArgs {
    /// TOML configuration file: its `[router]` table, keys and shared namespaces (the nodes').
    #[arg(long, env = "KVGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (port 0: any free port).
    #[arg(long, env = "KVGATE_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// A node's base URL, e.g. http://10.0.0.5:8080 (repeatable; replaces `[router] nodes`).
    #[arg(long = "node", env = "KVGATE_ROUTER_NODES", value_delimiter = ',')]
    nodes: Vec<String>,
    /// cache-aware (default) or round-robin.
    #[arg(long, env = "KVGATE_ROUTE_POLICY", value_enum)]
    policy: Option<kvgate::config::RoutePolicy>,
    /// The shared tier the nodes use (its event stream tells the router which node holds what).
    #[arg(long, env = "KVGATE_REMOTE_URL")]
    remote_url: Option<String>,
    /// The nodes' GGUF model (only its tokenizer and chat template are read).
    #[arg(long, env = "KVGATE_MODEL")]
    model: Option<PathBuf>,
    /// This router's name (in `x-kvgate-routed-by`). Default: <hostname>:<port>.
    #[arg(long, env = "KVGATE_NODE_ID")]
    node_id: Option<String>,
    /// An API key of the `default` tenant, as the nodes have (repeatable).
    #[arg(long = "api-key", env = "KVGATE_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    api_keys: Vec<String>,
    /// A TOML file of hashed keys, as the nodes have.
    #[arg(long, env = "KVGATE_API_KEYS_FILE")]
    api_keys_file: Option<PathBuf>,
    /// Log filter, e.g. `info` or `kvgate=debug` (`RUST_LOG` wins).
    #[arg(long, env = "KVGATE_LOG")]
    log: Option<String>,
    #[arg(long, env = "KVGATE_LOG_FORMAT", value_enum)]
    log_format: Option<kvgate::config::LogFormat>,
}

#[derive(clap::Args)]
struct IngestArgs {
    /// Files (.txt, .md, .html) and directories of them.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// The server (or any node of a fleet sharing a remote tier).
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "KVGATE_URL")]
    url: String,
    /// API key of the tenant whose namespace is filled.
    #[arg(long, env = "KVGATE_API_KEY")]
    api_key: Option<String>,
    /// A shared namespace to store into instead (the key's tenant must be one of its tenants).
    #[arg(long)]
    namespace: Option<String>,
    /// Words per document sent (whole paragraphs; about 1.3 tokens per word).
    #[arg(long, default_value_t = 600)]
    document_words: usize,
    /// Documents per request.
    #[arg(long, default_value_t = 8)]
    batch: usize,
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Print a keys-file entry for KEY (its sha256; the key itself is not kept).
    Hash {
        key: String,
        /// The tenant the key belongs to.
        #[arg(long, default_value = "default")]
        tenant: String,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Validate a component: its world, info, self-test and a canned call, under the limits.
    Check {
        /// The .wasm component.
        file: PathBuf,
        /// Time limit per call, milliseconds.
        #[arg(long, default_value_t = 50)]
        timeout_ms: u64,
        /// Memory limit.
        #[arg(long, default_value = "64MiB", value_parser = kvgate::config::parse_bytes)]
        memory: u64,
    },
    /// Ask a running server to reload its plugins directory.
    Reload(AdminArgs),
    /// Show a running server's plugins and their counters.
    List(AdminArgs),
}

#[derive(Parser)]
struct AdminArgs {
    /// Base URL of the running server.
    #[arg(long, env = "KVGATE_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The server's admin token, if it has one.
    #[arg(long, env = "KVGATE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
}

#[derive(Parser)]
struct ServeArgs {
    /// TOML configuration file (flags and environment override it).
    #[arg(long, env = "KVGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (port 0: any free port).
    #[arg(long, env = "KVGATE_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// GGUF model (llama architecture). Default: the embedded SmolLM2-135M-Instruct.
    #[arg(long, env = "KVGATE_MODEL")]
    model: Option<PathBuf>,
    /// Name clients use for the model. Default: the file stem.
    #[arg(long, env = "KVGATE_MODEL_NAME")]
    model_name: Option<String>,
    /// Inference threads (0: one per core).
    #[arg(long, env = "KVGATE_THREADS")]
    threads: Option<usize>,
    /// Requests that may wait for admission before new ones get 429.
    #[arg(long, env = "KVGATE_QUEUE_CAPACITY")]
    queue_capacity: Option<usize>,
    /// Requests running at once (prefilling or decoding); their decode steps share one batch.
    #[arg(long, env = "KVGATE_MAX_RUNNING")]
    max_running: Option<usize>,
    /// KV memory the running requests may hold (e.g. 4GiB); beyond it requests wait.
    #[arg(long, env = "KVGATE_KV_BUDGET_BYTES", value_parser = kvgate::config::parse_bytes)]
    kv_budget_bytes: Option<u64>,
    /// Tokens of prefill per scheduler turn, between decode steps (0: whole prompts at once).
    #[arg(long, env = "KVGATE_PREFILL_CHUNK_TOKENS")]
    prefill_chunk_tokens: Option<usize>,
    /// Largest request body in bytes (413 above).
    #[arg(long, env = "KVGATE_MAX_BODY_BYTES")]
    max_body_bytes: Option<usize>,
    /// Log filter, e.g. `info` or `kvgate=debug` (`RUST_LOG` wins).
    #[arg(long, env = "KVGATE_LOG")]
    log: Option<String>,
    /// Default cache mode: off, prefix or compose (per request: `x-kvgate-cache`).
    #[arg(long, env = "KVGATE_CACHE_MODE")]
    cache_mode: Option<kvgate::blend::CacheMode>,
    /// Default share of reused tokens recomputed, 0..=1 (per request: `x-kvgate-recompute-budget`).
    #[arg(long, env = "KVGATE_RECOMPUTE_BUDGET")]
    recompute_budget: Option<f32>,
    /// Gradual filtering: the check layer recomputes this many times the tokens the last layer
    /// does, narrowed layer by layer to the most read and the most deviating, the mean the
    /// budget's (>= 1; 1: none).
    #[arg(long, env = "KVGATE_RECOMPUTE_TAPER")]
    recompute_taper: Option<f32>,
    /// Shortest run of tokens reused from inside a stored chunk in compose mode (at least 8).
    #[arg(long, env = "KVGATE_MIN_SPAN")]
    min_span: Option<usize>,
    /// Layer at which compose measures the reused tokens' deviation and attention (at least 1).
    #[arg(long, env = "KVGATE_CHECK_LAYER")]
    check_layer: Option<usize>,
    /// Byte budget of the chunk store's RAM tier (e.g. 2GiB).
    #[arg(long, env = "KVGATE_RAM_BUDGET_BYTES", value_parser = kvgate::config::parse_bytes)]
    ram_budget_bytes: Option<u64>,
    /// Directory of the chunk store's disk tier. Default: ./data
    #[arg(long, env = "KVGATE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Byte budget of the disk tier (e.g. 16GiB); 0 turns it off.
    #[arg(long, env = "KVGATE_DISK_BUDGET_BYTES", value_parser = kvgate::config::parse_bytes)]
    disk_budget_bytes: Option<u64>,
    /// The fleet's shared chunk tier, e.g. redis://:password@10.0.0.5:6379/0 (default: none).
    #[arg(long, env = "KVGATE_REMOTE_URL")]
    remote_url: Option<String>,
    /// Longest a request waits on the shared tier before serving without it (ms).
    #[arg(long, env = "KVGATE_REMOTE_TIMEOUT_MS")]
    remote_timeout_ms: Option<u64>,
    /// This node's name in a fleet (event stream, routers). Default: <hostname>:<port>.
    #[arg(long, env = "KVGATE_NODE_ID")]
    node_id: Option<String>,
    /// Element type of stored K/V: f32, f16 or bf16.
    #[arg(long, env = "KVGATE_KV_DTYPE")]
    kv_dtype: Option<kvgate::store::KvDtype>,
    /// Element type of prefix-mode chunks: f32 (exact, the default) or f16 / bf16.
    #[arg(long, env = "KVGATE_PREFIX_KV_DTYPE")]
    prefix_kv_dtype: Option<kvgate::store::KvDtype>,
    /// Bearer token required by /admin/ endpoints.
    #[arg(long, env = "KVGATE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Directory of the policy components. Default: ~/.cache/kvgate/plugins
    #[arg(long, env = "KVGATE_PLUGINS_DIR")]
    plugins_dir: Option<PathBuf>,
    /// Do not reload plugins when their directory changes (reload with `kvgate plugin reload`).
    #[arg(long)]
    no_watch_plugins: bool,
    /// Longest one plugin call may run, milliseconds.
    #[arg(long, env = "KVGATE_PLUGIN_TIMEOUT_MS")]
    plugin_timeout_ms: Option<u64>,
    /// Most memory a plugin may grow to (e.g. 64MiB).
    #[arg(long, env = "KVGATE_PLUGIN_MEMORY_BYTES", value_parser = kvgate::config::parse_bytes)]
    plugin_memory_bytes: Option<u64>,
    /// An API key of the `default` tenant (repeatable; KVGATE_API_KEYS: comma-separated).
    /// With none configured anywhere the API is open.
    #[arg(long = "api-key", env = "KVGATE_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    api_keys: Vec<String>,
    /// A TOML file of hashed keys (`kvgate key hash`), reloaded when it changes.
    #[arg(long, env = "KVGATE_API_KEYS_FILE")]
    api_keys_file: Option<PathBuf>,
    /// Share of each chunk-store tier one tenant may fill (0 < share <= 1).
    #[arg(long, env = "KVGATE_NAMESPACE_SHARE")]
    namespace_share: Option<f64>,
    /// Requests one key may have in flight (0: no limit).
    #[arg(long, env = "KVGATE_KEY_MAX_CONCURRENT")]
    key_max_concurrent: Option<usize>,
    /// Requests one key may start per minute (0: no limit).
    #[arg(long, env = "KVGATE_KEY_REQUESTS_PER_MINUTE")]
    key_requests_per_minute: Option<u32>,
    /// Longest prompt accepted, tokens (0: the context).
    #[arg(long, env = "KVGATE_MAX_PROMPT_TOKENS")]
    max_prompt_tokens: Option<usize>,
    /// Most tokens one request may generate (0: the rest of the context).
    #[arg(long, env = "KVGATE_MAX_COMPLETION_TOKENS")]
    max_completion_tokens: Option<usize>,
    /// Longest a request may run, seconds (0: no limit); past it: 504.
    #[arg(long, env = "KVGATE_REQUEST_TIMEOUT_SECS")]
    request_timeout_secs: Option<u64>,
    /// Log lines as text or JSON (one object per line).
    #[arg(long, env = "KVGATE_LOG_FORMAT", value_enum)]
    log_format: Option<kvgate::config::LogFormat>,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Prefill and decode throughput of the inference core, in this process.
    Engine(BenchEngineArgs),
    /// A RAG workload against a running server: TTFT and quality per cache mode.
    Rag(BenchRagArgs),
    /// Chunk load time from RAM and disk (warm and cold) against recomputing the chunk.
    Store(BenchStoreArgs),
    /// Policy plugins: call overhead, chunking and eviction hit rates.
    Policies(BenchPoliciesArgs),
    /// Ways of choosing the tokens compose recomputes, compared in this process (exact KL).
    Denoise(BenchDenoiseArgs),
    /// Concurrent streaming clients against any OpenAI-compatible server: TTFT, inter-token
    /// latency and throughput per concurrency.
    Load(BenchLoadArgs),
    /// The gateway under sustained load: many streaming clients over local and upstream
    /// models, over-limit clients beside them; failures, latency, resident memory.
    Gateway(BenchGatewayArgs),
    /// The span index's lookup cost as the store and the prompt grow (synthetic chunks).
    Spans(BenchSpansArgs),
    /// A fleet on loopback (redis-server, N nodes, the router): reuse, tokens computed, TTFT
    /// and load per node, for round robin and cache-aware routing, own caches and shared.
    Cluster(BenchClusterArgs),
}

#[derive(Parser)]
struct BenchClusterArgs {
    /// Nodes of the fleet.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Inference threads per node.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// RAM tier of each node (less than the corpus's KV: a node cannot keep it all).
    #[arg(long, default_value = "128MiB", value_parser = kvgate::config::parse_bytes)]
    ram_budget_bytes: u64,
    /// Use this Redis instead of starting redis-server (the hang setup needs our own).
    #[arg(long)]
    redis_url: Option<String>,
    /// GGUF model. Default: the embedded SmolLM2-135M-Instruct.
    #[arg(long, env = "KVGATE_MODEL")]
    model: Option<PathBuf>,
    /// Directory of .txt/.md/.html files to draw passages from.
    #[arg(long)]
    corpus: PathBuf,
    /// Words per passage (~1.3 tokens per word).
    #[arg(long, default_value_t = 180)]
    passage_words: usize,
    /// Passages the trace draws from (by Zipf popularity).
    #[arg(long, default_value_t = 60)]
    pool: usize,
    /// Passages per request.
    #[arg(long, default_value_t = 4)]
    k: usize,
    #[arg(long, default_value_t = 0.8)]
    zipf_s: f64,
    #[arg(long, default_value_t = 120)]
    requests: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 3)]
    clients: usize,
    #[arg(long, default_value_t = 8)]
    max_tokens: usize,
    /// How long Redis is stopped in the hang setup, seconds.
    #[arg(long, default_value_t = 30)]
    hang_secs: u64,
    /// When in the hang setup's run Redis stops, seconds.
    #[arg(long, default_value_t = 10)]
    hang_after_secs: u64,
    /// Setups to run (comma-separated; default: all).
    #[arg(long, value_delimiter = ',', default_values_t = kvgate::bench::cluster::SETUPS.map(String::from))]
    setups: Vec<String>,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Write the report as JSON here (scripts/plot-cluster.py draws it).
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Parser)]
struct BenchSpansArgs {
    /// Chunks in the index, one level each (the index grows from one to the next).
    #[arg(long, value_delimiter = ',', default_values_t = [1_000, 10_000, 100_000, 1_000_000])]
    chunks: Vec<usize>,
    /// Prompt lengths, tokens.
    #[arg(long, value_delimiter = ',', default_values_t = [256, 1024, 4096, 16384])]
    prompt_tokens: Vec<usize>,
    /// Tokens per synthetic chunk.
    #[arg(long, default_value_t = 64)]
    chunk_tokens: usize,
    #[arg(long, default_value_t = 16)]
    min_span: usize,
    /// Lookups per point (the median is reported).
    #[arg(long, default_value_t = 51)]
    reps: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Parser)]
struct BenchGatewayArgs {
    /// Base URL of the gateway.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Streaming clients in closed loops.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Seconds counted, after the warm-up.
    #[arg(long, default_value_t = 120.0)]
    duration: f64,
    /// Seconds run first and not counted (resident memory is compared with its end).
    #[arg(long, default_value_t = 60.0)]
    warmup: f64,
    /// Model ids, used in turn (e.g. the local model and an upstream's).
    #[arg(long = "model", required = true)]
    models: Vec<String>,
    /// Header of the normal clients, `name: value` (repeatable), e.g. `authorization: Bearer KEY`.
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Clients sending with a key the server limits; their 429s are expected.
    #[arg(long, default_value_t = 0)]
    over_limit_clients: usize,
    /// Header of the over-limit clients (repeatable).
    #[arg(long = "over-limit-header")]
    over_limit_headers: Vec<String>,
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    #[command(flatten)]
    prompts: PromptArgs,
    /// Servers whose resident memory is sampled from /metrics (repeatable; default: --url).
    #[arg(long = "watch")]
    watch: Vec<String>,
    /// Seconds between memory samples.
    #[arg(long, default_value_t = 5.0)]
    sample_every: f64,
    #[arg(long, default_value = "kvgate gateway")]
    label: String,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The prompts of `bench load` and `bench gateway`.
#[derive(clap::Args)]
struct PromptArgs {
    /// `short` (a one-line question each: decode throughput) or a RAG trace shape (as
    /// `bench rag --traces`; needs --corpus).
    #[arg(long, default_value = "joined:passage")]
    trace: String,
    /// Directory of .txt/.md/.html files to draw passages from.
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Passages per request.
    #[arg(long, default_value_t = 4)]
    k: usize,
    /// Words per passage (~1.3 tokens per word).
    #[arg(long, default_value_t = 150)]
    passage_words: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

#[derive(Parser)]
struct BenchLoadArgs {
    /// Base URL of the server (kvgate, llama.cpp's server, vLLM, ...).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Concurrent clients, one level each.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 2, 4, 8, 16])]
    clients: Vec<usize>,
    /// Requests counted per level (0: four per client, at least 16).
    #[arg(long, default_value_t = 0)]
    requests: usize,
    /// Requests run first at each level, not counted (default: one per client).
    #[arg(long)]
    warmup: Option<usize>,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Generate --max-tokens tokens whatever the model says.
    #[arg(long)]
    ignore_eos: bool,
    #[command(flatten)]
    prompts: PromptArgs,
    /// Do not empty the chunk store before each level (needed for servers other than kvgate).
    #[arg(long)]
    no_flush: bool,
    /// Extra request header, `name: value` (repeatable), e.g. `x-kvgate-cache: off`.
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Name of this configuration in the report.
    #[arg(long, default_value = "kvgate")]
    label: String,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Parser)]
struct BenchDenoiseArgs {
    /// GGUF model. Default: the embedded SmolLM2-135M-Instruct.
    #[arg(long, env = "KVGATE_MODEL")]
    model: Option<PathBuf>,
    /// Inference threads (0: one per core).
    #[arg(long, env = "KVGATE_THREADS", default_value_t = 0)]
    threads: usize,
    /// Directory of .txt/.md/.html files to draw passages from.
    #[arg(long)]
    corpus: PathBuf,
    /// Trace shape (as `bench rag --traces`).
    #[arg(long, default_value = "joined:passage")]
    trace: String,
    #[arg(long, default_value_t = 12)]
    warmup: usize,
    #[arg(long, default_value_t = 12)]
    requests: usize,
    /// deviation, even, random, heads:N, starts, oracle, attention, impact, attn-first:N, adaptive:THRESHOLD, …
    #[arg(long, value_delimiter = ',', default_values_t = ["deviation".to_string(), "even".into(), "starts".into(), "oracle".into()])]
    strategies: Vec<String>,
    #[arg(long, value_delimiter = ',', default_values_t = [0.05, 0.15, 0.3])]
    budgets: Vec<f32>,
    /// Default: the server's.
    #[arg(long, value_delimiter = ',', default_values_t = [kvgate::blend::BlendOptions::default().check_layer])]
    check_layers: Vec<usize>,
    /// Recompute tapers (gradual filtering; 1: none). Default: the server's.
    #[arg(long, value_delimiter = ',', default_values_t = [kvgate::blend::BlendOptions::default().recompute_taper])]
    tapers: Vec<f32>,
    /// Tokens of `off`'s answer scored teacher-forced.
    #[arg(long, default_value_t = 32)]
    answer_tokens: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Parser)]
struct BenchPoliciesArgs {
    /// GGUF model (for its tokenizer and chat template). Default: the embedded one.
    #[arg(long, env = "KVGATE_MODEL")]
    model: Option<PathBuf>,
    /// Directory of the components to measure. Default: ~/.cache/kvgate/plugins
    #[arg(long, env = "KVGATE_PLUGINS_DIR")]
    plugins_dir: Option<PathBuf>,
    /// Directory of .txt/.md/.html files to draw passages from.
    #[arg(long)]
    corpus: PathBuf,
    /// Requests per trace.
    #[arg(long, default_value_t = 400)]
    requests: usize,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Parser)]
struct BenchStoreArgs {
    /// GGUF model. Default: the embedded SmolLM2-135M-Instruct.
    #[arg(long, env = "KVGATE_MODEL")]
    model: Option<PathBuf>,
    /// Inference threads (0: one per core).
    #[arg(long, env = "KVGATE_THREADS", default_value_t = 0)]
    threads: usize,
    /// Tokens in the chunk.
    #[arg(long, default_value_t = 256)]
    tokens: usize,
    /// Repetitions (medians are reported).
    #[arg(long, default_value_t = 7)]
    reps: usize,
    /// Where the temporary stores go (on the disk to measure).
    #[arg(long, default_value = "data/bench-store")]
    dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Parser)]
struct BenchRagArgs {
    /// Base URL of a running `kvgate serve`.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Directory of .txt/.md/.html files to draw passages from.
    #[arg(long)]
    corpus: PathBuf,
    /// Passages per request.
    #[arg(long, default_value_t = 4)]
    k: usize,
    /// Words per passage (~1.3 tokens per word).
    #[arg(long, default_value_t = 200)]
    passage_words: usize,
    /// Passages in the popularity pool.
    #[arg(long, default_value_t = 40)]
    pool: usize,
    /// Zipf exponent of passage popularity.
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Warm-up requests per configuration (after a flush).
    #[arg(long, default_value_t = 12)]
    warmup: usize,
    /// Measured requests per configuration.
    #[arg(long, default_value_t = 16)]
    requests: usize,
    /// Generated tokens per request (the "first N tokens identical" figure).
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Recompute budgets of compose mode.
    #[arg(long, value_delimiter = ',', default_values_t = [0.0, 0.05, 0.15, 0.3, 1.0])]
    budgets: Vec<f32>,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Trace shapes: joined:passage, joined:bracket, joined:none, messages, agent, memory.
    #[arg(long, value_delimiter = ',', default_values_t = kvgate::bench::trace::Shape::ALL.map(|s| s.name().to_string()))]
    traces: Vec<String>,
    /// The server's `min_span` (what the oracle counts as a reusable run).
    #[arg(long, default_value_t = 16)]
    min_span: usize,
    /// Compose only, against one `off` run (no `prefix`, no noise floor).
    #[arg(long)]
    no_baselines: bool,
    /// Also score `off`'s answers under each configuration (teacher-forced KL, Δ log-likelihood).
    #[arg(long)]
    teacher_forced: bool,
    /// A second server started with `--prefix-kv-dtype f16`: its prefix mode is the f16 floor.
    #[arg(long)]
    floor_url: Option<String>,
    /// Selector components (.wasm) to swap in, in turn, for the compose runs.
    #[arg(long, value_delimiter = ',')]
    selectors: Vec<PathBuf>,
    /// The plugins directory of the server at --url (where --selectors are installed).
    #[arg(long)]
    plugins_dir: Option<PathBuf>,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Parser)]
struct BenchEngineArgs {
    /// GGUF model. Default: the embedded SmolLM2-135M-Instruct.
    #[arg(long, env = "KVGATE_MODEL")]
    model: Option<PathBuf>,
    /// Inference threads (0: one per core).
    #[arg(long, env = "KVGATE_THREADS", default_value_t = 0)]
    threads: usize,
    /// Prompt lengths to time prefill at.
    #[arg(long, value_delimiter = ',', default_values_t = [512, 2048])]
    lengths: Vec<usize>,
    /// Tokens to decode.
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    /// Sequence counts to time batched decode at (the first is what the others are put against).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 2, 4, 8, 16])]
    batches: Vec<usize>,
    /// Repetitions; the best is reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() {
    // A readable message and a failing exit status; no backtrace (this is a user's tool).
    if let Err(e) = run(Cli::parse()) {
        eprintln!("kvgate: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Bench(BenchCommand::Engine(args)) => bench_engine(args),
        Command::Bench(BenchCommand::Rag(args)) => bench_rag(args),
        Command::Bench(BenchCommand::Store(args)) => bench_store(args),
        Command::Bench(BenchCommand::Policies(args)) => bench_policies(args),
        Command::Bench(BenchCommand::Denoise(args)) => bench_denoise(args),
        Command::Bench(BenchCommand::Load(args)) => bench_load(args),
        Command::Bench(BenchCommand::Gateway(args)) => bench_gateway(args),
        Command::Bench(BenchCommand::Cluster(args)) => bench_cluster(args),
        Command::Bench(BenchCommand::Spans(args)) => {
            let points = kvgate::bench::spans::run(
                &args.chunks,
                &args.prompt_tokens,
                args.chunk_tokens,
                args.min_span,
                args.reps,
                |stage| eprintln!("bench spans: {stage}"),
            )?;
            match args.json {
                true => println!("{}", serde_json::to_string_pretty(&points)?),
                false => print!("{}", kvgate::bench::spans::table(&points)),
            }
            Ok(())
        }
        Command::Plugin(cmd) => plugin(cmd),
        Command::Key(KeyCommand::Hash { key, tenant }) => {
            if key.trim().is_empty() {
                bail!("the key must not be empty");
            }
            if !kvgate::config::valid_name(&tenant) {
                bail!("tenant `{tenant}`: use 1-64 of A-Z a-z 0-9 . _ -");
            }
            println!("[[api_key]]\nsha256 = \"{}\"\ntenant = \"{tenant}\"", api::auth::key_hash_hex(&key));
            Ok(())
        }
        Command::Ingest(args) => ingest(args),
        Command::Route(args) => route(args),
        Command::Info => {
            println!("kvgate {}", env!("CARGO_PKG_VERSION"));
            println!("{}", kvgate::engine::cpu::report());
            Ok(())
        }
    }
}

/// Inference pools (candle's and ours) size themselves from `RAYON_NUM_THREADS` when first
/// used, so it must be set before anything touches them.
fn set_threads(threads: usize) {
    if threads > 0 {
        // SAFETY: called first thing in main, before any other thread exists.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    }
}

fn init_logging(filter: &str) {
    init_logging_as(filter, kvgate::config::LogFormat::Text);
}

fn init_logging_as(filter: &str, format: kvgate::config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        kvgate::config::LogFormat::Text => fmt.init(),
        kvgate::config::LogFormat::Json => fmt.json().with_current_span(true).with_span_list(false).init(),
    }
}

/// The model a benchmark runs on: `--model`, else the embedded default.
fn bench_model(path: Option<PathBuf>) -> anyhow::Result<(PathBuf, Arc<LoadedModel>)> {
    let path = path.unwrap_or_else(kvgate::config::default_model_path);
    check_model(&path)?;
    let model = LoadedModel::load(&path, None)?;
    Ok((path, model))
}

fn check_model(path: &std::path::Path) -> anyhow::Result<()> {
    if !path.is_file() {
        bail!("model file {} not found: run `make model`, or pass --model PATH to a llama GGUF", path.display());
    }
    Ok(())
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::load(args.config.as_deref())?.apply(Overrides {
        listen: args.listen,
        model: args.model,
        model_name: args.model_name,
        threads: args.threads,
        queue_capacity: args.queue_capacity,
        max_running: args.max_running,
        kv_budget_bytes: args.kv_budget_bytes,
        prefill_chunk_tokens: args.prefill_chunk_tokens,
        max_body_bytes: args.max_body_bytes,
        log: args.log,
        cache_mode: args.cache_mode,
        recompute_budget: args.recompute_budget,
        recompute_taper: args.recompute_taper,
        min_span: args.min_span,
        check_layer: args.check_layer,
        ram_budget_bytes: args.ram_budget_bytes,
        data_dir: args.data_dir,
        disk_budget_bytes: args.disk_budget_bytes,
        remote_url: args.remote_url,
        remote_timeout_ms: args.remote_timeout_ms,
        kv_dtype: args.kv_dtype,
        prefix_kv_dtype: args.prefix_kv_dtype,
        admin_token: args.admin_token,
        plugins_dir: args.plugins_dir,
        watch_plugins: args.no_watch_plugins.then_some(false),
        plugin_timeout_ms: args.plugin_timeout_ms,
        plugin_memory_bytes: args.plugin_memory_bytes,
        api_keys: args.api_keys,
        api_keys_file: args.api_keys_file,
        namespace_share: args.namespace_share,
        key_max_concurrent: args.key_max_concurrent,
        key_requests_per_minute: args.key_requests_per_minute,
        max_prompt_tokens: args.max_prompt_tokens,
        max_completion_tokens: args.max_completion_tokens,
        request_timeout_secs: args.request_timeout_secs,
        log_format: args.log_format,
        node_id: args.node_id,
        router_nodes: Vec::new(),
        route_policy: None,
    })?;
    set_threads(config.threads);
    init_logging_as(&config.log, config.log_format);
    check_model(&config.model)?;
    let cpu = kvgate::engine::cpu::report();
    tracing::info!(cpu = %cpu.model, gemm = cpu.gemm, quantized = cpu.quantized, "kernels");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let addr = listener.local_addr()?;
        // A plain line on stdout, for scripts and tests that start us on port 0.
        println!("kvgate listening on http://{addr}");
        let state = Arc::new(AppState::new(&config).map_err(anyhow::Error::msg)?);
        state.watch();
        let server = tokio::spawn(api::serve(listener, state.clone(), shutdown_signal()));
        let (path, name) = (config.model.clone(), config.model_name.clone());
        tracing::info!(model = %path.display(), "loading model");
        let model = tokio::task::spawn_blocking(move || LoadedModel::load(&path, name.as_deref())).await??;
        let cfg = model.model.config();
        tracing::info!(name = %model.name, layers = cfg.layers, context = cfg.context_length, "model ready");
        let (fp, heads, dim) = (model.model.fingerprint(), cfg.kv_heads, cfg.head_dim);
        let layout = Layout::new(fp, cfg.layers, heads, dim, cfg.hidden, config.kv_dtype)
            .with_prefix_dtype(config.prefix_kv_dtype);
        let options = config.store_options();
        let store = Arc::new(tokio::task::spawn_blocking(move || Store::open(&options, layout)).await?);
        let policies = Policies::start(config.policy_options())?;
        store.set_evictor(policies.evictor());
        let _watcher = match config.watch_plugins {
            true => Some(policy::watch::watch(&policies).context("cannot watch the plugins directory")?),
            false => None,
        };
        let scheduler = Scheduler::start(model, config.scheduler_options(), store, Some(policies));
        if state.scheduler.set(scheduler).is_err() {
            bail!("the scheduler started twice");
        }
        server.await?;
        Ok(())
    })
}

fn route(args: RouteArgs) -> anyhow::Result<()> {
    let config = Config::load(args.config.as_deref())?.apply(Overrides {
        listen: args.listen,
        model: args.model,
        remote_url: args.remote_url,
        node_id: args.node_id,
        router_nodes: args.nodes,
        route_policy: args.policy,
        api_keys: args.api_keys,
        api_keys_file: args.api_keys_file,
        log: args.log,
        log_format: args.log_format,
        ..Overrides::default()
    })?;
    init_logging_as(&config.log, config.log_format);
    check_model(&config.model)?;
    let (tokenizer, template) = kvgate::engine::load_prompting(&config.model)?;
    let router = api::route::Router::new(&config, tokenizer, template).map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        println!("kvgate router listening on http://{}", listener.local_addr()?);
        router.watch();
        api::route::serve(listener, router.clone(), shutdown_signal()).await;
        router.index().close();
        Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown requested");
}

fn bench_engine(args: BenchEngineArgs) -> anyhow::Result<()> {
    if args.batches.is_empty() || args.batches.contains(&0) {
        anyhow::bail!("--batches: give one or more sequence counts, each at least 1");
    }
    set_threads(args.threads);
    init_logging("warn");
    let (path, model) = bench_model(args.model)?;
    let f = kvgate::bench::engine(&model, &args.lengths, &args.batches, args.reps, args.decode_tokens)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&f)?);
    } else {
        println!("model: {} (int8 weights: {})", path.display(), model.model.int8_formats());
        for (n, tps) in &f.prefill {
            println!("prefill {n:>5} tokens: {tps:>7.1} tok/s");
        }
        println!(
            "decode  {:>5} tokens: {:>7.1} tok/s (after a {}-token prompt)",
            f.decode_tokens, f.decode_tok_s, f.decode_context
        );
        let one = f.batched_decode.first().map_or(1.0, |b| b.1);
        for (b, tps) in &f.batched_decode {
            println!("decode  {b:>2} sequences, batched: {tps:>7.1} tok/s ({:.2}x one sequence)", tps / one);
        }
        let r = &f.roofline;
        println!(
            "roofline: peak {:.0} GFLOP/s (f32 gemm 1024^3, {} threads), {:.1} GB/s (reading 512 MiB)",
            r.peak_gflops,
            rayon::current_num_threads(),
            r.peak_gbps
        );
        if let Some(p) = r.peak_int8_gops {
            println!("roofline: peak {p:.0} GOP/s (int8 vpdpbusd on registers)");
        }
        if let Some(p) = r.peak_bf16_gflops {
            println!("roofline: peak {p:.0} GFLOP/s (bf16 AMX tiles, 512 x 2048^2)");
        }
        for (n, g) in &r.prefill_gflops {
            println!(
                "roofline: prefill {n:>5} tokens ({}): {g:>6.1} GOP/s = {:>4.1}% of the {} peak",
                r.prefill_weights,
                100.0 * g / r.prefill_peak,
                r.prefill_weights
            );
        }
        println!(
            "roofline: decode, 1 stream: {:.1} GB/s of weights ({:.0} MB/token) = {:.1}% of peak",
            r.decode_gbps,
            r.decode_bytes_per_token / 1e6,
            100.0 * r.decode_gbps / r.peak_gbps
        );
        for (b, g) in &r.batched_decode_gops {
            println!(
                "roofline: decode {b:>2} sequences, batched: {g:>6.1} GOP/s of weight products = {:>4.1}% of the {} peak",
                100.0 * g / r.decode_peak,
                r.decode_peak_kind
            );
        }
    }
    Ok(())
}

fn plugin(cmd: PluginCommand) -> anyhow::Result<()> {
    init_logging("warn");
    match cmd {
        PluginCommand::Check { file, timeout_ms, memory } => {
            let timeout = std::time::Duration::from_millis(timeout_ms);
            match Policies::check_file(&file, timeout, memory as usize) {
                Ok(c) => {
                    println!("{}: ok", file.display());
                    println!("  world:    kvgate:policy/{}@{}", c.kind.as_str(), c.wit);
                    println!("  name:     {} {}", c.name, c.version);
                    println!("  sha256:   {}", c.sha256);
                    println!("  install:  copy it to the plugins directory as {}", c.kind.file_name());
                    Ok(())
                }
                Err(e) => bail!("{}: {e}", file.display()),
            }
        }
        PluginCommand::Reload(a) => {
            let body = admin_call(&a, "POST", "/admin/plugins/reload")?;
            let mut failed = false;
            for o in body["data"].as_array().into_iter().flatten() {
                let outcome = o["outcome"].as_str().unwrap_or("?");
                failed |= outcome == "rejected";
                let what = match (o["name"].as_str(), o["error"].as_str()) {
                    (_, Some(e)) => e.to_string(),
                    (Some(n), None) => format!("{n} {}", o["version"].as_str().unwrap_or("")),
                    (None, None) => String::new(),
                };
                println!("{:<9} {:<10} {what}", o["kind"].as_str().unwrap_or("?"), outcome);
            }
            if failed {
                bail!("a plugin was rejected; the previous version keeps serving");
            }
            Ok(())
        }
        PluginCommand::List(a) => {
            let body = admin_call(&a, "GET", "/admin/plugins")?;
            println!("{}", serde_json::to_string_pretty(&body["data"])?);
            Ok(())
        }
    }
}

/// `kvgate ingest`: the corpus in batches, with a progress bar.
fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    if args.batch == 0 || args.document_words == 0 {
        bail!("--batch and --document-words must be at least 1");
    }
    let docs = kvgate::bench::trace::documents(&args.paths, args.document_words)?;
    let url = format!("{}/v1/kvgate/ingest", args.url.trim_end_matches('/'));
    let bar = indicatif::ProgressBar::new(docs.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} documents {msg} [{elapsed_precise}, {eta} left]")
            .expect("a valid template"),
    );
    let (mut tokens, mut reused, mut stored) = (0u64, 0u64, 0u64);
    for batch in docs.chunks(args.batch) {
        let documents: Vec<serde_json::Value> =
            batch.iter().map(|(id, text)| serde_json::json!({"id": id, "text": text})).collect();
        let mut body = serde_json::json!({"documents": documents});
        if let Some(ns) = &args.namespace {
            body["namespace"] = ns.as_str().into();
        }
        let mut req = ureq::post(&url);
        if let Some(k) = &args.api_key {
            req = req.set("authorization", &format!("Bearer {k}"));
        }
        let r: serde_json::Value = match req.send_json(body) {
            Ok(r) => r.into_json()?,
            Err(ureq::Error::Status(code, r)) => {
                let body: serde_json::Value = r.into_json().unwrap_or_default();
                let first = &batch[0].0;
                bail!(
                    "{url}: {code} {} (batch from {first})",
                    body["error"]["message"].as_str().unwrap_or("(no message)")
                );
            }
            Err(e) => bail!("cannot reach {url}: {e} (is `kvgate serve` running? --url)"),
        };
        tokens += r["tokens"].as_u64().unwrap_or(0);
        reused += r["reused_tokens"].as_u64().unwrap_or(0);
        stored += r["chunks_stored"].as_u64().unwrap_or(0);
        bar.inc(batch.len() as u64);
        bar.set_message(format!("{tokens} tokens, {stored} chunks stored"));
    }
    bar.finish();
    println!(
        "ingested {} documents: {tokens} tokens, {stored} chunks stored, {reused} tokens already held",
        docs.len()
    );
    Ok(())
}

/// Calls an admin endpoint of a running server; its error message on failure.
fn admin_call(a: &AdminArgs, method: &str, path: &str) -> anyhow::Result<serde_json::Value> {
    let url = format!("{}{path}", a.url.trim_end_matches('/'));
    let mut req = ureq::request(method, &url);
    if let Some(t) = &a.admin_token {
        req = req.set("authorization", &format!("Bearer {t}"));
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(code, r)) => {
            let body: serde_json::Value = r.into_json().unwrap_or_default();
            bail!("{url}: {code} {}", body["error"]["message"].as_str().unwrap_or("(no message)"));
        }
        Err(e) => bail!("cannot reach {url}: {e} (is `kvgate serve` running? --url)"),
    };
    Ok(resp.into_json()?)
}

fn bench_policies(args: BenchPoliciesArgs) -> anyhow::Result<()> {
    init_logging("warn");
    let (_, model) = bench_model(args.model)?;
    let defaults = kvgate::config::Config::default();
    let options = policy::PolicyOptions {
        dir: args.plugins_dir.unwrap_or(defaults.plugins_dir),
        timeout: std::time::Duration::from_millis(defaults.plugin_timeout_ms),
        memory_bytes: defaults.plugin_memory_bytes as usize,
    };
    let policies = Policies::start(options)?;
    let f = kvgate::bench::policies::run(&model, &policies, &args.corpus, args.requests, &mut |s| {
        eprintln!("bench policies: {s}")
    })?;
    match args.json {
        true => println!("{}", serde_json::to_string_pretty(&f)?),
        false => print!("{}", kvgate::bench::policies::table(&f)),
    }
    Ok(())
}

fn bench_denoise(args: BenchDenoiseArgs) -> anyhow::Result<()> {
    set_threads(args.threads);
    init_logging("warn");
    let (_, model) = bench_model(args.model)?;
    let opts = kvgate::bench::denoise::DenoiseOptions {
        corpus: args.corpus,
        shape: args.trace.parse().map_err(anyhow::Error::msg)?,
        warmup: args.warmup,
        requests: args.requests,
        budgets: args.budgets,
        strategies: args
            .strategies
            .iter()
            .map(|s| s.parse())
            .collect::<Result<_, String>>()
            .map_err(anyhow::Error::msg)?,
        check_layers: args.check_layers,
        tapers: args.tapers,
        answer_tokens: args.answer_tokens.max(1),
        seed: args.seed,
    };
    let r = kvgate::bench::denoise::run(&model, &opts, |s| eprintln!("bench denoise: {s}"))?;
    match args.json {
        true => println!("{}", serde_json::to_string_pretty(&r)?),
        false => print!("{}", kvgate::bench::denoise::table(&r)),
    }
    Ok(())
}

fn bench_cluster(args: BenchClusterArgs) -> anyhow::Result<()> {
    init_logging("warn");
    if let Some(m) = &args.model {
        check_model(m)?;
    }
    let o = kvgate::bench::cluster::ClusterOptions {
        kvgate: std::env::current_exe().context("finding this kvgate binary")?,
        model: args.model,
        nodes: args.nodes,
        threads: args.threads,
        ram_budget_bytes: args.ram_budget_bytes,
        redis_url: args.redis_url,
        corpus: args.corpus,
        passage_words: args.passage_words,
        pool: args.pool,
        k: args.k,
        zipf_s: args.zipf_s,
        requests: args.requests,
        clients: args.clients,
        max_tokens: args.max_tokens,
        hang_secs: args.hang_secs,
        hang_after_secs: args.hang_after_secs,
        setups: args.setups,
        seed: args.seed,
    };
    let r = kvgate::bench::cluster::run(&o, |s| eprintln!("{s}"))?;
    print_report("cluster", &kvgate::bench::cluster::table(&r), &r, args.json.as_deref())
}

fn bench_store(args: BenchStoreArgs) -> anyhow::Result<()> {
    set_threads(args.threads);
    init_logging("warn");
    let (_, model) = bench_model(args.model)?;
    std::fs::create_dir_all(&args.dir).with_context(|| format!("cannot create {}", args.dir.display()))?;
    let f = kvgate::bench::store::run(&model, args.tokens, args.reps, &args.dir)?;
    match args.json {
        true => println!("{}", serde_json::to_string_pretty(&f)?),
        false => print!("{}", kvgate::bench::store::table(&f)),
    }
    Ok(())
}

fn bench_load(args: BenchLoadArgs) -> anyhow::Result<()> {
    init_logging("warn");
    let shape = trace_shape(&args.prompts.trace)?;
    let headers = parse_headers(&args.headers, "--header")?;
    let opts = kvgate::bench::load::LoadOptions {
        url: args.url.trim_end_matches('/').to_string(),
        corpus: args.prompts.corpus,
        shape,
        clients: args.clients,
        requests: args.requests,
        warmup: args.warmup,
        max_tokens: args.max_tokens,
        ignore_eos: args.ignore_eos,
        k: args.prompts.k,
        passage_words: args.prompts.passage_words,
        seed: args.prompts.seed,
        flush: !args.no_flush,
        headers,
        label: args.label,
    };
    let report = kvgate::bench::load::run(&opts, |stage| eprintln!("bench load: {stage}"))?;
    print_report("load", &kvgate::bench::load::table(&report), &report, args.json.as_deref())?;
    Ok(())
}

/// `--trace`: `short` (no RAG trace: short questions) or a RAG trace shape.
fn trace_shape(trace: &str) -> anyhow::Result<Option<kvgate::bench::trace::Shape>> {
    match trace {
        "short" => Ok(None),
        t => Ok(Some(t.parse().map_err(|e: String| anyhow::anyhow!("--trace: {e}, or short"))?)),
    }
}

/// Prints a benchmark's table and, with `--json PATH`, writes its report there.
fn print_report(bench: &str, table: &str, report: &impl serde::Serialize, json: Option<&Path>) -> anyhow::Result<()> {
    print!("{table}");
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("bench {bench}: report written to {}", path.display());
    }
    Ok(())
}

/// `name: value` headers from the command line.
fn parse_headers(raw: &[String], flag: &str) -> anyhow::Result<Vec<(String, String)>> {
    raw.iter()
        .map(|h| match h.split_once(':') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
            _ => anyhow::bail!("{flag} `{h}`: expected `name: value`"),
        })
        .collect()
}

fn bench_gateway(args: BenchGatewayArgs) -> anyhow::Result<()> {
    init_logging("warn");
    let shape = trace_shape(&args.prompts.trace)?;
    if args.over_limit_clients > 0 && args.over_limit_headers.is_empty() {
        anyhow::bail!("--over-limit-clients needs --over-limit-header (the limited key)");
    }
    let url = args.url.trim_end_matches('/').to_string();
    let watch = match args.watch.is_empty() {
        true => vec![url.clone()],
        false => args.watch.iter().map(|u| u.trim_end_matches('/').to_string()).collect(),
    };
    let opts = kvgate::bench::gateway::GatewayOptions {
        url,
        corpus: args.prompts.corpus,
        shape,
        clients: args.clients,
        duration_s: args.duration,
        warmup_s: args.warmup,
        models: args.models,
        headers: parse_headers(&args.headers, "--header")?,
        over_limit_clients: args.over_limit_clients,
        over_limit_headers: parse_headers(&args.over_limit_headers, "--over-limit-header")?,
        max_tokens: args.max_tokens,
        k: args.prompts.k,
        passage_words: args.prompts.passage_words,
        seed: args.prompts.seed,
        watch,
        sample_every_s: args.sample_every,
        label: args.label,
    };
    let report = kvgate::bench::gateway::run(&opts, |stage| eprintln!("bench gateway: {stage}"))?;
    print_report("gateway", &kvgate::bench::gateway::table(&report), &report, args.json.as_deref())?;
    if report.failures > 0 {
        anyhow::bail!("{} requests failed besides the deliberate 429s", report.failures);
    }
    Ok(())
}

fn bench_rag(args: BenchRagArgs) -> anyhow::Result<()> {
    init_logging("warn");
    let opts = kvgate::bench::rag::RagOptions {
        url: args.url.trim_end_matches('/').to_string(),
        corpus: args.corpus,
        k: args.k,
        passage_words: args.passage_words,
        pool: args.pool,
        zipf_s: args.zipf,
        warmup: args.warmup,
        requests: args.requests,
        max_tokens: args.max_tokens,
        budgets: args.budgets,
        seed: args.seed,
        shapes: args.traces.iter().map(|t| t.parse()).collect::<Result<_, String>>().map_err(anyhow::Error::msg)?,
        min_span: args.min_span,
        baselines: !args.no_baselines,
        teacher_forced: args.teacher_forced,
        floor_url: args.floor_url.map(|u| u.trim_end_matches('/').to_string()),
        selectors: args.selectors,
        plugins_dir: args.plugins_dir,
    };
    let report = kvgate::bench::rag::run(&opts, |stage| eprintln!("bench rag: {stage}"))?;
    print_report("rag", &kvgate::bench::rag::table(&report), &report, args.json.as_deref())?;
    Ok(())
}
