//! `kvgate route`: one OpenAI-compatible endpoint in front of a fleet of kvgate nodes, each
//! request sent to the node expected to answer it first ([`crate::fleet`]).
//!
//! A chat or completion request is read, its prompt rendered and tokenized as a node would
//! (the model's tokenizer and chat template, no weights), and looked up in the fleet index in
//! the namespaces its key's tenant reads (the router's `[[api_key]]`s and shared namespaces
//! are the nodes'). The chosen node gets the request as it came (body untouched, the client's
//! own key), plus `x-kvgate-routed-by`; its answer is relayed as it arrives, with
//! `x-kvgate-node` naming the node. A node that cannot be connected to never received the
//! request, so it goes to the next choice — once; a node that fails after that is a 502, never
//! a second delivery. A request that already carries `x-kvgate-routed-by` (a router listed as
//! a node of another) is refused with 508 instead of going round.
//!
//! Every other endpoint a node has (`/v1/models`, `/tokenize`, `/v1/kvgate/ingest`, …) goes
//! to the least loaded node; `/admin/` stays with each node.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;

use super::auth::{self, Gate};
use super::error::ApiError;
use super::openai::{self, Endpoint};
use super::upstream::{self, Progress};
use super::{Body, error_reply, full, hold, json_response, read_body};
use crate::blend::CacheMode;
use crate::config::Config;
use crate::engine::template::ChatTemplate;
use crate::engine::tokenizer::Tokenizer;
use crate::fleet::{self, Ask, FleetIndex, Node, NodeReport, Reason, Rules};

/// The header a router adds to what it forwards.
pub const ROUTED_BY: &str = "x-kvgate-routed-by";
/// The header naming the node that answered.
pub const NODE_HEADER: &str = "x-kvgate-node";

/// Longest wait for a node's answer to begin, and between two pieces of it.
const NODE_IDLE: Duration = Duration::from_secs(300);

/// Headers that belong to one connection, never forwarded.
const HOP_BY_HOP: [&str; 8] =
    ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer", "host"];

/// The router: its nodes, what it knows of the fleet's chunks, and its counters.
pub struct Router {
    nodes: Vec<Arc<Node>>,
    index: Arc<FleetIndex>,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    gate: Arc<Gate>,
    rules: Rules,
    poll_every: Duration,
    node_timeout: Duration,
    client: Client<HttpConnector, Full<Bytes>>,
    max_body_bytes: usize,
    remote_url: Option<String>,
    /// The event stream followed, once a node has named it.
    following: Mutex<Option<String>>,
    /// This router's name in `x-kvgate-routed-by`.
    name: String,
    turn: AtomicUsize,
    decisions: [AtomicU64; 4],
    /// Requests refused: already routed (508), no node up (503).
    loops: AtomicU64,
    unroutable: AtomicU64,
    prompt_tokens: AtomicU64,
    /// Prompt tokens stored anywhere in the fleet, and of those held by the chosen node.
    stored_tokens: AtomicU64,
    local_tokens: AtomicU64,
    /// Tokens the chosen nodes were expected to compute, and the requests estimated.
    compute_tokens: AtomicU64,
    estimated: AtomicU64,
}

