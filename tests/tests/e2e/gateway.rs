//! kvgate as a gateway: upstreams, API keys and tenants, isolation of cached KV, limits,
//! request ids — each against real servers over HTTP (a second kvgate is the upstream).

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::util::{Server, sse_events, temp_dir};

/// Server arguments naming a config file, which lives as long as they do (a server reads it
/// once, at start).
struct ConfigArgs {
    args: Vec<String>,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for ConfigArgs {
    type Target = Vec<String>;
    fn deref(&self) -> &Vec<String> {
        &self.args
    }
}

impl std::ops::DerefMut for ConfigArgs {
    fn deref_mut(&mut self) -> &mut Vec<String> {
        &mut self.args
    }
}

/// Writes `text` as a config file; returns the `--config` arguments.
fn config(text: &str) -> ConfigArgs {
    let dir = temp_dir("config");
    let path = dir.path().join("kvgate.toml");
    std::fs::write(&path, text).expect("write the config");
    ConfigArgs { args: vec!["--config".into(), path.display().to_string()], _dir: dir }
}

/// A server serving the model as `smollm2`, with these arguments.
fn start(args: &[String]) -> Server {
    let mut all = vec!["--model-name", "smollm2"];
    all.extend(args.iter().map(String::as_str));
    Server::start(&all)
}

/// A request's status, headers we look at, and JSON body.
struct Answer {
    status: u16,
    request_id: Option<String>,
    retry_after: Option<String>,
    body: Value,
}

fn call(s: &Server, path: &str, key: Option<&str>, headers: &[(&str, &str)], body: &Value) -> Answer {
    let mut r = ureq::post(&s.url(path)).set("content-type", "application/json");
    if let Some(k) = key {
        r = r.set("authorization", &format!("Bearer {k}"));
    }
    for (k, v) in headers {
        r = r.set(k, v);
    }
    let r = match r.send_string(&body.to_string()) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("request failed: {e}"),
    };
    let (status, request_id, retry_after) =
        (r.status(), r.header("x-request-id").map(str::to_string), r.header("retry-after").map(str::to_string));
    let text = r.into_string().expect("body");
    Answer { status, request_id, retry_after, body: serde_json::from_str(&text).unwrap_or(Value::String(text)) }
}

fn chat(model: &str, content: &str, max_tokens: usize) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
           "temperature": 0})
}

fn get_json(s: &Server, path: &str) -> Value {
    ureq::get(&s.url(path)).call().expect("GET").into_json().expect("JSON")
}

/// An OpenAI-shaped error with this status and code.
fn assert_error(a: &Answer, status: u16, code: &str) {
    assert_eq!(a.status, status, "{}", a.body);
    assert_eq!(a.body["error"]["code"], code, "{}", a.body);
    assert!(a.body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", a.body);
    assert!(a.body["error"]["type"].is_string(), "{}", a.body);
}

#[test]
fn an_upstream_serves_its_models_streaming_piece_by_piece_and_not() {
    let up = Server::start(&["--model-name", "up-model"]);
    let gw = start(&config(&format!(
        "[[upstream]]\nname = \"second\"\nurl = \"{}/v1\"\nmodels = [\"up-model\"]\n",
        up.base
    )));

    // Not streamed: the upstream's answer, with our request id.
    let a = call(&gw, "/v1/chat/completions", None, &[("x-request-id", "req-up-1")], &chat("up-model", "Hi", 4));
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["model"], "up-model");
    assert_eq!(a.request_id.as_deref(), Some("req-up-1"));
    // The local model is still served here.
    let a = call(&gw, "/v1/chat/completions", None, &[], &chat("smollm2", "Hi", 2));
    assert_eq!((a.status, a.body["model"].as_str()), (200, Some("smollm2")));
    // Both are listed.
    let models: Vec<String> = get_json(&gw, "/v1/models")["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().into())
        .collect();
    assert!(models.contains(&"smollm2".into()) && models.contains(&"up-model".into()), "{models:?}");

    // Streamed: the first event reaches the client while the upstream is still generating.
    let body = json!({"model": "up-model", "messages": [{"role": "user", "content": "Tell me a long story."}],
                      "max_tokens": 400, "ignore_eos": true, "stream": true});
    let r = ureq::post(&gw.url("/v1/chat/completions")).send_string(&body.to_string()).expect("stream");
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let mut reader = BufReader::new(r.into_reader());
    let mut first = String::new();
    while !first.starts_with("data: ") {
        first.clear();
        reader.read_line(&mut first).expect("a line");
    }
    let in_flight = up.metric("kvgate:num_requests_in_flight");
    assert!(in_flight >= 1.0, "the upstream had finished before the first event was relayed");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut reader, &mut rest).unwrap();
    let events = sse_events(&(first + &rest));
    assert!(events.len() > 100, "{} events", events.len());

    // The upstream's own error comes back as it sent it.
    let mut bad = chat("up-model", "Hi", 4);
    bad["n"] = json!(99);
    let a = call(&gw, "/v1/chat/completions", None, &[], &bad);
    assert_eq!((a.status, a.body["error"]["param"].as_str()), (400, Some("n")), "{}", a.body);

    // Health: polled at start, shown on /ready and /metrics.
    let deadline = Instant::now() + Duration::from_secs(15);
    while get_json(&gw, "/ready")["upstreams"][0]["health"] != "up" {
        assert!(Instant::now() < deadline, "upstream never reported up: {}", get_json(&gw, "/ready"));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(gw.metric("kvgate:upstream_up"), 1.0);
    assert!(gw.metric("kvgate:upstream_requests_total") >= 3.0);
}

#[test]
fn an_unreachable_upstream_is_a_502_and_a_silent_one_a_504() {
    // Accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let gw = start(&config(&format!(
        "[[upstream]]\nname = \"gone\"\nurl = \"http://127.0.0.1:{closed_port}/v1\"\nmodels = [\"gone-model\"]\n\
         [[upstream]]\nname = \"silent\"\nurl = \"http://127.0.0.1:{silent_port}/v1\"\nmodels = [\"silent-model\"]\ntimeout_secs = 1\n"
    )));
    assert_error(
        &call(&gw, "/v1/chat/completions", None, &[], &chat("gone-model", "Hi", 2)),
        502,
        "upstream_unreachable",
    );
    assert_error(
        &call(&gw, "/v1/chat/completions", None, &[], &chat("silent-model", "Hi", 2)),
        504,
        "upstream_timeout",
    );
    assert_error(
        &call(&gw, "/v1/chat/completions", None, &[], &chat("no-such-model", "Hi", 2)),
        404,
        "model_not_found",
    );
    assert_eq!(gw.metric("kvgate:upstream_failures_total"), 1.0, "the first upstream's failures");
    drop(silent);
}

