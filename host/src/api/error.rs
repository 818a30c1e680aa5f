//! Errors as clients see them: OpenAI's `{"error": {...}}` with the right status.

use hyper::StatusCode;
use serde_json::json;

use crate::engine::EngineError;

/// An error answered to a client. `Client` errors are the client's to fix; the others are
/// ours (or a passing state of the server).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `not_found_error`, `rate_limit_error`, …
    pub kind: &'static str,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    /// A stable machine-readable code.
    pub code: &'static str,
    /// The methods the route accepts, for the `Allow` header of a 405.
    pub allow: Option<&'static str>,
    /// Seconds after which a retry may succeed, for the `Retry-After` header of a 429.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// 400 for a field the client got wrong.
    pub fn invalid(param: impl Into<Option<&'static str>>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.into().map(str::to_string),
            code: "invalid_value",
            allow: None,
            retry_after: None,
        }
    }

    pub fn malformed_json(detail: impl std::fmt::Display) -> Self {
        Self { code: "invalid_json", ..Self::invalid(None, format!("the request body is not valid JSON: {detail}")) }
    }

    pub fn model_not_found(model: &str, served: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("the model `{model}` does not exist; this server serves `{served}`"),
            kind: "not_found_error",
            param: Some("model".into()),
            code: "model_not_found",
            allow: None,
            retry_after: None,
        }
    }

    pub fn route_not_found(path: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("no route for {path}"),
            kind: "not_found_error",
            param: None,
            code: "not_found",
            allow: None,
            retry_after: None,
        }
    }

    pub fn method_not_allowed(method: &hyper::Method, path: &str, allowed: &'static str) -> Self {
        Self {
            status: StatusCode::METHOD_NOT_ALLOWED,
            message: format!("{method} is not allowed on {path}; use {allowed}"),
            kind: "invalid_request_error",
            param: None,
            code: "method_not_allowed",
            allow: Some(if allowed == "GET" { "GET, HEAD" } else { allowed }),
            retry_after: None,
        }
    }

    /// 404 for a named thing (a chunk, a plugin) that does not exist.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self { code, ..Self::route_not_found("") }.with_message(message)
    }

    /// 401: the admin endpoints need `Authorization: Bearer <admin token>`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: "invalid_admin_token",
            allow: None,
            retry_after: None,
        }
    }

    /// 401 on the API: no key, or one that is not known.
    pub fn invalid_api_key(message: impl Into<String>) -> Self {
        Self { code: "invalid_api_key", ..Self::unauthorized(message) }
    }

    /// 403: the key is known but may not do this.
    pub fn forbidden(param: impl Into<Option<&'static str>>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            kind: "permission_error",
            code: "permission_denied",
            ..Self::invalid(param, message)
        }
    }

    /// 429 for a client over one of its limits; it may retry after `retry_after` seconds.
    pub fn rate_limited(code: &'static str, message: impl Into<String>, retry_after: u64) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            kind: "rate_limit_error",
            code,
            retry_after: Some(retry_after.max(1)),
            ..Self::invalid(None, message)
        }
    }

    /// 502: the upstream could not be reached or answered with something that is not HTTP.
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_GATEWAY, code: "upstream_unreachable", ..Self::internal(message) }
    }

    /// 504: an upstream, or the request itself, took longer than allowed.
    pub fn timeout(code: &'static str, message: impl Into<String>) -> Self {
        Self { status: StatusCode::GATEWAY_TIMEOUT, code, ..Self::internal(message) }
    }

    fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }

    pub fn body_too_large(limit: usize) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("the request body is larger than the limit of {limit} bytes"),
            kind: "invalid_request_error",
            param: None,
            code: "request_too_large",
            allow: None,
            retry_after: None,
        }
    }

    pub fn not_ready() -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the model is still loading; retry shortly".into(),
            kind: "server_error",
            param: None,
            code: "not_ready",
            allow: None,
            retry_after: None,
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: "internal_error",
            allow: None,
            retry_after: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::ContextOverflow { .. } => {
                Self { code: "context_length_exceeded", ..Self::invalid("max_tokens", e.to_string()) }
            }
            EngineError::EmptyPrompt | EngineError::InvalidToken { .. } => Self::invalid("prompt", e.to_string()),
            EngineError::InvalidOption(_) => Self::invalid("kvgate", e.to_string()),
            EngineError::Template(_) => Self::invalid("messages", e.to_string()),
            EngineError::Tokenizer(_) => Self::invalid(None, e.to_string()),
            EngineError::QueueFull => Self {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: e.to_string(),
                kind: "rate_limit_error",
                param: None,
                code: "queue_full",
                allow: None,
                retry_after: None,
            },
            EngineError::Stopped => Self {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: e.to_string(),
                kind: "server_error",
                param: None,
                code: "shutting_down",
                allow: None,
                retry_after: None,
            },
            EngineError::Model(_) | EngineError::Internal(_) => Self::internal(e.to_string()),
        }
    }
}
