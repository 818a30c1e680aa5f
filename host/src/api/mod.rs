//! The HTTP front: an OpenAI-compatible API on hyper, plus health, readiness and metrics.
//!
//! Owns sockets, routing, request bodies, JSON and SSE framing. The only module that knows
//! hyper. It never runs model work: requests are validated here, handed to the scheduler's
//! queue, and answered from the scheduler's event channel.
//!
//! Every request gets an id (its `x-request-id`, or a new one), sent back on the response and
//! carried by its log lines and its upstream call. The API (`/v1/*`, `/tokenize`, …) asks the
//! [`auth::Gate`] who the caller is; requests for a model an upstream serves are passed on
//! ([`upstream`]), the others go to the scheduler in the tenant's chunk-store namespaces.
//!
//! - [`openai`]: request validation and response shapes.
//! - [`auth`]: API keys, tenants, per-key limits, namespaces, request ids.
//! - [`upstream`]: passing requests to other OpenAI-compatible servers.
//! - [`route`]: `kvgate route`, the router in front of a fleet of nodes.
//! - [`admin`]: the operator endpoints (chunk store), behind the admin token.
//! - [`error`]: OpenAI-shaped errors and their status codes.

mod admin;
pub mod auth;
pub mod error;
mod ingest;
pub mod openai;
pub mod route;
pub mod upstream;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::engine::LoadedModel;
use crate::metrics::Metrics;
use crate::scheduler::{Event, FinishReason, PromptToken, Scheduler, Usage};
use auth::{Gate, Permit};
use error::ApiError;
use openai::{Endpoint, Logprobs, ParsedRequest};
use tracing::Instrument;
use upstream::Upstreams;

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// How long shutdown waits for requests in flight before closing their connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// What every request handler shares.
pub struct AppState {
    /// Set once the model is loaded; until then `/ready` and the API answer 503.
    pub scheduler: OnceLock<Scheduler>,
    pub metrics: Metrics,
    /// Largest request body accepted (413 above).
    pub max_body_bytes: usize,
    /// When set, `/admin/` requests must carry it as a bearer token.
    pub admin_token: Option<String>,
    pub gate: Arc<Gate>,
    pub upstreams: Arc<Upstreams>,
    /// Longest prompt and most generated tokens a request may have (0: the context's).
    pub max_prompt_tokens: usize,
    pub max_completion_tokens: usize,
    /// Longest a request may run (`None`: no limit).
    pub request_timeout: Option<Duration>,
    /// What `/v1/kvgate/node` says of this node besides its queue.
    pub node: NodeIdentity,
}

/// This node as a router sees it (see [`crate::fleet::NodeReport`]).
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub name: String,
    pub cache_mode: crate::blend::CacheMode,
    pub min_span: usize,
}

impl AppState {
    /// The state of a server with these settings (an unreadable keys file is an error).
    pub fn new(config: &Config) -> Result<Self, String> {
        Ok(Self {
            scheduler: OnceLock::new(),
            metrics: Metrics::default(),
            max_body_bytes: config.max_body_bytes,
            admin_token: config.admin_token.clone(),
            gate: Arc::new(Gate::new(config)?),
            upstreams: Arc::new(Upstreams::new(&config.upstreams)),
            max_prompt_tokens: config.max_prompt_tokens,
            max_completion_tokens: config.max_completion_tokens,
            request_timeout: (config.request_timeout_secs > 0)
                .then(|| Duration::from_secs(config.request_timeout_secs)),
            node: NodeIdentity { name: config.node_name(), cache_mode: config.cache_mode, min_span: config.min_span },
        })
    }

    /// Starts the background work of the gateway: keys-file reloads, upstream health.
    pub fn watch(&self) {
        self.gate.watch();
        self.upstreams.watch();
        if self.gate.is_open() {
            tracing::warn!("no API key is configured: anyone who can reach this port may use the API");
        }
    }
}

/// Serves HTTP on `listener` until `shutdown` resolves, then lets requests in flight finish
/// (up to [`SHUTDOWN_GRACE`]).
pub async fn serve(listener: TcpListener, state: Arc<AppState>, shutdown: impl Future<Output = ()>) {
    serve_connections(listener, shutdown, move |req| handle(state.clone(), req)).await
}

