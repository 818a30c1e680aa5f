//! Upstreams: OpenAI-compatible servers that requests for other models are passed to.
//!
//! A request whose `model` an `[[upstream]]` serves (or any model the local one does not,
//! for a catch-all `"*"`) is sent on with its body untouched and answered with the
//! upstream's response as it arrives: status, content type and body, an SSE stream piece by
//! piece, never buffered. The client's key never leaves: the upstream gets its own
//! (`api_key`), and the request's `x-request-id`. An upstream that cannot be reached is a
//! 502, one that does not start answering within `timeout_secs` a 504, and an upstream's own
//! error is passed through (wrapped in OpenAI's error shape when it is not JSON). A stream
//! that stalls for `timeout_secs` ends with an OpenAI-shaped error event.
//!
//! Each upstream's `/models` is polled in the background: its health (`/ready`,
//! `kvgate:upstream_up`) and, for a catch-all, the models `/v1/models` lists for it.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{HeaderMap, Request, Response, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use super::error::ApiError;
use crate::config::UpstreamConfig;

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// How often each upstream's `/models` is asked.
const HEALTH_EVERY: Duration = Duration::from_secs(10);

/// Checks an upstream base URL: `http://host[:port][/path]`.
pub fn parse_base_url(url: &str) -> Result<Uri, String> {
    let uri: Uri = url.trim_end_matches('/').parse().map_err(|e| format!("not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => return Err("https is not supported: use plain HTTP (e.g. to a local TLS proxy)".into()),
        _ => return Err("must start with http://".into()),
    }
    if uri.authority().is_none() {
        return Err("has no host".into());
    }
    if uri.query().is_some() {
        return Err("must not have a query".into());
    }
    Ok(uri)
}

/// Health of an upstream as last polled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Unknown = 0,
    Up = 1,
    Down = 2,
}

/// One upstream and what is known of it.
pub struct Upstream {
    pub name: String,
    base: Uri,
    models: Vec<String>,
    api_key: Option<String>,
    timeout: Duration,
    health: AtomicU8,
    /// Models its `/models` last listed.
    listed: Mutex<Vec<String>>,
    requests: AtomicU64,
    /// Requests answered 502/504 by us.
    failures: AtomicU64,
}

impl Upstream {
    fn catch_all(&self) -> bool {
        self.models.iter().any(|m| m == "*")
    }

    pub fn health(&self) -> Health {
        match self.health.load(Ordering::Relaxed) {
            1 => Health::Up,
            2 => Health::Down,
            _ => Health::Unknown,
        }
    }

    /// `<base>/<rest>` (`rest` without its leading `/v1`).
    fn uri(&self, rest: &str) -> Uri {
        format!("{}{rest}", self.base.to_string().trim_end_matches('/')).parse().expect("a base URL and a path")
    }
}

