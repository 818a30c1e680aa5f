//! `kvgate bench cluster`: a fleet on loopback — one `redis-server`, N `kvgate serve` nodes
//! and a `kvgate route` in front — driven by a RAG trace over a corpus larger than one node's
//! RAM tier, in each setup an operator could run:
//!
//! - `one-node`: the same trace on a single node (the reference);
//! - `round-robin/own`: N nodes, each request to the next, every node its own cache;
//! - `round-robin/shared`: the same with the shared tier on Redis;
//! - `cache-aware/shared`: the router's default, with the shared tier;
//! - `cache-aware/shared+hang`: the same with Redis stopped (SIGSTOP) for `hang_secs` early
//!   in the run;
//! - `ingest+cache-aware/shared`: the trace's corpus ingested first, then one pass.
//!
//! Each setup starts from empty caches (fresh nodes, an emptied Redis). Per setup: fleet-wide
//! reuse (reused / prompt tokens, as the nodes report them), prompt tokens computed per
//! request (not reused, plus reused ones recomputed), TTFT p50 / p95 / p99, requests per node
//! (max / mean), Redis bytes read per request (the nodes' counters) and failed requests.
//!
//! Owns the processes it starts (killed when it ends) and the numbers; the HTTP calls are
//! [`super::client`]'s.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::json;

use super::client::{self, Mode, Sample};
use super::trace::{self, Label, Shape, TraceOptions};

/// The setups, in the order they run.
pub const SETUPS: [&str; 6] = [
    "one-node",
    "round-robin/own",
    "round-robin/shared",
    "cache-aware/shared",
    "cache-aware/shared+hang",
    "ingest+cache-aware/shared",
];

/// What to run.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The `kvgate` binary the nodes and the router run.
    pub kvgate: PathBuf,
    pub model: Option<PathBuf>,
    pub nodes: usize,
    /// Inference threads per node.
    pub threads: usize,
    /// RAM tier of each node (smaller than the corpus's KV, so a node cannot hold it all).
    pub ram_budget_bytes: u64,
    /// A Redis to use instead of starting `redis-server` (the hang setup needs our own).
    pub redis_url: Option<String>,
    pub corpus: PathBuf,
    pub passage_words: usize,
    pub pool: usize,
    pub k: usize,
    pub zipf_s: f64,
    pub requests: usize,
    /// Concurrent clients.
    pub clients: usize,
    pub max_tokens: usize,
    pub hang_secs: u64,
    /// Seconds into the hang setup's run when Redis stops.
    pub hang_after_secs: u64,
    pub setups: Vec<String>,
    pub seed: u64,
}

/// One setup's figures.
#[derive(Debug, Clone, Serialize)]
pub struct SetupReport {
    pub setup: String,
    pub nodes: usize,
    pub requests: usize,
    pub failures: usize,
    pub mean_prompt_tokens: f64,
    /// Reused / prompt tokens over every request.
    pub reuse: f64,
    pub computed_per_request: f64,
    pub ttft_p50_s: f64,
    pub ttft_p95_s: f64,
    pub ttft_p99_s: f64,
    /// Requests per node: the busiest, and the mean.
    pub max_node_requests: usize,
    pub mean_node_requests: f64,
    pub redis_bytes_per_request: f64,
    pub wall_s: f64,
    /// Router decisions by reason.
    pub decisions: Vec<(String, u64)>,
}

/// Every setup's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterReport {
    pub nodes: usize,
    pub corpus_passages: usize,
    pub ram_budget_bytes: u64,
    pub clients: usize,
    pub setups: Vec<SetupReport>,
}

/// A child process, killed and reaped when dropped.
struct Proc {
    child: Child,
    name: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Starts `cmd` and waits for the stdout line holding `marker`; returns the rest of it.
    fn start(mut cmd: Command, name: &str, marker: &str) -> anyhow::Result<(Self, String)> {
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).stdin(Stdio::null());
        let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let stdout = child.stdout.take().expect("piped");
        let mut proc = Self { child, name: name.to_string() };
        let (tx, rx) = std::sync::mpsc::channel();
        let marker = marker.to_string();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            for line in lines.by_ref().map_while(Result::ok) {
                if let Some(rest) = line.split_once(&marker).map(|(_, r)| r.trim().to_string()) {
                    let _ = tx.send(rest);
                    break;
                }
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(rest) => Ok((proc, rest)),
            Err(_) => {
                let status = proc.child.try_wait().ok().flatten();
                bail!("{} did not start (exit status: {status:?})", proc.name)
            }
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, sig);
        }
    }
}