/// The connection loop of a server (the API's, the router's): each request to `handler`.
async fn serve_connections<F, Fut>(listener: TcpListener, shutdown: impl Future<Output = ()>, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let h = handler.clone();
                let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service_fn(h));
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: waiting for requests in flight");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(SHUTDOWN_GRACE) => tracing::warn!("grace period over: closing remaining connections"),
    }
}

async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let id = auth::request_id(req.headers());
    let span = tracing::info_span!("request", id = %id);
    let (method, path, started) = (req.method().clone(), req.uri().path().to_string(), Instant::now());
    let mut response = match route(&state, req, &id).instrument(span.clone()).await {
        Ok(r) => r,
        Err(e) => error_response(&state, &e),
    };
    // The access log: one line per request (a stream's when its headers go out).
    span.in_scope(|| {
        let ms = started.elapsed().as_secs_f64() * 1e3;
        tracing::info!(%method, %path, status = response.status().as_u16(), ms, "request");
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    Ok(response)
}

async fn route(state: &Arc<AppState>, req: Request<Incoming>, id: &str) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if path.starts_with("/admin/") {
        return admin::route(state, req).await;
    }
    let allowed = match path.as_str() {
        "/v1/chat/completions" | "/v1/completions" | "/tokenize" | "/detokenize" | "/v1/kvgate/ingest" => "POST",
        "/v1/models" | "/health" | "/ready" | "/metrics" | "/tokenizer_info" | "/v1/kvgate/node" => "GET",
        _ => return Err(ApiError::route_not_found(&path)),
    };
    if method != allowed && !(method == Method::HEAD && allowed == "GET") {
        return Err(ApiError::method_not_allowed(&method, &path, allowed));
    }
    let public =
        matches!(path.as_str(), "/health" | "/ready" | "/metrics" | "/v1/kvgate/node") && !state.gate.protect_health;
    let caller = match public {
        true => None,
        false => Some(state.gate.admit(req.headers()).inspect_err(|e| {
            let counter = match e.status {
                StatusCode::TOO_MANY_REQUESTS => &state.metrics.rejected_limits,
                _ => &state.metrics.rejected_auth,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        })?),
    };
    match path.as_str() {
        "/health" => Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
        "/ready" => match state.scheduler.get() {
            Some(scheduler) => {
                let mut body = json!({"status": "ready", "upstreams": state.upstreams.status()});
                // Ready either way (the local tiers serve); a router or an operator sees the fleet tier.
                if let Some(up) = scheduler.store().remote_up() {
                    body["remote_tier"] = json!(if up { "up" } else { "down" });
                }
                Ok(json_response(StatusCode::OK, &body))
            }
            None => Err(ApiError::not_ready()),
        },
        "/v1/kvgate/node" => {
            let engine = state.scheduler.get().ok_or_else(ApiError::not_ready)?;
            let stats = engine.stats();
            let report = crate::fleet::NodeReport {
                node: state.node.name.clone(),
                model: engine.model().name.clone(),
                events: engine.store().remote_events_key(),
                cache_mode: state.node.cache_mode.as_str().to_string(),
                min_span: state.node.min_span,
                waiting: stats.waiting.load(Ordering::Relaxed),
                running: stats.running.load(Ordering::Relaxed),
            };
            Ok(json_response(StatusCode::OK, &serde_json::to_value(report).expect("serializable")))
        }
        "/metrics" => Ok(Response::builder()
            .header(CONTENT_TYPE, "text/plain; version=0.0.4")
            .body(full({
                let engine = state.scheduler.get();
                let mut text = state.metrics.render(engine.map(Scheduler::stats), engine.map(|e| &**e.store().stats()));
                if let Some(p) = engine.and_then(Scheduler::policies) {
                    text.push_str(&p.metrics());
                }
                text.push_str(&state.upstreams.metrics());
                text
            }))
            .expect("valid response")),
        "/v1/models" => {
            let engine = state.scheduler.get().ok_or_else(ApiError::not_ready)?;
            let m = engine.model();
            let mut data = vec![json!({
                "id": m.name, "object": "model", "created": unix_now(), "owned_by": "kvgate",
                "max_model_len": m.model.config().context_length,
            })];
            for (model, upstream) in state.upstreams.models() {
                if model != m.name {
                    data.push(json!({"id": model, "object": "model", "created": unix_now(), "owned_by": upstream}));
                }
            }
            Ok(json_response(StatusCode::OK, &json!({"object": "list", "data": data})))
        }
        "/v1/chat/completions" => generate(state, req, Endpoint::Chat, caller.expect("checked above"), id).await,
        "/v1/kvgate/ingest" => ingest::ingest(state, req, caller.expect("checked above"), id).await,
        "/tokenize" => {
            let engine = state.scheduler.get().ok_or_else(ApiError::not_ready)?;
            let body = read_body(req, state.max_body_bytes).await?;
            let (prompt, special) = openai::parse_tokenize(&body, &engine.model().name)?;
            let ids = match (&prompt, special) {
                (crate::scheduler::Prompt::Text(t), false) => engine.model().tokenizer.encode(t)?.ids,
                _ => engine.tokenize(&prompt)?,
            };
            let max_model_len = engine.model().model.config().context_length;
            Ok(json_response(
                StatusCode::OK,
                &json!({"count": ids.len(), "max_model_len": max_model_len, "tokens": ids}),
            ))
        }
        "/tokenizer_info" => {
            let engine = state.scheduler.get().ok_or_else(ApiError::not_ready)?;
            let m = engine.model();
            let text = |s: &str| if s.is_empty() { Value::Null } else { json!(s) };
            Ok(json_response(
                StatusCode::OK,
                &json!({
                    "tokenizer_class": "GGUF byte-level BPE", "eos_token": text(m.tokenizer.eos_text()),
                    "bos_token": text(m.tokenizer.bos_text()), "pad_token": null,
                    "chat_template": m.template.source(), "model_max_length": m.model.config().context_length,
                }),
            ))
        }
        "/detokenize" => {
            let engine = state.scheduler.get().ok_or_else(ApiError::not_ready)?;
            let body = read_body(req, state.max_body_bytes).await?;
            let ids = openai::parse_detokenize(&body)?;
            let m = engine.model();
            if let Some(&bad) = ids.iter().find(|&&t| t as usize >= m.tokenizer.vocab_size()) {
                return Err(
                    crate::engine::EngineError::InvalidToken { id: bad, vocab: m.tokenizer.vocab_size() }.into()
                );
            }
            Ok(json_response(StatusCode::OK, &json!({"prompt": m.tokenizer.decode(&ids)})))
        }
        _ => generate(state, req, Endpoint::Completion, caller.expect("checked above"), id).await,
    }
}

/// Reads the body, refusing anything over the limit without keeping it.
///
/// A body over the limit is still read (and dropped) up to [`DRAIN_FACTOR`] times the limit
/// for at most [`DRAIN_FOR`], as nginx's lingering close does: closing a connection whose
/// request is still arriving resets it, and the client, still writing, never reads the 413.
async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let mut body = req.into_body();
    if declared.is_some_and(|n| n > limit as u64) {
        drain(&mut body, limit.saturating_mul(DRAIN_FACTOR)).await;
        return Err(ApiError::body_too_large(limit));
    }
    let mut kept = Vec::with_capacity(declared.map_or(0, |n| n as usize));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::invalid(None, format!("could not read the request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if kept.len() + data.len() > limit {
                drain(&mut body, limit.saturating_mul(DRAIN_FACTOR)).await;
                return Err(ApiError::body_too_large(limit));
            }
            kept.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(kept))
}

