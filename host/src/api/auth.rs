//! Who is asking: API keys, the tenant each belongs to, the limits each runs under, and
//! where a tenant's requests read and write cached KV.
//!
//! Keys come from `--api-key` (tenant `default`), from `[[api_key]]` entries in the config,
//! and from a keys file of hashed keys that is read again whenever it changes; only their
//! sha256 is kept in memory. A request presents its key as `Authorization: Bearer <key>` (or
//! `x-api-key`). With no key configured anywhere the API is open and every request is the
//! `default` tenant's.
//!
//! Limits are per key: requests in flight (`max_concurrent`) and requests started per
//! minute (a token bucket that refills continuously), each answered with 429 and a
//! `Retry-After` when exceeded.
//!
//! Namespaces: a tenant reads and writes its own namespace of the chunk store
//! (`tenant:<name>`; the `default` tenant's is the empty one an open server uses) and reads
//! every shared namespace (`shared:<name>`) the operator lists it in; a request may store
//! into one of those with `"kvgate": {"namespace": "<name>"}`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use hyper::HeaderMap;
use sha2::{Digest, Sha256};

use super::error::ApiError;
use crate::config::{ApiKeyConfig, Config, SharedNamespaceConfig, valid_name};
use crate::store::{Namespace, Scope};

/// How often the keys file is checked for changes.
const KEYS_FILE_POLL: Duration = Duration::from_secs(1);

/// The limits one key runs under (0: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    pub max_concurrent: usize,
    pub per_minute: u32,
}

/// A known key.
#[derive(Debug, Clone)]
struct Key {
    tenant: Arc<str>,
    limits: Limits,
}

/// Requests in flight and the rate bucket of one key.
struct Limiter {
    in_flight: AtomicUsize,
    /// (tokens, when last refilled).
    bucket: Mutex<(f64, Instant)>,
}

/// Holds a key's place among its requests in flight; gives it back when dropped.
pub struct Permit(Option<Arc<Limiter>>);

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(l) = &self.0 {
            l.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Who a request is.
pub struct Caller {
    pub tenant: Arc<str>,
    /// The first 8 hex digits of the key's hash (for logs and metrics; empty when open).
    pub key_id: String,
    pub permit: Permit,
}

/// The keys, their limits, and the shared namespaces.
pub struct Gate {
    /// Key hash → key, from the config and the keys file.
    keys: ArcSwap<HashMap<[u8; 32], Key>>,
    from_config: HashMap<[u8; 32], Key>,
    file: Option<PathBuf>,
    /// The keys file's modification time and length when last read.
    file_stamp: Mutex<Option<(SystemTime, u64)>>,
    defaults: Limits,
    shared: Vec<SharedNamespaceConfig>,
    limiters: Mutex<HashMap<[u8; 32], Arc<Limiter>>>,
    /// Whether `/health`, `/ready` and `/metrics` need a key.
    pub protect_health: bool,
}

fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The sha256 of a key, in hex: what a keys file holds (`kvgate key hash`).
pub fn key_hash_hex(key: &str) -> String {
    hash(key).iter().map(|b| format!("{b:02x}")).collect()
}

/// The namespace a tenant reads and writes.
pub fn tenant_namespace(tenant: &str) -> Namespace {
    match tenant {
        "default" | "" => Namespace::default(),
        t => Namespace::new(&format!("tenant:{t}")),
    }
}

/// A shared namespace by its configured name.
pub fn shared_namespace(name: &str) -> Namespace {
    Namespace::new(&format!("shared:{name}"))
}

/// The key a request presents, if any.
fn presented(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        let token = v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).unwrap_or(v);
        return Some(token.trim());
    }
    headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim)
}

