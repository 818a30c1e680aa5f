//! `POST /v1/kvgate/ingest`: a corpus stored ahead of traffic.
//!
//! RAG operators know their corpus; the first question about a passage should not pay its
//! prefill. Each document is prefilled as a user message of its own in compose mode (what it
//! shares with stored chunks is reused, the rest stored as new chunks cut by the chunker), so
//! that its passages are then found inside client prompts however those join, label and order
//! them. Chunks go to the caller's namespace, or to a shared one it may write
//! (`"namespace"`); with a remote tier they reach the whole fleet.
//!
//! Owns only the request's shape and its answer: prefills go through the scheduler like any
//! request (queued, batched with running streams), one document at a time per request.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::json;

use super::error::ApiError;
use super::{AppState, Body, auth, json_response, read_body};
use crate::blend::CacheMode;
use crate::engine::ChatMessage;
use crate::scheduler::{Event, GenerateRequest, Prompt};

/// The body of an ingest request.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct IngestRequest {
    documents: Vec<Document>,
    /// A shared namespace to store into (default: the caller's own).
    #[serde(default)]
    namespace: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Document {
    Text(String),
    Object {
        text: String,
        #[serde(default)]
        id: Option<String>,
    },
}

impl Document {
    fn text(&self) -> &str {
        match self {
            Document::Text(t) | Document::Object { text: t, .. } => t,
        }
    }

    fn id(&self) -> Option<&str> {
        match self {
            Document::Text(_) => None,
            Document::Object { id, .. } => id.as_deref(),
        }
    }
}

/// Most documents one request may carry (a corpus is sent in batches; the CLI does).
pub const MAX_DOCUMENTS: usize = 256;

pub async fn ingest(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    caller: auth::Caller,
    id: &str,
) -> Result<Response<Body>, ApiError> {
    let engine = state.scheduler.get().ok_or_else(ApiError::not_ready)?;
    let body = read_body(req, state.max_body_bytes).await?;
    let parsed: IngestRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid(
            "documents",
            format!("the body must be {{\"documents\": [\"text\" | {{\"text\": …, \"id\": …}}, …]}}: {e}"),
        )
    })?;
    if parsed.documents.is_empty() || parsed.documents.len() > MAX_DOCUMENTS {
        return Err(ApiError::invalid(
            "documents",
            format!("send 1 to {MAX_DOCUMENTS} documents per request (got {})", parsed.documents.len()),
        ));
    }
    if let Some(i) = parsed.documents.iter().position(|d| d.text().trim().is_empty()) {
        return Err(ApiError::invalid("documents", format!("document {i} is empty")));
    }
    let scope = state.gate.scope(&caller.tenant, parsed.namespace.as_deref())?;
    // Every document is checked (tokenized, against the context) before any is prefilled, so a
    // bad one leaves nothing half done.
    let mut prepared = Vec::with_capacity(parsed.documents.len());
    for (i, doc) in parsed.documents.iter().enumerate() {
        let mut g =
            GenerateRequest::new(Prompt::Chat(vec![ChatMessage { role: "user".into(), content: doc.text().into() }]));
        g.max_tokens = Some(1);
        g.cache_mode = Some(CacheMode::Compose);
        g.store = true;
        g.scope = scope.clone();
        g.request_id = format!("{id}/{i}").into();
        let p = engine.prepare(g).map_err(|e| {
            let e = ApiError::from(e);
            ApiError { message: format!("document {i}: {}", e.message), param: Some("documents".into()), ..e }
        })?;
        if state.max_prompt_tokens > 0 && p.prompt_tokens() > state.max_prompt_tokens {
            return Err(ApiError {
                code: "prompt_too_long",
                ..ApiError::invalid(
                    "documents",
                    format!(
                        "document {i} has {} tokens, over this server's limit of {}: split it",
                        p.prompt_tokens(),
                        state.max_prompt_tokens
                    ),
                )
            });
        }
        prepared.push(p);
    }
    let (mut tokens, mut reused, mut stored) = (0usize, 0usize, 0usize);
    let mut data = Vec::with_capacity(prepared.len());
    for (i, p) in prepared.into_iter().enumerate() {
        let mut events = engine.submit(p)?;
        let usage = loop {
            match events.recv().await {
                Some(Event::Done { usage, .. }) => break usage,
                Some(Event::Error(e)) => return Err(e.into()),
                Some(_) => continue,
                None => return Err(crate::engine::EngineError::Stopped.into()),
            }
        };
        let r = usage.reuse;
        tokens += usage.prompt_tokens;
        reused += r.reused_tokens;
        stored += r.chunks_stored;
        data.push(json!({
            "index": i, "id": parsed.documents[i].id(), "tokens": usage.prompt_tokens,
            "reused_tokens": r.reused_tokens, "chunks_stored": r.chunks_stored,
        }));
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "object": "kvgate.ingest", "namespace": scope.write.name(), "documents": data.len(),
            "tokens": tokens, "reused_tokens": reused, "chunks_stored": stored, "data": data,
        }),
    ))
}