/// How much of an oversized body is read before the 413, in multiples of the limit.
const DRAIN_FACTOR: usize = 16;
/// How long an oversized body is read before the 413.
const DRAIN_FOR: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads and drops up to `cap` bytes of `body`, for at most [`DRAIN_FOR`].
async fn drain(body: &mut Incoming, cap: usize) {
    let read = async {
        let mut seen = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len());
            if seen > cap {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_FOR, read).await;
}

/// The model a request body names, if it is a JSON object with a string `model`.
fn requested_model(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Model {
        model: Option<String>,
    }
    serde_json::from_slice::<Model>(body).ok()?.model
}

async fn generate(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    endpoint: Endpoint,
    caller: auth::Caller,
    id: &str,
) -> Result<Response<Body>, ApiError> {
    let started = Instant::now();
    let headers = req.headers().clone();
    let path = req.uri().path().to_string();
    let body = read_body(req, state.max_body_bytes).await?;
    let local = state.scheduler.get().map(|e| e.model().name.clone());
    if let Some(model) = requested_model(&body).filter(|m| Some(m) != local.as_ref()) {
        if let Some(u) = state.upstreams.route(&model) {
            check_completion_cap(state, &body)?;
            let rest = path.strip_prefix("/v1").unwrap_or(&path);
            tracing::info!(upstream = %u.name, %model, tenant = %caller.tenant, "passing the request on");
            let resp = state.upstreams.forward(u, rest, &headers, body, id).await?;
            return Ok(hold(resp, caller.permit));
        }
    }
    let engine = state.scheduler.get().ok_or_else(ApiError::not_ready)?;
    let parsed = openai::parse(endpoint, &body, &engine.model().name)?;
    let ParsedRequest { mut generate, stream, include_usage, token_ids, namespace, .. } = parsed;
    generate.scope = state.gate.scope(&caller.tenant, namespace.as_deref())?;
    generate.request_id = id.into();
    if state.max_completion_tokens > 0 {
        match generate.max_tokens {
            Some(n) if n > state.max_completion_tokens => {
                return Err(ApiError::invalid(
                    "max_tokens",
                    format!("max_tokens {n} is over this server's limit of {}", state.max_completion_tokens),
                ));
            }
            None => generate.max_tokens = Some(state.max_completion_tokens),
            Some(_) => {}
        }
    }
    // Headers win over the body's `kvgate` object.
    if let Some(mode) = headers.get("x-kvgate-cache") {
        let mode = mode.to_str().map_err(|_| ApiError::invalid("kvgate.cache", "x-kvgate-cache is not text"))?;
        generate.cache_mode = Some(openai::parse_cache_mode(mode)?);
    }
    if let Some(b) = headers.get("x-kvgate-recompute-budget") {
        let b = b.to_str().ok().and_then(|b| b.trim().parse::<f64>().ok()).ok_or_else(|| {
            ApiError::invalid("kvgate.recompute_budget", "x-kvgate-recompute-budget must be a number between 0 and 1")
        })?;
        generate.recompute_budget = Some(openai::parse_budget(b)?);
    }
    let n = generate.n;
    let prepared = engine.prepare(generate)?;
    if state.max_prompt_tokens > 0 && prepared.prompt_tokens() > state.max_prompt_tokens {
        return Err(ApiError {
            code: "prompt_too_long",
            ..ApiError::invalid(
                "messages",
                format!(
                    "the prompt has {} tokens, over this server's limit of {}",
                    prepared.prompt_tokens(),
                    state.max_prompt_tokens
                ),
            )
        });
    }
    let events = engine.submit(prepared).inspect_err(|e| {
        if matches!(e, crate::engine::EngineError::QueueFull) {
            state.metrics.rejected_queue_full.fetch_add(1, Ordering::Relaxed);
        }
    })?;
    let reply = Reply::new(endpoint, engine.model().clone(), include_usage, token_ids, n);
    let tracker = InFlight::new(state.clone(), started, caller.permit);
    let deadline = state.request_timeout.map(|t| tokio::time::Instant::from_std(started) + t);
    if stream {
        let (tx, rx) = mpsc::channel(64);
        let span = tracing::Span::current();
        tokio::spawn(stream_events(reply, events, tx, tracker, deadline).instrument(span));
        Ok(Response::builder()
            .header(CONTENT_TYPE, "text/event-stream")
            .header(CACHE_CONTROL, "no-cache")
            .body(UnsyncBoxBody::new(SseBody { rx }))
            .expect("valid response"))
    } else {
        let collected = collect_events(reply, events, tracker);
        match deadline {
            None => collected.await,
            // Dropping the events on a timeout tells the scheduler to stop.
            Some(d) => tokio::time::timeout_at(d, collected).await.unwrap_or_else(|_| Err(request_timed_out(state))),
        }
    }
}