#[test]
fn keys_limits_and_sizes_are_enforced_with_openai_shaped_errors() {
    let mut args = config(
        "[[api_key]]\nkey = \"solo\"\ntenant = \"acme\"\nmax_concurrent = 1\n\
         [[api_key]]\nkey = \"slow\"\ntenant = \"acme\"\nrequests_per_minute = 2\n",
    );
    for a in
        ["--api-key", "k1", "--max-body-bytes", "4096", "--max-completion-tokens", "600", "--max-prompt-tokens", "60"]
    {
        args.push(a.into());
    }
    let gw = start(&args);
    let hi = chat("smollm2", "Hi", 2);
    assert_error(&call(&gw, "/v1/chat/completions", None, &[], &hi), 401, "invalid_api_key");
    assert_error(&call(&gw, "/v1/chat/completions", Some("wrong"), &[], &hi), 401, "invalid_api_key");
    assert_eq!(ureq::get(&gw.url("/health")).call().unwrap().status(), 200, "health stays public");
    let a = call(&gw, "/v1/chat/completions", Some("k1"), &[], &hi);
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.request_id.map(|id| id.len()), Some(32), "a request id is made when none is sent");

    // One request in flight for `solo`: a second is refused with Retry-After until it ends.
    let long = json!({"messages": [{"role": "user", "content": "Count."}], "max_tokens": 500, "ignore_eos": true,
                      "stream": true});
    let r =
        ureq::post(&gw.url("/v1/chat/completions")).set("authorization", "Bearer solo").send_string(&long.to_string());
    let mut reader = BufReader::new(r.expect("stream").into_reader());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let a = call(&gw, "/v1/chat/completions", Some("solo"), &[], &hi);
    assert_error(&a, 429, "concurrency_limit_exceeded");
    assert_eq!(a.retry_after.as_deref(), Some("1"));
    std::io::Read::read_to_string(&mut reader, &mut String::new()).unwrap();
    assert_eq!(call(&gw, "/v1/chat/completions", Some("solo"), &[], &hi).status, 200);

    // Two requests a minute for `slow`.
    for _ in 0..2 {
        assert_eq!(call(&gw, "/v1/chat/completions", Some("slow"), &[], &hi).status, 200);
    }
    let a = call(&gw, "/v1/chat/completions", Some("slow"), &[], &hi);
    assert_error(&a, 429, "rate_limit_exceeded");
    assert!(a.retry_after.and_then(|s| s.parse::<u64>().ok()).is_some_and(|s| (1..=30).contains(&s)));
    assert!(gw.metric("kvgate:request_rejected_limits_total") >= 2.0);
    assert!(gw.metric("kvgate:request_rejected_auth_total") >= 2.0);

    // Sizes: the body, the prompt, the completion.
    let big = chat("smollm2", &"word ".repeat(2000), 2);
    assert_error(&call(&gw, "/v1/chat/completions", Some("k1"), &[], &big), 413, "request_too_large");
    let long_prompt = chat("smollm2", &"word ".repeat(100), 2);
    assert_error(&call(&gw, "/v1/chat/completions", Some("k1"), &[], &long_prompt), 400, "prompt_too_long");
    let a = call(&gw, "/v1/chat/completions", Some("k1"), &[], &chat("smollm2", "Hi", 601));
    assert_error(&a, 400, "invalid_value");
    assert_eq!(a.body["error"]["param"], "max_tokens");
}