/// Waits until `url`/ready answers 200.
fn wait_ready(url: &str, within: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    while started.elapsed() < within {
        if ureq::get(&format!("{url}/ready")).timeout(Duration::from_secs(2)).call().is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("{url} was not ready within {} s", within.as_secs())
}

/// A free loopback port.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Sums a counter over a node's `/metrics` (every label set).
fn scrape(url: &str, name: &str) -> f64 {
    let Ok(resp) = ureq::get(&format!("{url}/metrics")).timeout(Duration::from_secs(5)).call() else { return 0.0 };
    let text = resp.into_string().unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Router decisions by reason, from its `/metrics`.
fn decisions(router: &str) -> Vec<(String, u64)> {
    let Ok(resp) = ureq::get(&format!("{router}/metrics")).call() else { return Vec::new() };
    let text = resp.into_string().unwrap_or_default();
    text.lines()
        .filter_map(|l| l.strip_prefix("kvgate:router_decisions_total{reason=\""))
        .filter_map(|l| {
            let (reason, rest) = l.split_once('"')?;
            Some((reason.to_string(), rest.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

/// The fleet of one setup.
struct Fleet {
    router: String,
    nodes: Vec<String>,
    _procs: Vec<Proc>,
}

/// Redis for the run: ours (started here) or the one given.
struct Redis {
    url: String,
    proc: Option<Proc>,
}

impl Redis {
    fn start(o: &ClusterOptions) -> anyhow::Result<Self> {
        if let Some(url) = &o.redis_url {
            return Ok(Self { url: url.clone(), proc: None });
        }
        let port = free_port()?;
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        cmd.args(["--maxmemory", "4gb", "--maxmemory-policy", "volatile-lru"]);
        cmd.args(["--client-output-buffer-limit", "normal", "0", "0", "0"]);
        let (proc, _) = Proc::start(cmd, "redis-server", "Ready to accept connections")
            .context("redis-server (Debian's package `redis-server`; or pass --redis-url)")?;
        Ok(Self { url: format!("redis://127.0.0.1:{port}"), proc: Some(proc) })
    }

    fn flush(&self) -> anyhow::Result<()> {
        let mut c = redis::Client::open(self.url.as_str())?.get_connection_with_timeout(Duration::from_secs(5))?;
        redis::cmd("FLUSHALL").query::<()>(&mut c)?;
        Ok(())
    }
}

fn start_fleet(o: &ClusterOptions, nodes: usize, remote: Option<&str>, policy: &str) -> anyhow::Result<Fleet> {
    let mut procs = Vec::new();
    let mut urls = Vec::new();
    for i in 0..nodes {
        let mut cmd = Command::new(&o.kvgate);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--threads", &o.threads.to_string()]);
        cmd.args(["--node-id", &format!("node{i}"), "--disk-budget-bytes", "0", "--no-watch-plugins"]);
        cmd.args(["--ram-budget-bytes", &o.ram_budget_bytes.to_string(), "--log", "error"]);
        if let Some(m) = &o.model {
            cmd.arg("--model").arg(m);
        }
        if let Some(r) = remote {
            cmd.args(["--remote-url", r]);
        }
        let (p, url) = Proc::start(cmd, &format!("node {i}"), "kvgate listening on")?;
        procs.push(p);
        urls.push(url);
    }
    for u in &urls {
        wait_ready(u, Duration::from_secs(120))?;
    }
    let mut cmd = Command::new(&o.kvgate);
    cmd.args(["route", "--listen", "127.0.0.1:0", "--policy", policy, "--log", "error"]);
    for u in &urls {
        cmd.args(["--node", u]);
    }
    if let Some(m) = &o.model {
        cmd.arg("--model").arg(m);
    }
    if let Some(r) = remote {
        cmd.args(["--remote-url", r]);
    }
    let (p, router) = Proc::start(cmd, "router", "kvgate router listening on")?;
    procs.push(p);
    wait_ready(&router, Duration::from_secs(30))?;
    Ok(Fleet { router, nodes: urls, _procs: procs })
}

/// Sends `bodies` through `url` from `clients` threads in order; (sample or error, seconds
/// since the start when it began) per request.
fn drive(url: &str, bodies: &[serde_json::Value], clients: usize, max_tokens: usize) -> Vec<Result<Sample, String>> {
    let next = Mutex::new(0usize);
    let out: Mutex<Vec<Option<Result<Sample, String>>>> = Mutex::new(vec![None; bodies.len()]);
    std::thread::scope(|s| {
        for _ in 0..clients.max(1) {
            s.spawn(|| {
                let mode = Mode { url, cache: "compose", budget: None };
                loop {
                    let i = {
                        let mut n = next.lock().unwrap();
                        if *n >= bodies.len() {
                            return;
                        }
                        *n += 1;
                        *n - 1
                    };
                    let r = client::chat(&mode, &bodies[i], max_tokens).map_err(|e| e.to_string());
                    out.lock().unwrap()[i] = Some(r);
                }
            });
        }
    });
    out.into_inner().unwrap().into_iter().map(|r| r.expect("every request ran")).collect()
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Runs one setup from empty caches.
fn run_setup(
    o: &ClusterOptions,
    setup: &str,
    redis: &Redis,
    corpus: &[String],
    bodies: &[serde_json::Value],
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<SetupReport> {
    let (nodes, shared, policy) = match setup {
        "one-node" => (1, false, "round-robin"),
        "round-robin/own" => (o.nodes, false, "round-robin"),
        "round-robin/shared" => (o.nodes, true, "round-robin"),
        "cache-aware/shared" | "cache-aware/shared+hang" | "ingest+cache-aware/shared" => {
            (o.nodes, true, "cache-aware")
        }
        other => bail!("unknown setup `{other}` (one of: {})", SETUPS.join(", ")),
    };
    redis.flush()?;
    let fleet = start_fleet(o, nodes, shared.then_some(redis.url.as_str()), policy)?;
    if setup.starts_with("ingest") {
        progress(&format!("{setup}: ingesting {} passages", corpus.len()));
        for batch in corpus.chunks(8) {
            let docs: Vec<_> = batch.iter().map(|t| json!({"text": t})).collect();
            ureq::post(&format!("{}/v1/kvgate/ingest", fleet.router))
                .timeout(Duration::from_secs(600))
                .send_string(&json!({"documents": docs}).to_string())
                .map_err(|e| anyhow::anyhow!("ingest failed: {e}"))?;
        }
        // Let every node's tailer (and the router's) see the last chunks.
        std::thread::sleep(Duration::from_secs(1));
    }
    progress(&format!("{setup}: {} requests over {nodes} node(s), {} clients", bodies.len(), o.clients));
    let started = Instant::now();
    let results = if setup.ends_with("+hang") {
        let Some(p) = redis.proc.as_ref() else {
            bail!("the hang setup needs the Redis this bench starts (no --redis-url)")
        };
        std::thread::scope(|s| {
            let hang = s.spawn(|| {
                std::thread::sleep(Duration::from_secs(o.hang_after_secs));
                p.signal(libc::SIGSTOP);
                let stopped = Instant::now();
                std::thread::sleep(Duration::from_secs(o.hang_secs));
                p.signal(libc::SIGCONT);
                stopped.elapsed().as_secs_f64()
            });
            let r = drive(&fleet.router, bodies, o.clients, o.max_tokens);
            let hung = hang.join().unwrap_or(0.0);
            progress(&format!("{setup}: Redis was stopped for {hung:.1} s, from {} s in", o.hang_after_secs));
            r
        })
    } else {
        drive(&fleet.router, bodies, o.clients, o.max_tokens)
    };
    let wall_s = started.elapsed().as_secs_f64();
    let ok: Vec<&Sample> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    for e in results.iter().filter_map(|r| r.as_ref().err()).take(3) {
        progress(&format!("{setup}: failed request: {e}"));
    }
    let prompt: usize = ok.iter().map(|s| s.prompt_tokens).sum();
    let reused: usize = ok.iter().map(|s| s.reused_tokens).sum();
    let computed: usize = ok.iter().map(|s| s.prompt_tokens - s.reused_tokens + s.recomputed_tokens).sum();
    let mut ttft: Vec<f64> = ok.iter().map(|s| s.ttft_s).collect();
    ttft.sort_by(f64::total_cmp);
    let mut per_node = std::collections::HashMap::<String, usize>::new();
    for s in &ok {
        *per_node.entry(s.node.clone().unwrap_or_default()).or_default() += 1;
    }
    let redis_bytes: f64 = fleet.nodes.iter().map(|u| scrape(u, "kvgate:chunk_store_remote_read_bytes_total")).sum();
    let n = ok.len().max(1) as f64;
    Ok(SetupReport {
        setup: setup.to_string(),
        nodes,
        requests: results.len(),
        failures: results.len() - ok.len(),
        mean_prompt_tokens: prompt as f64 / n,
        reuse: reused as f64 / prompt.max(1) as f64,
        computed_per_request: computed as f64 / n,
        ttft_p50_s: quantile(&ttft, 0.5),
        ttft_p95_s: quantile(&ttft, 0.95),
        ttft_p99_s: quantile(&ttft, 0.99),
        max_node_requests: per_node.values().copied().max().unwrap_or(0),
        mean_node_requests: ok.len() as f64 / nodes as f64,
        redis_bytes_per_request: redis_bytes / n,
        wall_s,
        decisions: decisions(&fleet.router),
    })
}

/// Runs every setup asked for.
pub fn run(o: &ClusterOptions, mut progress: impl FnMut(&str)) -> anyhow::Result<ClusterReport> {
    for s in &o.setups {
        if !SETUPS.contains(&s.as_str()) {
            bail!("unknown setup `{s}` (one of: {})", SETUPS.join(", "));
        }
    }
    if o.nodes == 0 || o.clients == 0 || o.requests == 0 {
        bail!("--nodes, --clients and --requests must be at least 1");
    }
    let passages = trace::passages(&o.corpus, o.passage_words)?;
    if passages.len() < o.k {
        bail!("the corpus {} has {} passages; a request needs {}", o.corpus.display(), passages.len(), o.k);
    }
    let t = TraceOptions { shape: Shape::Joined(Label::Passage), k: o.k, pool: o.pool, zipf_s: o.zipf_s, seed: o.seed };
    let corpus = trace::corpus(&passages, &t);
    let bodies: Vec<serde_json::Value> =
        trace::prompts(&passages, &t, o.requests).into_iter().map(|r| r.body).collect();
    let redis = Redis::start(o)?;
    let mut setups = Vec::new();
    for s in &o.setups {
        let r = run_setup(o, s, &redis, &corpus, &bodies, &mut progress)?;
        progress(&format!(
            "{s}: reuse {:.3}, {:.0} tokens computed/request, TTFT p50 {:.3} s p95 {:.3} s p99 {:.3} s, \
             max/mean load {:.2}, {} failures",
            r.reuse,
            r.computed_per_request,
            r.ttft_p50_s,
            r.ttft_p95_s,
            r.ttft_p99_s,
            r.max_node_requests as f64 / r.mean_node_requests.max(1e-9),
            r.failures
        ));
        setups.push(r);
    }
    Ok(ClusterReport {
        nodes: o.nodes,
        corpus_passages: corpus.len(),
        ram_budget_bytes: o.ram_budget_bytes,
        clients: o.clients,
        setups,
    })
}

/// The report as a table, each figure beside one node's.
pub fn table(r: &ClusterReport) -> String {
    let one = r.setups.iter().find(|s| s.setup == "one-node");
    let mut s = format!(
        "{} nodes, {} passages in the trace's corpus, {} MiB RAM tier per node, {} clients\n",
        r.nodes,
        r.corpus_passages,
        r.ram_budget_bytes >> 20,
        r.clients
    );
    s += "setup                      reuse  (of 1 node)  computed/req  (of 1 node)  TTFT p50  p95     p99     max/mean  Redis KB/req  failures\n";
    for x in &r.setups {
        let rel =
            |v: f64, base: Option<f64>| base.filter(|b| *b > 0.0).map_or("-".to_string(), |b| format!("{:.3}", v / b));
        s += &format!(
            "{:<26} {:.3}  {:>11}  {:>12.0}  {:>11}  {:>8.3}  {:.3}  {:.3}  {:>8.2}  {:>12.0}  {:>8}\n",
            x.setup,
            x.reuse,
            rel(x.reuse, one.map(|o| o.reuse)),
            x.computed_per_request,
            rel(x.computed_per_request, one.map(|o| o.computed_per_request)),
            x.ttft_p50_s,
            x.ttft_p95_s,
            x.ttft_p99_s,
            x.max_node_requests as f64 / x.mean_node_requests.max(1e-9),
            x.redis_bytes_per_request / 1024.0,
            x.failures
        );
    }
    s
}