/// 504 for a request that ran past `request_timeout_secs`.
fn request_timed_out(state: &AppState) -> ApiError {
    let secs = state.request_timeout.map_or(0, |t| t.as_secs());
    ApiError::timeout("request_timeout", format!("the request ran longer than this server's limit of {secs} s"))
}

/// Refuses a request for an upstream whose `max_tokens` is over the completion cap.
fn check_completion_cap(state: &AppState, body: &[u8]) -> Result<(), ApiError> {
    if state.max_completion_tokens == 0 {
        return Ok(());
    }
    let v: Value = serde_json::from_slice(body).map_err(ApiError::malformed_json)?;
    for field in ["max_tokens", "max_completion_tokens"] {
        if v[field].as_u64().is_some_and(|n| n > state.max_completion_tokens as u64) {
            return Err(ApiError::invalid(
                "max_tokens",
                format!("{field} is over this server's limit of {}", state.max_completion_tokens),
            ));
        }
    }
    Ok(())
}

/// A response whose key keeps its place among the key's requests in flight until the body
/// has been sent (or the client left).
fn hold(resp: Response<Body>, permit: Permit) -> Response<Body> {
    struct Held {
        inner: Body,
        _permit: Permit,
    }
    impl hyper::body::Body for Held {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Pin::new(&mut self.inner).poll_frame(cx)
        }
        fn is_end_stream(&self) -> bool {
            self.inner.is_end_stream()
        }
        fn size_hint(&self) -> hyper::body::SizeHint {
            self.inner.size_hint()
        }
    }
    resp.map(|inner| UnsyncBoxBody::new(Held { inner, _permit: permit }))
}