#[test]
fn a_request_past_the_timeout_is_cut_off_with_a_504() {
    let gw = Server::start(&["--request-timeout-secs", "1", "--model-name", "smollm2"]);
    // 3000 tokens take seconds on any machine this runs on; the limit is one second.
    let long = json!({"messages": [{"role": "user", "content": "Count."}], "max_tokens": 3000, "ignore_eos": true});
    assert_error(&call(&gw, "/v1/chat/completions", None, &[], &long), 504, "request_timeout");
    let mut streamed = long.clone();
    streamed["stream"] = json!(true);
    let events = sse_events(&gw.stream("/v1/chat/completions", &streamed));
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["error"]["code"], "request_timeout", "{last}");
    // The cut-off sequences are freed: the engine answers the next request.
    assert_eq!(call(&gw, "/v1/chat/completions", None, &[], &chat("smollm2", "Hi", 2)).status, 200);
}

const PASSAGES: [&str; 3] = [
    "Cargo is the Rust package manager. It downloads the crates a package depends on, compiles \
     them and the package itself, runs its tests and benchmarks, builds its documentation and \
     publishes it to the registry, so that other packages can depend on it in turn.",
    "Ownership is the set of rules that govern how a Rust program manages memory. Each value has \
     exactly one owner; when the owner goes out of scope the value is dropped, and references \
     borrow a value without taking ownership of it, checked at compile time.",
    "Traits define functionality a particular type has and can share with other types. Trait \
     bounds let generic code say which behaviour a type must have, and the compiler checks \
     every use against them, so generic functions work for every type that qualifies.",
];

/// Passages sent only to the shared namespace.
const SHARED: [&str; 3] = [
    "Closures are anonymous functions that can capture values from the scope in which they are \
     defined. They can be stored in variables or passed as arguments, and the compiler infers \
     their parameter and return types from how they are used in the surrounding code.",
    "Iterators produce a sequence of values one at a time. Adapters such as map and filter build \
     new iterators lazily, and consumers such as collect and sum run the whole chain, which the \
     compiler optimises into loops as fast as hand-written ones in most programs.",
    "Smart pointers like Box, Rc and RefCell own data on the heap and add behaviour to plain \
     references: single ownership with a fixed size, shared ownership counted at run time, and \
     mutation checked at run time instead of at compile time, respectively.",
];

fn rag(order: [usize; 3], question: &str) -> Value {
    rag_of(&PASSAGES, order, question)
}

fn rag_of(passages: &[&str; 3], order: [usize; 3], question: &str) -> Value {
    let context: Vec<String> =
        order.iter().enumerate().map(|(i, &p)| format!("Passage {}:\n{}", i + 1, passages[p])).collect();
    json!({"messages": [
        {"role": "system", "content": "Answer using only the passages."},
        {"role": "user", "content": format!("{}\n\nQuestion: {question}", context.join("\n\n"))},
    ], "max_tokens": 2, "temperature": 0})
}

fn reused(a: &Answer) -> u64 {
    assert_eq!(a.status, 200, "{}", a.body);
    a.body["kvgate"]["reused_tokens"].as_u64().expect("kvgate.reused_tokens")
}