impl Router {
    /// A router over `config.router.nodes`, tokenizing with `tokenizer` and `template`.
    pub fn new(config: &Config, tokenizer: Tokenizer, template: ChatTemplate) -> Result<Arc<Self>, String> {
        let r = &config.router;
        if r.nodes.is_empty() {
            return Err("no nodes to route to: give --node URL (repeatable) or [router] nodes".into());
        }
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(Duration::from_millis(r.node_timeout_ms)));
        http.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(http);
        Ok(Arc::new(Self {
            nodes: r.nodes.iter().map(|u| Arc::new(Node::new(u))).collect(),
            index: Arc::new(FleetIndex::new(config.min_span)),
            tokenizer,
            template,
            gate: Arc::new(Gate::new(config)?),
            rules: Rules {
                policy: r.policy,
                balance_abs: r.balance_abs_threshold,
                balance_rel: r.balance_rel_threshold,
                fetch_cost: r.fetch_cost,
            },
            poll_every: Duration::from_millis(r.poll_ms),
            node_timeout: Duration::from_millis(r.node_timeout_ms),
            client,
            max_body_bytes: config.max_body_bytes,
            remote_url: config.remote_url.clone(),
            following: Mutex::new(None),
            name: config.node_name(),
            turn: AtomicUsize::new(0),
            decisions: Default::default(),
            loops: AtomicU64::new(0),
            unroutable: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            stored_tokens: AtomicU64::new(0),
            local_tokens: AtomicU64::new(0),
            compute_tokens: AtomicU64::new(0),
            estimated: AtomicU64::new(0),
        }))
    }

    pub fn nodes(&self) -> &[Arc<Node>] {
        &self.nodes
    }

    pub fn index(&self) -> &Arc<FleetIndex> {
        &self.index
    }

    /// Starts polling every node (and following the event stream once one names it).
    pub fn watch(self: &Arc<Self>) {
        if self.remote_url.is_none() && self.rules.policy == crate::config::RoutePolicy::CacheAware {
            tracing::warn!("router: no remote_url, so no fleet index: cache-aware routing weighs load only");
        }
        for node in self.nodes.clone() {
            let me = Arc::downgrade(self);
            tokio::spawn(async move {
                loop {
                    let Some(me) = me.upgrade() else { return };
                    let report = me.poll(&node).await;
                    if let Some(events) = report.as_ref().and_then(|r| r.events.clone()) {
                        me.follow(&events);
                    }
                    node.polled(report);
                    let every = me.poll_every;
                    drop(me);
                    tokio::time::sleep(every).await;
                }
            });
        }
    }

    /// One poll of `GET <node>/v1/kvgate/node`; `None` if it fails or takes too long.
    async fn poll(&self, node: &Node) -> Option<NodeReport> {
        let req = Request::get(format!("{}/v1/kvgate/node", node.url))
            .body(Full::new(Bytes::new()))
            .expect("a valid request");
        let answer = tokio::time::timeout(self.node_timeout, async {
            let resp = self.client.request(req).await.ok()?;
            if !resp.status().is_success() {
                return None;
            }
            let body = resp.into_body().collect().await.ok()?.to_bytes();
            serde_json::from_slice::<NodeReport>(&body).ok()
        });
        answer.await.ok().flatten()
    }

    /// Follows `events` on the shared tier, the first time a node names it.
    fn follow(&self, events: &str) {
        let Some(url) = &self.remote_url else { return };
        let mut following = self.following.lock().unwrap();
        match following.as_deref() {
            Some(f) if f == events => {}
            Some(f) => {
                tracing::warn!(followed = %f, other = %events, "router: a node writes another event stream (another model or element type?)")
            }
            None => match self.index.follow(url, events.to_string()) {
                Ok(_) => {
                    tracing::info!(stream = %events, "router: following the fleet's chunk events");
                    *following = Some(events.to_string());
                }
                Err(e) => tracing::error!(error = %e, "router: cannot follow the fleet's chunk events"),
            },
        }
    }

    /// The model the nodes serve (as the first node that reported says).
    fn model(&self) -> Option<String> {
        self.nodes.iter().find_map(|n| n.report()).map(|r| r.model)
    }

    /// `/metrics`.
    pub fn metrics(&self) -> String {
        let mut s = String::new();
        let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, u64)>| {
            s += &format!("# HELP kvgate:{name} {help}\n# TYPE kvgate:{name} {kind}\n");
            for (labels, v) in rows {
                s += &format!("kvgate:{name}{labels} {v}\n");
            }
        };
        let per_node = |f: &dyn Fn(&Node) -> u64| -> Vec<(String, u64)> {
            self.nodes.iter().map(|n| (format!("{{node=\"{}\"}}", n.url), f(n))).collect()
        };
        family(
            "router_node_up",
            "gauge",
            "Whether the node answered its last poll in time.",
            per_node(&|n| n.is_up() as u64),
        );
        family(
            "router_requests_total",
            "counter",
            "Requests sent to the node.",
            per_node(&|n| n.requests.load(Ordering::Relaxed)),
        );
        family(
            "router_in_flight",
            "gauge",
            "Requests of this router on the node.",
            per_node(&|n| n.in_flight.load(Ordering::Relaxed) as u64),
        );
        family(
            "router_node_failures_total",
            "counter",
            "Requests the node could not be reached for, or whose answer broke off.",
            per_node(&|n| n.failures.load(Ordering::Relaxed)),
        );
        let reasons = Reason::ALL
            .iter()
            .map(|r| (format!("{{reason=\"{}\"}}", r.name()), self.decisions[*r as usize].load(Ordering::Relaxed)))
            .collect();
        family("router_decisions_total", "counter", "Choices of a node, by reason.", reasons);
        let refused = vec![
            ("{why=\"loop\"}".into(), self.loops.load(Ordering::Relaxed)),
            ("{why=\"no_node\"}".into(), self.unroutable.load(Ordering::Relaxed)),
        ];
        family("router_refused_total", "counter", "Requests refused: already routed (508), no node up (503).", refused);
        let one = |v: &AtomicU64| vec![(String::new(), v.load(Ordering::Relaxed))];
        family("router_prompt_tokens_total", "counter", "Prompt tokens of routed requests.", one(&self.prompt_tokens));
        family(
            "router_stored_tokens_total",
            "counter",
            "Of those, tokens stored anywhere in the fleet.",
            one(&self.stored_tokens),
        );
        family(
            "router_local_tokens_total",
            "counter",
            "Of those, tokens the chosen node held locally.",
            one(&self.local_tokens),
        );
        family(
            "router_index_chunks",
            "gauge",
            "Chunks the fleet index knows.",
            vec![(String::new(), self.index.len() as u64)],
        );
        family("router_index_events_total", "counter", "Chunk events applied.", one(&self.index.events));
        family(
            "router_index_up",
            "gauge",
            "Whether the event stream answered its last read.",
            vec![(String::new(), self.index.up.load(Ordering::Relaxed) as u64)],
        );
        s
    }

    /// `/ready`: 200 while some node is up.
    fn ready(&self) -> Result<Response<Body>, ApiError> {
        let nodes: Vec<_> = self
            .nodes
            .iter()
            .map(|n| {
                let r = n.report().unwrap_or_default();
                json!({
                    "url": n.url, "node": n.name(), "up": n.is_up(), "in_flight": n.in_flight.load(Ordering::Relaxed),
                    "waiting": r.waiting, "running": r.running,
                })
            })
            .collect();
        let up = self.nodes.iter().filter(|n| n.is_up()).count();
        if up == 0 {
            return Err(ApiError { message: "no node is up".into(), ..ApiError::not_ready() });
        }
        let index = json!({"following": self.following.lock().unwrap().is_some(), "up": self.index.up.load(Ordering::Relaxed), "chunks": self.index.len()});
        Ok(json_response(StatusCode::OK, &json!({"status": "ready", "nodes": nodes, "index": index})))
    }

    /// What a prompt asks of each node: (ask, per-node local tokens). `None` when the body is
    /// not one a node would accept (the node says why) or not in compose mode.
    fn estimate(
        &self,
        endpoint: Endpoint,
        headers: &HeaderMap,
        body: &[u8],
        read: &[u64],
    ) -> Option<(Ask, Vec<usize>)> {
        let model = self.model()?;
        let parsed = openai::parse(endpoint, body, &model).ok()?;
        let header_mode = headers.get("x-kvgate-cache").and_then(|m| m.to_str().ok()).map(openai::parse_cache_mode);
        let mode = match header_mode {
            Some(m) => m.ok()?,
            None => match parsed.generate.cache_mode {
                Some(m) => m,
                None => self.nodes.iter().find_map(|n| n.report()).and_then(|r| r.cache_mode.parse().ok())?,
            },
        };
        let (ids, _) =
            crate::scheduler::encode_prompt(&self.tokenizer, &self.template, &parsed.generate.prompt).ok()?;
        let names: Vec<String> = self.nodes.iter().map(|n| n.name()).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let reuse = match mode {
            CacheMode::Compose => self.index.reuse(&ids, read, &names),
            _ => fleet::Reuse { total: 0, local: vec![0; names.len()] },
        };
        let done = self.estimated.load(Ordering::Relaxed).max(1);
        let ask = Ask {
            prompt_tokens: ids.len(),
            stored: reuse.total,
            mean_compute: (self.compute_tokens.load(Ordering::Relaxed) / done) as usize,
            turn: 0,
        };
        Some((ask, reuse.local))
    }

    /// Chooses a node among those not `tried`.
    fn choose(&self, ask: &Ask, local: &[usize], tried: &[usize]) -> Option<(usize, Reason)> {
        let candidates: Vec<fleet::Candidate> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let mut c = n.candidate(local.get(i).copied().unwrap_or(0));
                c.up &= !tried.contains(&i);
                c
            })
            .collect();
        let ask = Ask { turn: self.turn.fetch_add(1, Ordering::Relaxed), ..*ask };
        fleet::choose(&candidates, &ask, &self.rules)
    }

    /// Sends the request to node `i`, expected to compute `compute` tokens; `Err(None)` when
    /// the node could not be connected to (it never got the request).
    async fn send(&self, i: usize, f: &Forward<'_>, compute: usize) -> Result<Response<Body>, Option<ApiError>> {
        let node = &self.nodes[i];
        let mut req = Request::builder().method(f.method.clone()).uri(format!("{}{}", node.url, f.path_and_query));
        for (name, value) in f.headers {
            if !HOP_BY_HOP.contains(&name.as_str()) && name != ROUTED_BY && name != hyper::header::CONTENT_LENGTH {
                req = req.header(name, value);
            }
        }
        req = req.header("x-request-id", f.request_id).header(ROUTED_BY, &self.name);
        let req = req
            .body(Full::new(f.body.clone()))
            .map_err(|e| Some(ApiError::internal(format!("building the request: {e}"))))?;
        let watch = Watch::start(node.clone(), compute);
        let resp = match tokio::time::timeout(NODE_IDLE, self.client.request(req)).await {
            Err(_) => {
                node.failures.fetch_add(1, Ordering::Relaxed);
                let secs = NODE_IDLE.as_secs();
                return Err(Some(ApiError::timeout(
                    "node_timeout",
                    format!("node {} did not answer within {secs} s", node.url),
                )));
            }
            Ok(Err(e)) if e.is_connect() => {
                node.failed();
                return Err(None);
            }
            Ok(Err(e)) => {
                node.failures.fetch_add(1, Ordering::Relaxed);
                return Err(Some(ApiError::bad_gateway(format!("node {} failed: {e}", node.url))));
            }
            Ok(Ok(r)) => r,
        };
        let retry_after = resp.headers().get(hyper::header::RETRY_AFTER).cloned();
        let mut out = upstream::relay(resp, NODE_IDLE, &node.url, Some(Box::new(watch))).await.map_err(Some)?;
        let h = out.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&node.name()) {
            h.insert(HeaderName::from_static(NODE_HEADER), v);
        }
        if let Some(v) = retry_after {
            h.insert(hyper::header::RETRY_AFTER, v);
        }
        Ok(out)
    }

    /// Routes one request: chooses, sends, and on a failed connection chooses once more.
    async fn dispatch(
        &self,
        choice: Option<(usize, Reason)>,
        retry: impl Fn(&[usize]) -> Option<(usize, Reason)>,
        f: &Forward<'_>,
        compute: impl Fn(usize) -> usize,
    ) -> Result<Response<Body>, ApiError> {
        let mut tried = Vec::new();
        let mut choice = choice;
        loop {
            let Some((i, reason)) = choice else {
                self.unroutable.fetch_add(1, Ordering::Relaxed);
                let what = if tried.is_empty() { "no node is up" } else { "no node could be reached" };
                return Err(ApiError { message: format!("{what}; retry shortly"), ..ApiError::not_ready() });
            };
            self.decisions[reason as usize].fetch_add(1, Ordering::Relaxed);
            self.nodes[i].requests.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(node = %self.nodes[i].url, reason = reason.name(), "routed");
            match self.send(i, f, compute(i)).await {
                Ok(r) => return Ok(r),
                Err(Some(e)) => return Err(e),
                Err(None) if tried.is_empty() => {
                    tried.push(i);
                    choice = retry(&tried).map(|(j, _)| (j, Reason::Retry));
                }
                Err(None) => {
                    return Err(ApiError::bad_gateway(format!("node {} could not be reached", self.nodes[i].url)));
                }
            }
        }
    }
}