/// Keeps `in_flight`, the latency/token metrics and the key's place among its requests in
/// flight right however a request ends.
struct InFlight {
    state: Arc<AppState>,
    started: Instant,
    first_token: bool,
    _permit: Permit,
}

impl InFlight {
    fn new(state: Arc<AppState>, started: Instant, permit: Permit) -> Self {
        state.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
        Self { state, started, first_token: false, _permit: permit }
    }

    fn token(&mut self) {
        if !self.first_token {
            self.first_token = true;
            self.state.metrics.ttft.observe(self.started.elapsed().as_secs_f64());
        }
    }

    fn done(&self, finish: FinishReason, usage: &Usage) {
        let m = &self.state.metrics;
        m.prompt_tokens.fetch_add(usage.prompt_tokens as u64, Ordering::Relaxed);
        m.generation_tokens.fetch_add(usage.completion_tokens as u64, Ordering::Relaxed);
        m.cached_prompt_tokens.fetch_add(usage.cached_tokens as u64, Ordering::Relaxed);
        match finish {
            FinishReason::Stop => m.success_stop.fetch_add(1, Ordering::Relaxed),
            FinishReason::Length => m.success_length.fetch_add(1, Ordering::Relaxed),
        };
        m.e2e_latency.observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Builds the JSON of one response or chunk.
struct Reply {
    endpoint: Endpoint,
    model: Arc<LoadedModel>,
    id: String,
    created: u64,
    include_usage: bool,
    /// Tokens in logprobs as `token_id:<id>`.
    token_ids: bool,
    /// Choices (`n`).
    n: usize,
    /// Per choice, text already sent (completions' `text_offset`).
    offsets: Vec<usize>,
}

impl Reply {
    fn new(endpoint: Endpoint, model: Arc<LoadedModel>, include_usage: bool, token_ids: bool, n: usize) -> Self {
        let prefix = if endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" };
        let id = format!("{prefix}-{:032x}", rand::random::<u128>());
        let n = n.max(1);
        Self { endpoint, model, id, created: unix_now(), include_usage, token_ids, n, offsets: vec![0; n] }
    }

    fn logprobs(&self) -> Logprobs {
        Logprobs::new(self.token_ids)
    }

    /// An echoed prompt: its text, and its tokens' logprobs when they were computed.
    fn prompt(&self, tokens: &[PromptToken]) -> (String, Logprobs) {
        let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
        let mut lp = self.logprobs();
        if tokens.iter().any(|t| t.logprob.is_some()) {
            tokens.iter().for_each(|t| lp.push_prompt(t.id, t.logprob.clone()));
        }
        (self.model.tokenizer.decode(&ids), lp)
    }

    fn logprobs_json(&self, lp: &Logprobs, offset: usize) -> Value {
        if lp.is_empty() {
            return Value::Null;
        }
        match self.endpoint {
            Endpoint::Chat => lp.chat_json(&self.model.tokenizer),
            Endpoint::Completion => lp.completion_json(&self.model.tokenizer, offset),
        }
    }

    /// One streamed chunk of choice `index`: `text` and its tokens' logprobs, `finish` on its
    /// last.
    fn chunk(&mut self, index: usize, text: &str, lp: &Logprobs, finish: Option<FinishReason>, first: bool) -> Value {
        let logprobs = self.logprobs_json(lp, self.offsets[index]);
        self.offsets[index] += text.len();
        let finish = finish.map(FinishReason::as_str);
        let mut v = match self.endpoint {
            Endpoint::Chat => {
                let delta = match (first, text.is_empty() && finish.is_some()) {
                    (true, _) => json!({"role": "assistant", "content": text}),
                    (false, true) => json!({}),
                    (false, false) => json!({"content": text}),
                };
                json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model.name,
                       "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})
            }
            Endpoint::Completion => json!({"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model.name,
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}),
        };
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    /// The chunk that carries only `usage` (`stream_options.include_usage`).
    fn usage_chunk(&self, usage: &Usage) -> Value {
        let object = if self.endpoint == Endpoint::Chat { "chat.completion.chunk" } else { "text_completion" };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model.name,
               "choices": [], "usage": openai::usage_json(usage), "kvgate": openai::kvgate_json(usage)})
    }

    /// A whole (non-streamed) response of every choice.
    fn whole(&mut self, answers: &mut [Answer], usage: &Usage) -> Value {
        let choices: Vec<Value> = answers
            .iter()
            .enumerate()
            .map(|(index, a)| {
                let logprobs = self.logprobs_json(&a.lp, 0);
                let finish = a.finish.map(|f| f.0.as_str());
                match self.endpoint {
                    Endpoint::Chat => json!({"index": index, "message": {"role": "assistant", "content": a.text},
                                             "logprobs": logprobs, "finish_reason": finish}),
                    Endpoint::Completion => {
                        json!({"index": index, "text": a.text, "logprobs": logprobs, "finish_reason": finish})
                    }
                }
            })
            .collect();
        let object = if self.endpoint == Endpoint::Chat { "chat.completion" } else { "text_completion" };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model.name,
               "choices": choices, "usage": openai::usage_json(usage), "kvgate": openai::kvgate_json(usage)})
    }
}