/// Every upstream, and the client they are reached with.
pub struct Upstreams {
    list: Vec<Arc<Upstream>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Upstreams {
    pub fn new(configs: &[UpstreamConfig]) -> Self {
        let connect = configs.iter().map(|c| c.connect_timeout_ms).max().unwrap_or(2000);
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(Duration::from_millis(connect)));
        http.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(http);
        let list = configs
            .iter()
            .map(|c| {
                Arc::new(Upstream {
                    name: c.name.clone(),
                    base: parse_base_url(&c.url).expect("checked with the configuration"),
                    models: c.models.clone(),
                    api_key: c.api_key.clone(),
                    timeout: Duration::from_secs(c.timeout_secs),
                    health: AtomicU8::new(Health::Unknown as u8),
                    listed: Mutex::new(Vec::new()),
                    requests: AtomicU64::new(0),
                    failures: AtomicU64::new(0),
                })
            })
            .collect();
        Self { list, client }
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn all(&self) -> &[Arc<Upstream>] {
        &self.list
    }

    /// The upstream serving `model`: one that lists it, else the first catch-all.
    pub fn route(&self, model: &str) -> Option<&Arc<Upstream>> {
        self.list
            .iter()
            .find(|u| u.models.iter().any(|m| m == model))
            .or_else(|| self.list.iter().find(|u| u.catch_all()))
    }

    /// The model ids upstreams serve, each once: those configured, and a catch-all's listed.
    pub fn models(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for u in &self.list {
            let listed = u.listed.lock().unwrap().clone();
            for m in u.models.iter().filter(|m| *m != "*").cloned().chain(if u.catch_all() { listed } else { vec![] }) {
                if !out.iter().any(|(id, _)| *id == m) {
                    out.push((m, u.name.clone()));
                }
            }
        }
        out
    }

    /// Polls every upstream's `/models` until the runtime stops.
    pub fn watch(self: &Arc<Self>) {
        if self.list.is_empty() {
            return;
        }
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEALTH_EVERY);
            loop {
                tick.tick().await;
                let Some(me) = me.upgrade() else { return };
                for u in me.list.clone() {
                    me.poll(&u).await;
                }
            }
        });
    }

    /// One health check: `GET <base>/models`.
    async fn poll(&self, u: &Upstream) {
        let mut req = Request::get(u.uri("/models"));
        if let Some(k) = &u.api_key {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {k}"));
        }
        let req = req.body(Full::new(Bytes::new())).expect("a valid request");
        let answer = tokio::time::timeout(u.timeout.min(Duration::from_secs(5)), async {
            let resp = self.client.request(req).await.ok()?;
            if !resp.status().is_success() {
                return None;
            }
            let body = resp.into_body().collect().await.ok()?.to_bytes();
            serde_json::from_slice::<Value>(&body).ok()
        })
        .await
        .ok()
        .flatten();
        let was = u.health();
        match answer {
            Some(v) => {
                u.health.store(Health::Up as u8, Ordering::Relaxed);
                let ids = v["data"].as_array().into_iter().flatten().filter_map(|m| m["id"].as_str());
                *u.listed.lock().unwrap() = ids.map(str::to_string).collect();
            }
            None => u.health.store(Health::Down as u8, Ordering::Relaxed),
        }
        if was != u.health() {
            tracing::info!(upstream = %u.name, health = ?u.health(), "upstream health changed");
        }
    }

    /// Passes a request on to `u` and relays its answer. `rest` is the path after `/v1`.
    pub async fn forward(
        &self,
        u: &Upstream,
        rest: &str,
        headers: &HeaderMap,
        body: Bytes,
        request_id: &str,
    ) -> Result<Response<Body>, ApiError> {
        u.requests.fetch_add(1, Ordering::Relaxed);
        let mut req = Request::post(u.uri(rest));
        for name in [CONTENT_TYPE, hyper::header::ACCEPT, hyper::header::USER_AGENT] {
            if let Some(v) = headers.get(&name) {
                req = req.header(name, v.clone());
            }
        }
        req = req.header("x-request-id", request_id);
        if let Some(k) = &u.api_key {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {k}"));
        }
        let req =
            req.body(Full::new(body)).map_err(|e| ApiError::internal(format!("building the upstream request: {e}")))?;
        let fail = |e: ApiError| {
            u.failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(upstream = %u.name, status = %e.status, message = %e.message, "upstream request failed");
            e
        };
        let resp = match tokio::time::timeout(u.timeout, self.client.request(req)).await {
            Err(_) => {
                return Err(fail(ApiError::timeout(
                    "upstream_timeout",
                    format!("upstream `{}` did not answer within {} s", u.name, u.timeout.as_secs()),
                )));
            }
            Ok(Err(e)) => {
                let what = if e.is_connect() { "could not be reached" } else { "failed" };
                return Err(fail(ApiError::bad_gateway(format!("upstream `{}` {what}: {e}", u.name))));
            }
            Ok(Ok(r)) => r,
        };
        relay(resp, u.timeout, &u.name, None).await
    }

    /// `kvgate:upstream_*` metrics.
    pub fn metrics(&self) -> String {
        if self.list.is_empty() {
            return String::new();
        }
        let mut s = String::new();
        s += "# HELP kvgate:upstream_up Whether the upstream answered its last health check (1), failed it (0), or was not checked yet (-1).\n# TYPE kvgate:upstream_up gauge\n";
        for u in &self.list {
            let v = match u.health() {
                Health::Up => 1,
                Health::Down => 0,
                Health::Unknown => -1,
            };
            s += &format!("kvgate:upstream_up{{upstream=\"{}\"}} {v}\n", u.name);
        }
        s += "# HELP kvgate:upstream_requests_total Requests passed to the upstream.\n# TYPE kvgate:upstream_requests_total counter\n";
        for u in &self.list {
            s += &format!(
                "kvgate:upstream_requests_total{{upstream=\"{}\"}} {}\n",
                u.name,
                u.requests.load(Ordering::Relaxed)
            );
        }
        s += "# HELP kvgate:upstream_failures_total Requests answered 502 or 504 because of the upstream.\n# TYPE kvgate:upstream_failures_total counter\n";
        for u in &self.list {
            s += &format!(
                "kvgate:upstream_failures_total{{upstream=\"{}\"}} {}\n",
                u.name,
                u.failures.load(Ordering::Relaxed)
            );
        }
        s
    }

    /// Each upstream's health, for `/ready`.
    pub fn status(&self) -> Value {
        let health = |u: &Upstream| match u.health() {
            Health::Up => "up",
            Health::Down => "down",
            Health::Unknown => "unknown",
        };
        Value::Array(self.list.iter().map(|u| json!({"name": u.name, "health": health(u)})).collect())
    }
}