#[test]
fn a_tenant_never_reuses_another_s_chunks_but_a_shared_namespace_is_shared() {
    let gw = start(&config(
        "[[api_key]]\nkey = \"ka\"\ntenant = \"alpha\"\n[[api_key]]\nkey = \"kb\"\ntenant = \"beta\"\n\
         [[shared_namespace]]\nname = \"corpus\"\ntenants = [\"alpha\", \"beta\"]\n",
    ));
    let ask = |key, body: &Value| call(&gw, "/v1/chat/completions", Some(key), &[], body);
    assert_eq!(reused(&ask("ka", &rag([0, 1, 2], "What does Cargo do?"))), 0);
    // Alpha's passages, reordered: alpha reuses them, beta computes everything.
    assert!(reused(&ask("ka", &rag([2, 0, 1], "What is ownership?"))) > 100);
    let b = ask("kb", &rag([2, 0, 1], "What is ownership?"));
    assert_eq!(reused(&b), 0, "beta reused alpha's chunks: {}", b.body["kvgate"]);
    assert_eq!(b.body["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(b.body["kvgate"]["computed_tokens"], b.body["usage"]["prompt_tokens"], "a full prefill");

    // What alpha stores in the shared namespace, beta reuses.
    let mut to_corpus = rag_of(&SHARED, [1, 0, 2], "Name the passages.");
    to_corpus["kvgate"] = json!({"namespace": "corpus"});
    // Alpha reuses only its own system prompt here; the passages go to the shared namespace.
    assert!(reused(&ask("ka", &to_corpus)) < 40);
    let c = ask("kb", &rag_of(&SHARED, [0, 2, 1], "Which passage is about closures?"));
    assert!(reused(&c) > 100, "beta did not reuse the shared namespace: {}", c.body["kvgate"]);
    // A namespace the key may not use is refused.
    let mut other = rag([0, 1, 2], "Hi");
    other["kvgate"] = json!({"namespace": "elsewhere"});
    assert_error(&ask("kb", &other), 403, "permission_denied");

    // The admin listing filters by tenant.
    let listed = |q: &str| get_json(&gw, &format!("/admin/chunks?limit=1000&{q}"))["data"].as_array().unwrap().clone();
    let alpha = listed("tenant=alpha");
    assert!(!alpha.is_empty() && alpha.iter().all(|c| c["namespace"] == "tenant:alpha"));
    assert!(listed("tenant=beta").iter().all(|c| c["namespace"] == "tenant:beta"));
    assert!(!listed("namespace=shared:corpus").is_empty());
}

#[test]
fn a_tenant_s_budget_holds_while_another_floods_the_store() {
    // RAM only, 48 MiB, each tenant at most half: about four 256-token chunks each.
    let mut args =
        config("[[api_key]]\nkey = \"ka\"\ntenant = \"alpha\"\n[[api_key]]\nkey = \"kb\"\ntenant = \"beta\"\n");
    for a in ["--ram-budget-bytes", "48MiB", "--disk-budget-bytes", "0", "--namespace-share", "0.5"] {
        args.push(a.into());
    }
    let gw = start(&args);
    assert_eq!(call(&gw, "/v1/chat/completions", Some("ka"), &[], &rag([0, 1, 2], "What does Cargo do?")).status, 200);
    let chunks = |tenant: &str| {
        get_json(&gw, &format!("/admin/chunks?limit=1000&tenant={tenant}"))["data"].as_array().unwrap().clone()
    };
    let alpha_before: Vec<Value> = chunks("alpha").iter().map(|c| c["key"].clone()).collect();
    assert!(!alpha_before.is_empty());
    // Beta floods: distinct long prompts, far more than its share.
    for i in 0..12 {
        let text = format!("Flood {i}: {}", (0..120).map(|w| format!("w{i}x{w}")).collect::<Vec<_>>().join(" "));
        assert_eq!(call(&gw, "/v1/chat/completions", Some("kb"), &[], &chat("smollm2", &text, 1)).status, 200);
    }
    let alpha_after: Vec<Value> = chunks("alpha").iter().map(|c| c["key"].clone()).collect();
    assert_eq!(alpha_after, alpha_before, "beta's flood evicted alpha's chunks");
    let beta_bytes: u64 = chunks("beta").iter().map(|c| c["bytes"].as_u64().unwrap()).sum();
    assert!(beta_bytes > 0 && beta_bytes <= 24 << 20, "beta holds {beta_bytes} bytes, over its half of 48 MiB");
}

#[test]
fn log_lines_carry_the_request_id_as_json() {
    let log_dir = temp_dir("log");
    let log = log_dir.path().join("kvgate.log");
    let mut gw = Server::start_logged(&["--log-format", "json", "--log", "info", "--model-name", "smollm2"], &log);
    let a = call(&gw, "/v1/chat/completions", None, &[("x-request-id", "trace-me-42")], &chat("smollm2", "Hi", 2));
    assert_eq!((a.status, a.request_id.as_deref()), (200, Some("trace-me-42")));
    let bad = call(&gw, "/v1/chat/completions", None, &[("x-request-id", "trace-me-43")], &json!({"messages": 3}));
    assert_eq!(bad.status, 400);
    gw.stop();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<Value> =
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}"))).collect();
    let of = |id: &str| -> Vec<&Value> { lines.iter().filter(|l| l["span"]["id"] == id).collect() };
    let ok = of("trace-me-42");
    assert!(ok.iter().any(|l| l["fields"]["status"] == 200 && l["fields"]["path"] == "/v1/chat/completions"), "{text}");
    assert!(of("trace-me-43").iter().any(|l| l["fields"]["status"] == 400), "{text}");
}