async fn collect_events(
    mut reply: Reply,
    mut events: mpsc::UnboundedReceiver<Event>,
    mut tracker: InFlight,
) -> Result<Response<Body>, ApiError> {
    let mut choices: Vec<Answer> = (0..reply.n).map(|_| Answer::new(&reply)).collect();
    let mut done = 0;
    while let Some(event) = events.recv().await {
        match event {
            Event::Prompt(tokens) => {
                // Echo comes with one choice only (the API refuses `echo` with `n` > 1).
                let (text, lp) = reply.prompt(&tokens);
                choices[0].text = text;
                choices[0].lp = lp;
            }
            Event::Token { index, token } => {
                tracker.token();
                let a = &mut choices[index];
                a.text.push_str(&token.text);
                if let Some(l) = token.logprob {
                    a.lp.push(l);
                }
            }
            Event::Done { index, text, finish_reason, usage } => {
                let a = &mut choices[index];
                a.text.push_str(&text);
                a.finish = Some((finish_reason, usage));
                done += 1;
                if done == choices.len() {
                    let usage = total_usage(choices.iter().filter_map(|a| a.finish.map(|f| f.1)));
                    tracker.done(finish_reason, &usage);
                    return Ok(json_response(StatusCode::OK, &reply.whole(&mut choices, &usage)));
                }
            }
            Event::Error(e) => return Err(e.into()),
        }
    }
    Err(ApiError::internal("the scheduler dropped the request"))
}

/// One choice of a whole response, as it accumulates.
struct Answer {
    text: String,
    lp: Logprobs,
    finish: Option<(FinishReason, Usage)>,
}

impl Answer {
    fn new(reply: &Reply) -> Self {
        Self { text: String::new(), lp: reply.logprobs(), finish: None }
    }
}