/// Something told how a relayed answer goes: when its first piece passes, and (dropped)
/// when it ends, however it ends.
pub trait Progress: Send {
    fn first_piece(&mut self);
}

/// Relays `resp`, an answer of `name`, as it arrives: its status, content type and body (an
/// SSE stream piece by piece; a stall of `idle` ends it with an error event). An error that
/// is not JSON is wrapped in OpenAI's shape.
pub async fn relay(
    resp: Response<Incoming>,
    idle: Duration,
    name: &str,
    progress: Option<Box<dyn Progress>>,
) -> Result<Response<Body>, ApiError> {
    let status = resp.status();
    let content_type = resp.headers().get(CONTENT_TYPE).cloned();
    let sse = content_type.as_ref().and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("text/event-stream"));
    let json = content_type.as_ref().and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("json"));
    if !status.is_success() && !json {
        let text = tokio::time::timeout(idle, resp.into_body().collect())
            .await
            .ok()
            .and_then(|r| r.ok())
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).chars().take(1000).collect::<String>())
            .unwrap_or_default();
        let e = ApiError {
            status,
            message: format!("upstream `{name}` answered {status}: {}", text.trim()),
            ..ApiError::bad_gateway("")
        };
        return Err(e);
    }
    let mut out = Response::builder().status(status);
    if let Some(ct) = content_type {
        out = out.header(CONTENT_TYPE, ct);
    }
    if sse {
        out = out.header(hyper::header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    let relay = Relay::new(resp.into_body(), idle, sse, name.to_string(), progress);
    Ok(out.body(UnsyncBoxBody::new(relay)).expect("a valid response"))
}

/// Finds whole SSE events in a byte stream that arrives in arbitrary pieces: an event ends at
/// a blank line (`\n\n`, `\r\n\r\n` or `\r\r`).
#[derive(Debug, Default)]
pub struct SseScanner {
    pending: Vec<u8>,
    /// Events seen whose data is `[DONE]`.
    pub done: bool,
}

impl SseScanner {
    /// Feeds the next piece; returns the `data` of every event it completes.
    pub fn feed(&mut self, piece: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(piece);
        let mut events = Vec::new();
        loop {
            let text = &self.pending;
            let end = (0..text.len()).find_map(|i| {
                let rest = &text[i..];
                [&b"\r\n\r\n"[..], b"\n\n", b"\r\r"].iter().find(|sep| rest.starts_with(sep)).map(|sep| (i, sep.len()))
            });
            let Some((at, sep)) = end else { break };
            let event: Vec<u8> = self.pending.drain(..at + sep).take(at).collect();
            let text = String::from_utf8_lossy(&event);
            let data: Vec<&str> = text
                .split(['\n', '\r'])
                .filter_map(|line| line.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if data.is_empty() {
                continue;
            }
            let data = data.join("\n");
            if data == "[DONE]" {
                self.done = true;
            }
            events.push(data);
        }
        events
    }
}

/// An upstream's response body, relayed frame by frame as it arrives; a stall longer than
/// `idle` (or an upstream error) ends it, with an error event when it is an SSE stream.
struct Relay {
    inner: Incoming,
    idle: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// For SSE streams: whether the upstream ended its stream itself.
    scanner: Option<SseScanner>,
    upstream: String,
    /// A last frame to send before ending.
    tail: Option<Bytes>,
    finished: bool,
    progress: Option<Box<dyn Progress>>,
    started: bool,
}

impl Relay {
    fn new(inner: Incoming, idle: Duration, sse: bool, upstream: String, progress: Option<Box<dyn Progress>>) -> Self {
        Self {
            inner,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
            scanner: sse.then(SseScanner::default),
            upstream,
            tail: None,
            finished: false,
            progress,
            started: false,
        }
    }

    /// Ends the relay: an SSE stream the upstream did not finish gets an error event.
    fn end(&mut self, why: &str) {
        self.finished = true;
        tracing::warn!(upstream = %self.upstream, %why, "upstream stream cut off");
        if self.scanner.as_ref().is_some_and(|s| !s.done) {
            let e = ApiError::bad_gateway(format!("upstream `{}`: {why}", self.upstream));
            self.tail = Some(Bytes::from(format!("data: {}\n\ndata: [DONE]\n\n", e.body())));
        }
    }
}

impl hyper::body::Body for Relay {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        loop {
            if self.finished {
                return Poll::Ready(self.tail.take().map(|b| Ok(Frame::data(b))));
            }
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let idle = self.idle;
                    self.deadline.as_mut().reset(tokio::time::Instant::now() + idle);
                    let Ok(data) = frame.into_data() else { continue }; // trailers: not relayed
                    if let Some(s) = self.scanner.as_mut() {
                        s.feed(&data);
                    }
                    if !std::mem::replace(&mut self.started, true) {
                        if let Some(p) = self.progress.as_mut() {
                            p.first_piece();
                        }
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => self.end(&format!("the connection failed: {e}")),
                Poll::Ready(None) => {
                    self.finished = true;
                    if self.scanner.as_ref().is_some_and(|s| !s.done) {
                        self.end("the stream ended before [DONE]");
                    }
                }
                Poll::Pending => {
                    if self.deadline.as_mut().poll(cx).is_ready() {
                        let secs = self.idle.as_secs();
                        self.end(&format!("nothing arrived for {secs} s"));
                        continue;
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished && self.tail.is_none()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn base_urls_are_checked() {
        assert!(parse_base_url("http://127.0.0.1:8000/v1").is_ok());
        assert!(parse_base_url("https://x/v1").unwrap_err().contains("https"));
        assert!(parse_base_url("ftp://x").is_err());
        assert!(parse_base_url("not a url").is_err());
    }

    #[test]
    fn events_are_found_across_pieces() {
        let mut s = SseScanner::default();
        assert!(s.feed(b"data: {\"a\"").is_empty());
        assert_eq!(s.feed(b": 1}\n\ndata: [DO"), vec!["{\"a\": 1}"]);
        assert_eq!(s.feed(b"NE]\r\n\r\n"), vec!["[DONE]"]);
        assert!(s.done);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// However a stream is cut into pieces, the scanner finds the same events as when
        /// it arrives whole — and never panics, whatever the bytes.
        #[test]
        fn pieces_do_not_change_the_events(bytes in proptest::collection::vec(any::<u8>(), 0..400),
                                           cuts in proptest::collection::vec(0usize..400, 0..12)) {
            let whole = SseScanner::default().feed(&bytes);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.sort_unstable();
            let mut s = SseScanner::default();
            let mut got = Vec::new();
            let mut at = 0;
            for c in cuts.into_iter().chain([bytes.len()]) {
                got.extend(s.feed(&bytes[at..c]));
                at = c;
            }
            prop_assert_eq!(got, whole);
        }

        /// Well-formed events come out as they went in.
        #[test]
        fn events_round_trip(datas in proptest::collection::vec("[a-z{}\":, 0-9]{0,40}", 0..8), cut in 0usize..200) {
            let stream: String = datas.iter().map(|d| format!("data: {d}\n\n")).collect();
            let mut s = SseScanner::default();
            let cut = cut.min(stream.len());
            let mut got = s.feed(&stream.as_bytes()[..cut]);
            got.extend(s.feed(&stream.as_bytes()[cut..]));
            prop_assert_eq!(got, datas);
        }
    }
}