/// Reads a keys file: `[[api_key]]` entries with `sha256` (64 hex digits) and `tenant`.
fn read_keys_file(path: &std::path::Path, defaults: Limits) -> Result<HashMap<[u8; 32], Key>, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        #[serde(default)]
        api_key: Vec<ApiKeyConfig>,
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let file: File = toml::from_str(&text).map_err(|e| format!("{} is not valid: {e}", path.display()))?;
    let mut out = HashMap::new();
    for (i, k) in file.api_key.iter().enumerate() {
        let at = |what: &str| format!("{} entry {}: {what}", path.display(), i + 1);
        let Some(hex) = k.sha256.as_deref().filter(|_| k.key.is_none()) else {
            return Err(at("give `sha256` (the key's hash, from `kvgate key hash`), never the key"));
        };
        let bytes = crate::store::ChunkKey::from_hex(&hex.to_ascii_lowercase())
            .ok_or_else(|| at("`sha256` must be 64 hex digits"))?;
        if !valid_name(&k.tenant) {
            return Err(at(&format!("tenant `{}`: use 1-64 of A-Z a-z 0-9 . _ -", k.tenant)));
        }
        out.insert(bytes.0, Key { tenant: k.tenant.as_str().into(), limits: limits_of(k, defaults) });
    }
    Ok(out)
}

fn limits_of(k: &ApiKeyConfig, defaults: Limits) -> Limits {
    Limits {
        max_concurrent: k.max_concurrent.unwrap_or(defaults.max_concurrent),
        per_minute: k.requests_per_minute.unwrap_or(defaults.per_minute),
    }
}

