//! Operator endpoints under `/admin/`: the chunk store (list, inspect, delete, flush) and the
//! policy plugins (status, reload).
//!
//! When an admin token is configured every `/admin/` request must carry
//! `Authorization: Bearer <token>` (checked before anything else, so an outsider learns
//! nothing about what exists); without one the endpoints are open, as they are on a
//! loopback-only listener by default.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::AUTHORIZATION;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use super::error::ApiError;
use super::{AppState, Body, json_response};
use crate::policy::Policies;
use crate::store::{ChunkKey, Store};

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

pub(super) async fn route(state: &Arc<AppState>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    authorize(state, &req)?;
    let path = req.uri().path().trim_end_matches('/').to_string();
    let method = req.method().clone();
    match path.as_str() {
        "/admin/plugins" => {
            if method != Method::GET && method != Method::HEAD {
                return Err(ApiError::method_not_allowed(&method, &path, "GET"));
            }
            let status = policies(state)?.status();
            return Ok(json_response(StatusCode::OK, &json!({"object": "list", "data": status})));
        }
        "/admin/plugins/reload" => {
            if method != Method::POST {
                return Err(ApiError::method_not_allowed(&method, &path, "POST"));
            }
            let p = policies(state)?;
            let outcomes = tokio::task::spawn_blocking(move || p.reload())
                .await
                .map_err(|e| ApiError::internal(format!("reload failed: {e}")))?;
            let ok = outcomes.iter().all(|o| o.outcome != "rejected");
            return Ok(json_response(StatusCode::OK, &json!({"object": "list", "ok": ok, "data": outcomes})));
        }
        _ => {}
    }
    match path.strip_prefix("/admin/chunks") {
        Some("") => match method {
            Method::GET => list(state, req.uri().query().unwrap_or("")),
            Method::DELETE => {
                let store = store(state)?;
                let flushed = tokio::task::spawn_blocking(move || store.clear())
                    .await
                    .map_err(|e| ApiError::internal(format!("flush failed: {e}")))?;
                Ok(json_response(StatusCode::OK, &json!({"flushed_chunks": flushed})))
            }
            m => Err(ApiError::method_not_allowed(&m, &path, "GET, DELETE")),
        },
        Some(rest) if rest.starts_with('/') => {
            let hex = &rest[1..];
            let key = ChunkKey::from_hex(hex)
                .ok_or_else(|| ApiError::invalid(None, format!("`{hex}` is not a chunk key (64 hex digits)")))?;
            let store = store(state)?;
            match method {
                Method::GET => {
                    let (page, _) = store.list(None, usize::MAX, None);
                    let found = page.into_iter().find(|c| c.key == key.to_hex());
                    let info = found.ok_or_else(|| chunk_not_found(hex))?;
                    Ok(json_response(StatusCode::OK, &serde_json::to_value(info).expect("serializable")))
                }
                Method::DELETE => {
                    let removed = tokio::task::spawn_blocking(move || store.remove(&key))
                        .await
                        .map_err(|e| ApiError::internal(format!("delete failed: {e}")))?;
                    match removed {
                        true => Ok(json_response(StatusCode::OK, &json!({"deleted": key.to_hex()}))),
                        false => Err(chunk_not_found(hex)),
                    }
                }
                m => Err(ApiError::method_not_allowed(&m, &path, "GET, DELETE")),
            }
        }
        _ => Err(ApiError::route_not_found(&path)),
    }
}

fn chunk_not_found(hex: &str) -> ApiError {
    ApiError::not_found("chunk_not_found", format!("no chunk `{hex}` in the store"))
}

fn authorize(state: &AppState, req: &Request<Incoming>) -> Result<(), ApiError> {
    let Some(token) = &state.admin_token else { return Ok(()) };
    let given = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given {
        None => Err(ApiError::unauthorized("admin endpoints need `Authorization: Bearer <admin token>`")),
        Some(g) if constant_time_eq(g.trim().as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::unauthorized("the admin token is not valid")),
    }
}

/// Compares without an early exit, so timing does not reveal how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn policies(state: &AppState) -> Result<Arc<Policies>, ApiError> {
    let engine = state.scheduler.get().ok_or_else(ApiError::not_ready)?;
    engine
        .policies()
        .cloned()
        .ok_or_else(|| ApiError::not_found("plugins_disabled", "this server runs without plugins"))
}

fn store(state: &AppState) -> Result<Arc<Store>, ApiError> {
    Ok(state.scheduler.get().ok_or_else(ApiError::not_ready)?.store().clone())
}

/// `GET /admin/chunks?limit=N&after=KEY&tenant=NAME`: a page of chunks in key order (of one
/// tenant's namespace, or one `namespace=NAME`, when asked).
fn list(state: &AppState, query: &str) -> Result<Response<Body>, ApiError> {
    let mut limit = DEFAULT_PAGE;
    let mut after = None;
    let mut namespace = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "limit" => {
                limit = value.parse().ok().filter(|n| (1..=MAX_PAGE).contains(n)).ok_or_else(|| {
                    ApiError::invalid(None, format!("limit must be a whole number from 1 to {MAX_PAGE}, got `{value}`"))
                })?;
            }
            "after" => {
                after = Some(ChunkKey::from_hex(value).ok_or_else(|| {
                    ApiError::invalid(None, format!("after must be a chunk key (64 hex digits), got `{value}`"))
                })?);
            }
            "tenant" => namespace = Some(super::auth::tenant_namespace(value).name().to_string()),
            "namespace" => namespace = Some(value.to_string()),
            _ => {
                return Err(ApiError::invalid(
                    None,
                    format!("unknown query parameter `{name}` (limit, after, tenant, namespace)"),
                ));
            }
        }
    }
    let store = store(state)?;
    let (page, has_more) = store.list(after.as_ref(), limit, namespace.as_deref());
    let next = if has_more { page.last().map(|c| c.key.clone()) } else { None };
    Ok(json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": page, "has_more": has_more, "next_after": next}),
    ))
}