/// The usage of a request from its choices': one prompt, every choice's completion tokens.
fn total_usage(choices: impl Iterator<Item = Usage>) -> Usage {
    choices
        .reduce(|mut a, b| {
            a.completion_tokens += b.completion_tokens;
            a.decode_seconds = a.decode_seconds.max(b.decode_seconds);
            a
        })
        .unwrap_or_default()
}

async fn stream_events(
    mut reply: Reply,
    mut events: mpsc::UnboundedReceiver<Event>,
    tx: mpsc::Sender<Bytes>,
    mut tracker: InFlight,
    deadline: Option<tokio::time::Instant>,
) {
    let send = |v: &Value| Bytes::from(format!("data: {v}\n\n"));
    let mut first = vec![true; reply.n];
    let mut finished: Vec<Usage> = Vec::new();
    loop {
        let next = match deadline {
            None => events.recv().await,
            Some(d) => match tokio::time::timeout_at(d, events.recv()).await {
                Ok(e) => e,
                Err(_) => {
                    // Dropping `events` when this returns tells the scheduler to stop.
                    let e = request_timed_out(&tracker.state);
                    tracing::warn!(message = %e.message, "request cut off");
                    let _ = tx.send(send(&e.body())).await;
                    let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
                    return;
                }
            },
        };
        let Some(event) = next else { break };
        let frames = match event {
            Event::Prompt(tokens) => {
                let (text, lp) = reply.prompt(&tokens);
                let chunk = reply.chunk(0, &text, &lp, None, first[0]);
                first[0] = false;
                vec![send(&chunk)]
            }
            Event::Token { index, token } => {
                tracker.token();
                let mut lp = reply.logprobs();
                if let Some(l) = token.logprob {
                    lp.push(l);
                }
                if token.text.is_empty() && lp.is_empty() && !first[index] {
                    continue;
                }
                let chunk = reply.chunk(index, &token.text, &lp, None, first[index]);
                first[index] = false;
                vec![send(&chunk)]
            }
            Event::Done { index, text, finish_reason, usage } => {
                finished.push(usage);
                let mut last = reply.chunk(index, &text, &reply.logprobs(), Some(finish_reason), first[index]);
                first[index] = false;
                let mut frames = Vec::new();
                if finished.len() == reply.n {
                    let usage = total_usage(finished.iter().copied());
                    tracker.done(finish_reason, &usage);
                    last["kvgate"] = openai::kvgate_json(&usage);
                    frames.push(send(&last));
                    if reply.include_usage {
                        frames.push(send(&reply.usage_chunk(&usage)));
                    }
                    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
                } else {
                    frames.push(send(&last));
                }
                frames
            }
            Event::Error(e) => {
                let e = ApiError::from(e);
                vec![send(&e.body()), Bytes::from_static(b"data: [DONE]\n\n")]
            }
        };
        for f in frames {
            if tx.send(f).await.is_err() {
                return; // client gone: dropping `events` tells the scheduler to stop
            }
        }
    }
}

/// An SSE response body fed by a channel.
struct SseBody {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

fn full(body: impl Into<Bytes>) -> Body {
    UnsyncBoxBody::new(Full::new(body.into()))
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(full(v.to_string()))
        .expect("valid response")
}

fn error_response(state: &AppState, e: &ApiError) -> Response<Body> {
    if e.status.is_server_error() && e.code != "not_ready" {
        state.metrics.errors_5xx.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(status = %e.status, message = %e.message, "request failed");
    } else {
        state.metrics.errors_4xx.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(status = %e.status, message = %e.message, "request refused");
    }
    error_reply(e)
}

/// The response of an error: its JSON, status and headers.
fn error_reply(e: &ApiError) -> Response<Body> {
    let mut r = json_response(e.status, &e.body());
    if let Some(allow) = e.allow {
        r.headers_mut().insert(ALLOW, HeaderValue::from_static(allow));
    }
    if let Some(secs) = e.retry_after {
        r.headers_mut().insert(hyper::header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if e.status == StatusCode::PAYLOAD_TOO_LARGE {
        // The rest of that body is not read: the connection cannot carry another request.
        r.headers_mut().insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