fn stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl Gate {
    /// The gate of a configuration (reads the keys file once; an unreadable one is an error).
    pub fn new(config: &Config) -> Result<Self, String> {
        let defaults = Limits { max_concurrent: config.key_max_concurrent, per_minute: config.key_requests_per_minute };
        let mut from_config = HashMap::new();
        for k in &config.api_keys {
            from_config.insert(hash(k), Key { tenant: "default".into(), limits: defaults });
        }
        for k in &config.api_key_entries {
            let key = k.key.as_deref().unwrap_or_default();
            from_config.insert(hash(key), Key { tenant: k.tenant.as_str().into(), limits: limits_of(k, defaults) });
        }
        let gate = Self {
            keys: ArcSwap::from_pointee(from_config.clone()),
            from_config,
            file: config.api_keys_file.clone(),
            file_stamp: Mutex::new(None),
            defaults,
            shared: config.shared_namespaces.clone(),
            limiters: Mutex::new(HashMap::new()),
            protect_health: !config.public_health,
        };
        gate.reload()?;
        Ok(gate)
    }

    /// Whether no key is configured anywhere (every request is the `default` tenant's).
    pub fn is_open(&self) -> bool {
        self.from_config.is_empty() && self.file.is_none()
    }

    /// Reads the keys file again; on an error the keys in use stay. Returns the keys known.
    pub fn reload(&self) -> Result<usize, String> {
        let mut keys = self.from_config.clone();
        if let Some(path) = &self.file {
            *self.file_stamp.lock().unwrap() = stamp(path);
            keys.extend(read_keys_file(path, self.defaults)?);
        }
        let n = keys.len();
        self.keys.store(Arc::new(keys));
        Ok(n)
    }

    /// Reloads the keys file whenever it changes, until the runtime stops.
    pub fn watch(self: &Arc<Self>) {
        let Some(path) = self.file.clone() else { return };
        let gate = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(KEYS_FILE_POLL);
            loop {
                tick.tick().await;
                let Some(gate) = gate.upgrade() else { return };
                let now = stamp(&path);
                if now == *gate.file_stamp.lock().unwrap() {
                    continue;
                }
                match gate.reload() {
                    Ok(n) => tracing::info!(file = %path.display(), keys = n, "API keys reloaded"),
                    Err(e) => {
                        *gate.file_stamp.lock().unwrap() = now;
                        tracing::error!(error = %e, "API keys file not reloaded; the keys in use stay");
                    }
                }
            }
        });
    }

    /// Checks the request's key and takes its place among the key's limits.
    pub fn admit(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        if self.is_open() {
            return Ok(Caller { tenant: "default".into(), key_id: String::new(), permit: Permit(None) });
        }
        let presented = presented(headers).filter(|k| !k.is_empty()).ok_or_else(|| {
            ApiError::invalid_api_key("this server needs an API key: send `Authorization: Bearer <key>`")
        })?;
        let h = hash(presented);
        let key = self.keys.load().get(&h).cloned().ok_or_else(|| ApiError::invalid_api_key("invalid API key"))?;
        let key_id: String = h[..4].iter().map(|b| format!("{b:02x}")).collect();
        let limiter = self
            .limiters
            .lock()
            .unwrap()
            .entry(h)
            .or_insert_with(|| {
                let full = key.limits.per_minute as f64;
                Arc::new(Limiter { in_flight: AtomicUsize::new(0), bucket: Mutex::new((full, Instant::now())) })
            })
            .clone();
        let Limits { max_concurrent, per_minute } = key.limits;
        let in_flight = limiter.in_flight.fetch_add(1, Ordering::Relaxed);
        let permit = Permit(Some(limiter.clone()));
        if max_concurrent > 0 && in_flight >= max_concurrent {
            return Err(ApiError::rate_limited(
                "concurrency_limit_exceeded",
                format!("this key already has {max_concurrent} requests in flight, its limit"),
                1,
            ));
        }
        if per_minute > 0 {
            let mut b = limiter.bucket.lock().unwrap();
            let rate = per_minute as f64 / 60.0;
            let now = Instant::now();
            b.0 = (b.0 + rate * now.duration_since(b.1).as_secs_f64()).min(per_minute as f64);
            b.1 = now;
            if b.0 < 1.0 {
                let wait = ((1.0 - b.0) / rate).ceil() as u64;
                return Err(ApiError::rate_limited(
                    "rate_limit_exceeded",
                    format!("this key may start {per_minute} requests per minute"),
                    wait,
                ));
            }
            b.0 -= 1.0;
        }
        Ok(Caller { tenant: key.tenant, key_id, permit })
    }

    /// The shared namespaces `tenant` uses.
    fn shared_of(&self, tenant: &str) -> impl Iterator<Item = &SharedNamespaceConfig> {
        self.shared.iter().filter(move |s| s.tenants.iter().any(|t| t == "*" || t == tenant))
    }

    /// Where a request of `tenant` reads and writes chunks; `write_shared` asks to store
    /// into a shared namespace (it must be one the tenant uses: 403 otherwise).
    pub fn scope(&self, tenant: &str, write_shared: Option<&str>) -> Result<Scope, ApiError> {
        let own = tenant_namespace(tenant);
        let mut read = vec![own.clone()];
        read.extend(self.shared_of(tenant).map(|s| shared_namespace(&s.name)));
        let write = match write_shared {
            None => own,
            Some(name) if self.shared_of(tenant).any(|s| s.name == name) => shared_namespace(name),
            Some(name) => {
                return Err(ApiError::forbidden(
                    "kvgate.namespace",
                    format!("`{name}` is not a shared namespace this key may use"),
                ));
            }
        };
        Ok(Scope { write, read })
    }
}