/// A request as it goes to a node.
struct Forward<'a> {
    path_and_query: &'a str,
    method: &'a Method,
    headers: &'a HeaderMap,
    body: Bytes,
    request_id: &'a str,
}

/// A request on a node, counted until its answer ends (dropped: however it ends).
struct Watch {
    node: Arc<Node>,
    compute: usize,
    starting: bool,
}

impl Watch {
    fn start(node: Arc<Node>, compute: usize) -> Self {
        node.in_flight.fetch_add(1, Ordering::Relaxed);
        node.starting.fetch_add(1, Ordering::Relaxed);
        node.starting_tokens.fetch_add(compute, Ordering::Relaxed);
        Self { node, compute, starting: true }
    }
}

impl Progress for Watch {
    fn first_piece(&mut self) {
        if std::mem::replace(&mut self.starting, false) {
            self.node.starting.fetch_sub(1, Ordering::Relaxed);
            self.node.starting_tokens.fetch_sub(self.compute, Ordering::Relaxed);
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.first_piece();
        self.node.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves the router on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Arc<Router>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    super::serve_connections(listener, shutdown, move |req| {
        let router = router.clone();
        async move { Ok::<_, Infallible>(handle(&router, req).await) }
    })
    .await
}

async fn handle(router: &Router, req: Request<Incoming>) -> Response<Body> {
    let id = auth::request_id(req.headers());
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let mut resp = match route(router, req, &id).await {
        Ok(r) => r,
        Err(e) => {
            if e.status.is_server_error() && e.code != "not_ready" {
                tracing::warn!(status = %e.status, message = %e.message, "request failed");
            }
            error_reply(&e)
        }
    };
    tracing::info!(%method, %path, status = resp.status().as_u16(), "request");
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

async fn route(router: &Router, req: Request<Incoming>, id: &str) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_string();
    let path_and_query = req.uri().path_and_query().map_or(path.clone(), |p| p.to_string());
    let method = req.method().clone();
    let allowed = match path.as_str() {
        "/v1/chat/completions" | "/v1/completions" | "/tokenize" | "/detokenize" | "/v1/kvgate/ingest" => "POST",
        "/v1/models" | "/health" | "/ready" | "/metrics" | "/tokenizer_info" => "GET",
        p if p.starts_with("/admin/") => {
            return Err(ApiError::not_found("admin_per_node", "admin endpoints are per node: call the node itself"));
        }
        _ => return Err(ApiError::route_not_found(&path)),
    };
    if method != allowed && !(method == Method::HEAD && allowed == "GET") {
        return Err(ApiError::method_not_allowed(&method, &path, allowed));
    }
    match path.as_str() {
        "/health" => return Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
        "/ready" => return router.ready(),
        "/metrics" => {
            return Ok(Response::builder()
                .header(CONTENT_TYPE, "text/plain; version=0.0.4")
                .body(full(router.metrics()))
                .expect("valid response"));
        }
        _ => {}
    }
    if let Some(by) = req.headers().get(ROUTED_BY) {
        router.loops.fetch_add(1, Ordering::Relaxed);
        let by = by.to_str().unwrap_or("?");
        return Err(ApiError {
            status: StatusCode::LOOP_DETECTED,
            code: "loop_detected",
            ..ApiError::internal(format!(
                "this request was already routed by `{by}`: a router is listed as a node of another (list kvgate nodes only)"
            ))
        });
    }
    let headers = req.headers().clone();
    let endpoint = match path.as_str() {
        "/v1/chat/completions" => Some(Endpoint::Chat),
        "/v1/completions" => Some(Endpoint::Completion),
        _ => None,
    };
    // The key is checked here too (the same keys as the nodes'): its tenant says which
    // namespaces the prompt is looked up in, and its limits hold at the door.
    let caller = router.gate.admit(&headers)?;
    let body = read_body(req, router.max_body_bytes).await?;
    let request = Forward {
        path_and_query: &path_and_query,
        method: &method,
        headers: &headers,
        body: body.clone(),
        request_id: id,
    };
    let Some(endpoint) = endpoint else {
        // Any node answers these alike: the least loaded one.
        let pick = |tried: &[usize]| {
            let c: Vec<fleet::Candidate> = router
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| fleet::Candidate { up: n.is_up() && !tried.contains(&i), ..n.candidate(0) })
                .collect();
            fleet::least_loaded(&c).map(|i| (i, Reason::Balance))
        };
        let resp = router.dispatch(pick(&[]), pick, &request, |_| 0).await?;
        return Ok(hold(resp, caller.permit));
    };
    let read = router.gate.scope(&caller.tenant, None).map(|s| s.read_ids()).unwrap_or_default();
    let (ask, local) = match router.estimate(endpoint, &headers, &body, &read) {
        Some(e) => e,
        None => (Ask::default(), vec![0; router.nodes.len()]),
    };
    let compute = |i: usize| fleet::work(&router.nodes[i].candidate(local[i]), &ask).0;
    let first = router.choose(&ask, &local, &[]);
    if let Some((i, _)) = first {
        router.prompt_tokens.fetch_add(ask.prompt_tokens as u64, Ordering::Relaxed);
        router.stored_tokens.fetch_add(ask.stored as u64, Ordering::Relaxed);
        router.local_tokens.fetch_add(local[i] as u64, Ordering::Relaxed);
        router.compute_tokens.fetch_add(compute(i) as u64, Ordering::Relaxed);
        router.estimated.fetch_add(1, Ordering::Relaxed);
    }
    let resp = router.dispatch(first, |tried| router.choose(&ask, &local, tried), &request, compute).await?;
    Ok(hold(resp, caller.permit))
}