/// The request's id: its `x-request-id` when that is 1–128 visible ASCII characters, else a
/// new one.
pub fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| (1..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(key: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(hyper::header::AUTHORIZATION, format!("Bearer {key}").parse().unwrap());
        h
    }

    fn config(keys: &[(&str, &str)]) -> Config {
        let mut c = Config::default();
        for (key, tenant) in keys {
            c.api_key_entries.push(ApiKeyConfig {
                key: Some(key.to_string()),
                sha256: None,
                tenant: tenant.to_string(),
                max_concurrent: Some(2),
                requests_per_minute: None,
            });
        }
        c
    }

    #[test]
    fn keys_map_to_tenants_and_unknown_keys_are_refused() {
        let g = Gate::new(&config(&[("k1", "acme"), ("k2", "globex")])).unwrap();
        assert_eq!(&*g.admit(&headers("k1")).unwrap().tenant, "acme");
        assert_eq!(&*g.admit(&headers("k2")).unwrap().tenant, "globex");
        assert_eq!(g.admit(&headers("nope")).err().unwrap().status, hyper::StatusCode::UNAUTHORIZED);
        assert_eq!(g.admit(&HeaderMap::new()).err().unwrap().status, hyper::StatusCode::UNAUTHORIZED);
        assert!(Gate::new(&Config::default()).unwrap().is_open());
    }

    #[test]
    fn concurrency_is_limited_per_key_and_given_back() {
        let g = Gate::new(&config(&[("k1", "acme"), ("k2", "acme")])).unwrap();
        let a = g.admit(&headers("k1")).unwrap();
        let _b = g.admit(&headers("k1")).unwrap();
        let e = g.admit(&headers("k1")).err().unwrap();
        assert_eq!((e.status, e.retry_after), (hyper::StatusCode::TOO_MANY_REQUESTS, Some(1)));
        assert!(g.admit(&headers("k2")).is_ok(), "another key has its own limit");
        drop(a);
        assert!(g.admit(&headers("k1")).is_ok());
    }

    #[test]
    fn the_rate_bucket_refuses_the_request_past_the_minute_s_allowance() {
        let mut c = config(&[("k1", "acme")]);
        c.api_key_entries[0].max_concurrent = None;
        c.api_key_entries[0].requests_per_minute = Some(3);
        let g = Gate::new(&c).unwrap();
        for _ in 0..3 {
            g.admit(&headers("k1")).unwrap();
        }
        let e = g.admit(&headers("k1")).err().unwrap();
        assert_eq!(e.code, "rate_limit_exceeded");
        assert!(e.retry_after.is_some_and(|s| (1..=20).contains(&s)), "{:?}", e.retry_after);
    }

    #[test]
    fn tenants_read_their_own_and_their_shared_namespaces() {
        let mut c = config(&[("k1", "acme")]);
        c.shared_namespaces.push(SharedNamespaceConfig { name: "docs".into(), tenants: vec!["acme".into()] });
        c.shared_namespaces.push(SharedNamespaceConfig { name: "other".into(), tenants: vec!["globex".into()] });
        let g = Gate::new(&c).unwrap();
        let s = g.scope("acme", None).unwrap();
        assert_eq!(s.write, tenant_namespace("acme"));
        assert_eq!(s.read, vec![tenant_namespace("acme"), shared_namespace("docs")]);
        assert_eq!(g.scope("acme", Some("docs")).unwrap().write, shared_namespace("docs"));
        assert_eq!(g.scope("acme", Some("other")).unwrap_err().status, hyper::StatusCode::FORBIDDEN);
        assert_eq!(tenant_namespace("default"), Namespace::default());
    }

    #[test]
    fn a_keys_file_holds_hashes_and_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let entry = |key: &str, tenant: &str| {
            format!("[[api_key]]\nsha256 = \"{}\"\ntenant = \"{tenant}\"\n", key_hash_hex(key))
        };
        std::fs::write(&path, entry("k1", "acme")).unwrap();
        let mut c = Config::default();
        c.api_keys_file = Some(path.clone());
        let g = Gate::new(&c).unwrap();
        assert_eq!(&*g.admit(&headers("k1")).unwrap().tenant, "acme");
        assert!(g.admit(&headers("k2")).is_err());
        std::fs::write(&path, entry("k1", "acme") + &entry("k2", "globex")).unwrap();
        assert_eq!(g.reload().unwrap(), 2);
        assert_eq!(&*g.admit(&headers("k2")).unwrap().tenant, "globex");
        std::fs::write(&path, "[[api_key]]\nkey = \"plain\"\n").unwrap();
        assert!(g.reload().is_err(), "plain keys are refused in the file");
        assert!(g.admit(&headers("k2")).is_ok(), "the keys in use stay");
    }

    #[test]
    fn request_ids_are_taken_when_sane_and_made_otherwise() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", "abc-123".parse().unwrap());
        assert_eq!(request_id(&h), "abc-123");
        h.insert("x-request-id", "has space".parse().unwrap());
        assert_eq!(request_id(&h).len(), 32);
        assert_eq!(request_id(&HeaderMap::new()).len(), 32);
    }
}
