//! The OpenAI-compatible API over real HTTP, against a real `kvgate serve`.

use serde_json::{Value, json};

use crate::util::{Server, sse_events, test_server};

fn question(q: &str) -> Value {
    json!({"model": "smollm2-test", "messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 24})
}

/// A chat answer, greedy. What the 135M model writes is not asserted: its greedy text turns
/// on near-ties (here a 0.2-nat margin decides between "17 times 3 is 51." and "17 * 3 = 42"),
/// which another CPU may round the other way. The shape of the answer is asserted;
/// `completion_stream_and_logprobs` checks a choice the model makes with a clear margin.
#[test]
fn answers_a_chat_question_with_greedy_decoding() {
    let s = test_server();
    let mut body = question("What is 17 times 3?");
    body.as_object_mut().unwrap().remove("model");
    let (status, r) = s.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{r}");
    let text = r["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!text.trim().is_empty(), "{r}");
    assert!(["stop", "length"].contains(&r["choices"][0]["finish_reason"].as_str().unwrap()), "{r}");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    assert_eq!(r["object"], "chat.completion");
    let u = &r["usage"];
    assert_eq!(u["prompt_tokens"], 39);
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap())
    );
    assert_eq!(u["prompt_tokens_details"]["cached_tokens"], 0);
}

#[test]
fn chat_stream_frames_like_openai_and_matches_the_whole_response() {
    let s = test_server();
    let mut body = question("Explain what a hash map is in one sentence.");
    body["model"] = json!(null);
    body.as_object_mut().unwrap().remove("model");
    // Both prefilled in full, so that the second does not reuse what the first stored.
    body["kvgate"] = json!({"cache": "off"});
    let (_, whole) = s.post("/v1/chat/completions", &body);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let events = sse_events(&s.stream("/v1/chat/completions", &body));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let id = &chunks[0]["id"];
    let mut text = String::new();
    for c in &chunks[..chunks.len() - 1] {
        assert_eq!(&c["id"], id);
        assert_eq!(c["object"], "chat.completion.chunk");
        assert!(c["usage"].is_null());
        text.push_str(c["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
    }
    let finals: Vec<&Value> = chunks.iter().filter(|c| !c["choices"][0]["finish_reason"].is_null()).collect();
    assert_eq!(finals.len(), 1);
    assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap());
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], whole["usage"]);
}

#[test]
fn completion_stream_and_logprobs() {
    let s = test_server();
    let body = json!({"prompt": "The capital of France is", "temperature": 0, "max_tokens": 6, "logprobs": 3});
    let (status, r) = s.post("/v1/completions", &body);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "text_completion");
    // A choice the model makes by a clear margin (2.5 nats, against at most 1.3 of rounding
    // between implementations): the answer, on any machine.
    assert!(r["choices"][0]["text"].as_str().unwrap().starts_with(" Paris"), "{r}");
    let lp = &r["choices"][0]["logprobs"];
    let n = r["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert_eq!(lp["tokens"].as_array().unwrap().len(), n);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), n);
    assert_eq!(
        lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect::<String>(),
        r["choices"][0]["text"].as_str().unwrap()
    );
    for (top, chosen) in lp["top_logprobs"].as_array().unwrap().iter().zip(lp["token_logprobs"].as_array().unwrap()) {
        let top = top.as_object().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        let best = top.values().map(|v| v.as_f64().unwrap()).fold(f64::NEG_INFINITY, f64::max);
        assert!((best - chosen.as_f64().unwrap()).abs() < 1e-6);
    }
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let events = sse_events(&s.stream("/v1/completions", &sbody));
    let text: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(text, r["choices"][0]["text"].as_str().unwrap());
}

#[test]
fn chat_logprobs_report_top_alternatives() {
    let s = test_server();
    let mut body = question("What is 17 times 3?");
    body.as_object_mut().unwrap().remove("model");
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(2);
    let (_, r) = s.post("/v1/chat/completions", &body);
    let content = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len() as u64, r["usage"]["completion_tokens"].as_u64().unwrap() - 1, "all but <|im_end|>");
    for c in content {
        assert_eq!(c["top_logprobs"].as_array().unwrap().len(), 2);
        assert!(c["logprob"].as_f64().unwrap() <= 0.0);
    }
}

#[test]
fn stop_strings_end_generation_and_are_not_returned() {
    let s = test_server();
    let body = json!({"prompt": "Count: 1, 2, 3, 4,", "temperature": 0, "max_tokens": 30, "stop": [" 7"]});
    let (_, r) = s.post("/v1/completions", &body);
    let text = r["choices"][0]["text"].as_str().unwrap();
    assert_eq!(r["choices"][0]["finish_reason"], "stop", "{text:?}");
    assert!(text.contains("6") && !text.contains(" 7"), "{text:?}");
}

#[test]
fn seeded_sampling_is_reproducible() {
    let s = test_server();
    let body = json!({"prompt": "Once upon a time", "temperature": 0.9, "top_p": 0.95, "seed": 42, "max_tokens": 16});
    let (_, a) = s.post("/v1/completions", &body);
    let (_, b) = s.post("/v1/completions", &body);
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
}

/// Writes `request` on a fresh connection (ignoring a server that stops reading) and parses
/// the response's status and JSON body.
fn raw_request(s: &Server, request: &str) -> (u16, Value) {
    use std::io::{Read, Write};
    let mut sock = std::net::TcpStream::connect(s.base.trim_start_matches("http://")).unwrap();
    let _ = sock.write_all(request.as_bytes());
    let mut response = Vec::new();
    let _ = sock.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response);
    let status =
        response.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no status: {response}"));
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body:?}")))
}

fn assert_error(status: u16, body: &Value, want_status: u16, want_code: &str) {
    assert_eq!(status, want_status, "{body}");
    let e = &body["error"];
    assert_eq!(e["code"], want_code, "{body}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(e["type"].is_string());
    assert!(e.as_object().unwrap().contains_key("param"));
}

#[test]
fn client_errors_get_openai_shaped_json_with_the_right_status() {
    let s = test_server();
    let (st, b) = s.post_raw("/v1/chat/completions", "{\"messages\": [");
    assert_error(st, &b, 400, "invalid_json");
    let mut wrong_model = question("hi");
    wrong_model["model"] = json!("gpt-4");
    let (st, b) = s.post("/v1/chat/completions", &wrong_model);
    assert_error(st, &b, 404, "model_not_found");
    let (st, b) =
        s.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8190}));
    assert_error(st, &b, 400, "context_length_exceeded");
    let msg = b["error"]["message"].as_str().unwrap();
    assert!(msg.contains("8192") && msg.contains("8190"), "{msg}");
    let (st, b) = s.post("/v1/completions", &json!({"prompt": "hi", "temperature": -1}));
    assert_error(st, &b, 400, "invalid_value");
    assert_eq!(b["error"]["param"], "temperature");
    let (st, b) = s.post("/v1/completions", &json!({"prompt": [1, 2, 999999]}));
    assert_error(st, &b, 400, "invalid_value");
    // A declared length over the limit is refused before the body is read ...
    let (st, b) = raw_request(&s, "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 9437184\r\n\r\n");
    assert_error(st, &b, 413, "request_too_large");
    // ... and so is a chunked body that grows past it.
    let chunk = "x".repeat(1 << 20);
    let mut req = String::from("POST /v1/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n");
    for _ in 0..9 {
        req.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
    }
    req.push_str("0\r\n\r\n");
    let (st, b) = raw_request(&s, &req);
    assert_error(st, &b, 413, "request_too_large");
    let r = ureq::get(&s.url("/v1/chat/completions")).call();
    let Err(ureq::Error::Status(405, r)) = r else { panic!("GET on a POST route must be 405") };
    assert_eq!(r.header("allow"), Some("POST"));
    let b: Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
    assert_error(405, &b, 405, "method_not_allowed");
    let Err(ureq::Error::Status(404, r)) = ureq::get(&s.url("/v2/nothing")).call() else {
        panic!("unknown route must be 404")
    };
    let b: Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
    assert_error(404, &b, 404, "not_found");
    // Nothing above wedged the server.
    let (st, _) = s.post("/v1/completions", &json!({"prompt": "hi", "max_tokens": 2}));
    assert_eq!(st, 200);
}

#[test]
fn health_ready_models_and_metrics() {
    let s = test_server();
    let (st, _) = s.post("/v1/completions", &json!({"prompt": "hi", "max_tokens": 2}));
    assert_eq!(st, 200);
    let get = |p: &str| ureq::get(&s.url(p)).call().unwrap();
    assert_eq!(get("/health").status(), 200);
    assert_eq!(get("/ready").status(), 200);
    let models: Value = serde_json::from_str(&get("/v1/models").into_string().unwrap()).unwrap();
    assert_eq!(models["data"][0]["id"], "smollm2-test");
    assert_eq!(models["data"][0]["max_model_len"], 8192);
    let value = |name: &str| s.metric(name);
    assert!(value("kvgate:prompt_tokens_total") >= 1.0);
    assert!(value("kvgate:generation_tokens_total") >= 2.0);
    assert!(value("kvgate:time_to_first_token_seconds_count") >= 1.0);
    assert!(value("kvgate:e2e_request_latency_seconds_count") >= 1.0);
}

/// With a queue of one, a third concurrent request is refused with 429 while the first runs
/// and the second waits; both accepted requests still finish.
#[test]
fn a_full_queue_answers_429_and_loses_nothing() {
    let s = Server::start(&["--queue-capacity", "1", "--max-running", "1", "--model-name", "smollm2-test"]);
    let long = json!({"prompt": "Tell me a long story.", "max_tokens": 200, "ignore_eos": true, "temperature": 0});
    let running = {
        let url = s.url("/v1/completions");
        let body = long.to_string();
        std::thread::spawn(move || ureq::post(&url).send_string(&body).map(|r| r.status()).unwrap_or(0))
    };
    // Wait until the first request is running (it is no longer in the queue).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let m = ureq::get(&s.url("/metrics")).call().unwrap().into_string().unwrap();
        if m.contains("kvgate:num_requests_in_flight 1") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "first request never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let others: Vec<_> = (0..2)
        .map(|_| {
            let url = s.url("/v1/completions");
            let body = json!({"prompt": "hi", "max_tokens": 4}).to_string();
            std::thread::spawn(move || match ureq::post(&url).send_string(&body) {
                Ok(r) => (r.status(), String::new()),
                Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
                Err(e) => panic!("{e}"),
            })
        })
        .collect();
    let mut statuses: Vec<(u16, String)> = others.into_iter().map(|t| t.join().unwrap()).collect();
    statuses.sort();
    assert_eq!(statuses[0].0, 200, "{statuses:?}");
    assert_eq!(statuses[1].0, 429, "{statuses:?}");
    assert!(statuses[1].1.contains("queue_full"), "{}", statuses[1].1);
    assert_eq!(running.join().unwrap(), 200);
}

/// A client that hangs up mid-stream does not keep the engine busy: the abandoned request
/// is dropped at its next token instead of running to its 4000 tokens.
#[test]
fn a_dropped_stream_frees_the_engine() {
    use std::io::{BufRead, Write};
    let s = test_server();
    let addr = s.base.trim_start_matches("http://").to_string();
    let body =
        json!({"prompt": "Tell me a long story.", "max_tokens": 4000, "ignore_eos": true, "stream": true}).to_string();
    {
        let mut sock = std::net::TcpStream::connect(&addr).unwrap();
        write!(sock, "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()).unwrap();
        let mut reader = std::io::BufReader::new(sock);
        let mut line = String::new();
        while !line.starts_with("data: ") {
            line.clear();
            reader.read_line(&mut line).unwrap();
        }
    } // hang up after the first token
    let (st, _) = s.post("/v1/completions", &json!({"prompt": "hi", "max_tokens": 4, "ignore_eos": true}));
    assert_eq!(st, 200, "others are served meanwhile");
    let value = |name: &str| s.metric(name) as u64;
    // The scheduler drops the request at its next step once it sees the client gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while value("kvgate:requests_cancelled_total") < 1 || value("kvgate:num_requests_running") > 0 {
        assert!(std::time::Instant::now() < deadline, "the abandoned request was never dropped");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(value("kvgate:requests_cancelled_total"), 1);
    let generated = value("kvgate:engine_generated_tokens_total");
    assert!(generated < 1000, "the scheduler generated {generated} tokens for a client that left after one");
}

#[test]
fn sigterm_shuts_down_cleanly() {
    let mut s = Server::start(&[]);
    assert!(s.stop(), "kvgate did not exit cleanly on SIGTERM");
}

/// The cache mode and recompute budget per request over HTTP, and what reuse did, reported
/// in `usage` and the `kvgate` object of whole and streamed responses.
#[test]
fn cache_modes_per_request_and_reuse_reporting() {
    let s = test_server();
    let passages = [
        "Cargo builds Rust code, fetches crates from the registry and runs the tests of a package.",
        "Traits define shared behaviour in Rust; generic functions are bounded by them at compile time.",
        "The borrow checker forbids dangling references and data races before a program ever runs.",
    ];
    let body = |order: [usize; 3]| {
        let mut m = vec![json!({"role": "system", "content": "Answer from the passages."})];
        m.extend(order.iter().map(|&i| json!({"role": "user", "content": passages[i]})));
        m.push(json!({"role": "user", "content": "What does Cargo do?"}));
        json!({"messages": m, "temperature": 0, "max_tokens": 8})
    };
    let post = |b: &Value, headers: &[(&str, &str)]| {
        let mut r = ureq::post(&s.url("/v1/chat/completions"));
        for (k, v) in headers {
            r = r.set(k, v);
        }
        match r.send_string(&b.to_string()) {
            Ok(r) => (r.status(), serde_json::from_str::<Value>(&r.into_string().unwrap()).unwrap()),
            Err(ureq::Error::Status(c, r)) => (c, serde_json::from_str::<Value>(&r.into_string().unwrap()).unwrap()),
            Err(e) => panic!("{e}"),
        }
    };
    let (st, first) = post(&body([0, 1, 2]), &[]);
    assert_eq!(st, 200);
    assert_eq!(first["kvgate"]["mode"], "compose");
    assert_eq!(first["kvgate"]["chunks_hit"], 0);
    let (_, again) = post(&body([2, 0, 1]), &[("x-kvgate-recompute-budget", "0.3")]);
    let k = &again["kvgate"];
    assert!(k["spans"].as_u64().unwrap() >= 3, "every passage is reused: {k}");
    assert_eq!(again["usage"]["prompt_tokens_details"]["cached_tokens"], k["reused_tokens"]);
    let reused = k["reused_tokens"].as_f64().unwrap();
    assert_eq!(k["recomputed_tokens"].as_f64().unwrap(), (0.3 * reused).round());
    let (_, off) = post(&body([2, 0, 1]), &[("x-kvgate-cache", "off")]);
    assert_eq!(off["kvgate"]["mode"], "off");
    assert_eq!(off["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let mut streamed = body([1, 2, 0]);
    streamed["stream"] = json!(true);
    let events = sse_events(&s.stream("/v1/chat/completions", &streamed));
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(last["kvgate"]["spans"].as_u64().unwrap() >= 3, "{}", last["kvgate"]);
    let (st, e) = post(&body([0, 1, 2]), &[("x-kvgate-cache", "sometimes")]);
    assert_error(st, &e, 400, "invalid_value");
    let (st, e) = post(&body([0, 1, 2]), &[("x-kvgate-recompute-budget", "-0.5")]);
    assert_error(st, &e, 400, "invalid_value");
    let hit = reused + last["kvgate"]["reused_tokens"].as_f64().unwrap();
    assert_eq!(s.metric("kvgate:cache_hits_total"), hit, "prompt tokens reused, as vLLM counts them");
    let spans =
        s.metric("kvgate:cache_spans_total{kind=\"whole\"}") + s.metric("kvgate:cache_spans_total{kind=\"partial\"}");
    assert!(spans >= 6.0, "two requests reused three runs each");
    assert!(s.metric("kvgate:prompt_tokens_recomputed_total") > 0.0);
}

/// `echo` with `logprobs` and `max_tokens: 0` on `/v1/completions` (lm-evaluation-harness'
/// log-likelihood protocol): the prompt's tokens come back with the log-probability of each
/// given those before it. Teacher-forced equals free-running: on the tokens the model itself
/// generated, the echoed logprobs are the ones generation reported — exactly for the first
/// (both come from the prefill's f32 hidden state), and within the decode path's Q8_0
/// rounding for the rest.
#[test]
fn echo_scores_the_prompt_like_generation_scored_its_tokens() {
    let s = test_server();
    let prompt = "The capital of France is";
    let off = json!({"cache": "off"});
    let generate = json!({"prompt": prompt, "temperature": 0, "max_tokens": 12, "logprobs": 5, "ignore_eos": true,
                     "return_tokens_as_token_ids": true, "kvgate": off});
    let (st, g) = s.post("/v1/completions", &generate);
    assert_eq!(st, 200, "{g}");
    let ids_of = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().trim_start_matches("token_id:").parse().unwrap())
            .collect()
    };
    let generated = ids_of(&g["choices"][0]["logprobs"]["tokens"]);
    let generated_lp: Vec<f64> =
        g["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    let (_, tok) = s.post("/tokenize", &json!({"prompt": prompt}));
    let mut all =
        ids_of(&json!(tok["tokens"].as_array().unwrap().iter().map(|t| format!("token_id:{t}")).collect::<Vec<_>>()));
    let n = all.len();
    all.extend(&generated);
    let score = json!({"prompt": all, "echo": true, "max_tokens": 0, "logprobs": 5, "temperature": 0,
                       "return_tokens_as_token_ids": true, "kvgate": off});
    let (st, e) = s.post("/v1/completions", &score);
    assert_eq!(st, 200, "{e}");
    let c = &e["choices"][0];
    assert_eq!(c["finish_reason"], "length");
    assert_eq!(e["usage"]["completion_tokens"], 0);
    let lp = &c["logprobs"];
    assert_eq!(ids_of(&lp["tokens"]), all, "every prompt token comes back, in order");
    let echoed: Vec<Value> = lp["token_logprobs"].as_array().unwrap().clone();
    assert!(echoed[0].is_null() && lp["top_logprobs"][0].is_null(), "nothing predicts the first token");
    assert_eq!(lp["top_logprobs"][1].as_object().unwrap().len(), 5);
    let echoed: Vec<f64> = echoed[n..].iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(echoed.len(), generated_lp.len());
    assert!((echoed[0] - generated_lp[0]).abs() < 0.05, "first token: {} vs {}", echoed[0], generated_lp[0]);
    let mean = echoed.iter().zip(&generated_lp).map(|(a, b)| (a - b).abs()).sum::<f64>() / echoed.len() as f64;
    assert!(mean < 0.15, "teacher-forced and free-running logprobs differ by {mean:.3} on average");
    // Greedy: what was generated is what the echoed distributions rank first.
    for (i, top) in lp["top_logprobs"].as_array().unwrap()[n..].iter().enumerate() {
        let best = top
            .as_object()
            .unwrap()
            .iter()
            .max_by(|a, b| a.1.as_f64().unwrap().total_cmp(&b.1.as_f64().unwrap()))
            .unwrap();
        let margin = {
            let mut v: Vec<f64> = top.as_object().unwrap().values().map(|x| x.as_f64().unwrap()).collect();
            v.sort_by(|a, b| b.total_cmp(a));
            v[0] - v[1]
        };
        if margin > 3.0 {
            assert_eq!(best.0, &format!("token_id:{}", generated[i]), "step {i}");
        }
    }
    // The text is the prompt's, then nothing.
    let (_, text) = s.post("/detokenize", &json!({"tokens": all}));
    assert_eq!(c["text"], text["prompt"]);
}

/// Echo in every cache mode: prefix reuse is exact (the echoed logprobs equal `off`'s bit for
/// bit), compose reports what it reused and scores every token from the blended cache.
#[test]
fn echo_works_in_every_cache_mode_and_reports_reuse() {
    let s = test_server();
    let passage = "Cargo builds Rust code, fetches crates from the registry and runs the tests of a package. \
                   Traits define shared behaviour in Rust; generic functions are bounded by them at compile time.";
    let score = |prompt: String, mode: &str| {
        let body = json!({"prompt": prompt, "echo": true, "max_tokens": 0, "logprobs": 2, "kvgate": {"cache": mode}});
        let (st, r) = s.post("/v1/completions", &body);
        assert_eq!(st, 200, "{r}");
        r
    };
    let prompt = format!("{passage}\n\nQuestion: what does Cargo do?");
    let off = score(prompt.clone(), "off");
    for mode in ["prefix", "compose"] {
        score(format!("{passage}\n\nQuestion: what are traits?"), mode); // stores the passage
        let r = score(prompt.clone(), mode);
        let k = &r["kvgate"];
        assert_eq!(k["mode"], mode);
        assert!(k["reused_tokens"].as_u64().unwrap() >= 30, "{mode}: {k}");
        let lps = r["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap();
        assert_eq!(lps.len(), off["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap().len());
        assert!(lps[1..].iter().all(|x| x.as_f64().is_some_and(|l| l <= 0.0)), "{mode}: every token scored");
        if mode == "prefix" {
            assert_eq!(r["choices"][0]["logprobs"], off["choices"][0]["logprobs"], "exact reuse scores exactly");
        }
    }
}

/// Scoring the same passages again (a harness scoring each choice after one context) takes
/// the rows read from stored chunks from what they scored before, and returns what scoring
/// them through the LM head returns: bit for bit, and truncated when fewer top tokens are asked.
#[test]
fn echo_remembers_what_reused_chunk_rows_scored() {
    let s = test_server();
    let passage = "The borrow checker compares scopes to determine whether all borrows are valid. \
                   A reference must never outlive the value it points to, and a value may have either one \
                   mutable reference or any number of immutable ones at a time.";
    let score = |question: &str, top: u64| {
        let body = json!({"prompt": format!("{passage}\n\nQuestion: {question}"), "echo": true, "max_tokens": 0,
                          "logprobs": top, "kvgate": {"cache": "compose"}});
        let (st, r) = s.post("/v1/completions", &body);
        assert_eq!(st, 200, "{r}");
        r["choices"][0]["logprobs"].clone()
    };
    let memo = "kvgate:prompt_rows_scored_total{from=\"memo\"}";
    let model = "kvgate:prompt_rows_scored_total{from=\"model\"}";
    score("what may outlive a value?", 2); // stores the passage
    score("what does the borrow checker compare?", 2); // reads it, and scores its rows
    let (memo_before, model_before) = (s.metric(memo), s.metric(model));
    let remembered = score("what does the borrow checker compare?", 2);
    let from_memo = s.metric(memo) - memo_before;
    assert!(from_memo >= 20.0, "{from_memo} rows from the memo");
    assert!(s.metric(model) - model_before < 30.0, "only the rows not read from chunks are computed");
    // Three top tokens: more than remembered, so every row goes through the LM head again.
    let computed = score("what does the borrow checker compare?", 3);
    assert_eq!(computed["token_logprobs"], remembered["token_logprobs"], "the memo returns what the LM head does");
    let first_two = |lp: &Value| -> Vec<Vec<(String, f64)>> {
        lp["top_logprobs"].as_array().unwrap()[1..]
            .iter()
            .map(|m| {
                let mut v: Vec<(String, f64)> =
                    m.as_object().unwrap().iter().map(|(t, l)| (t.clone(), l.as_f64().unwrap())).collect();
                v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                v.truncate(2);
                v
            })
            .collect()
    };
    assert_eq!(first_two(&computed), first_two(&remembered));
    // And those rows, remembered with three, come back with two.
    let before = s.metric(memo);
    assert_eq!(score("what does the borrow checker compare?", 2), remembered);
    assert!(s.metric(memo) - before >= from_memo, "the rows remembered with three top tokens serve two");
}

#[test]
fn echo_refuses_what_it_cannot_do_with_a_400_naming_the_field() {
    let s = test_server();
    for (body, param) in [
        (json!({"prompt": "hi", "echo": true, "max_tokens": 0, "n": 2}), "n"),
        (json!({"prompt": "hi", "echo": true, "max_tokens": 0, "logprobs": 21}), "logprobs"),
        (json!({"prompt": "hi", "echo": true, "max_tokens": 0, "logprobs": -1}), "logprobs"),
        (json!({"prompt": "hi", "max_tokens": 0}), "max_tokens"),
        (json!({"prompt": "hi", "echo": true, "max_tokens": -1}), "max_tokens"),
    ] {
        let (st, e) = s.post("/v1/completions", &body);
        assert_error(st, &e, 400, "invalid_value");
        assert_eq!(e["error"]["param"], param, "{body}: {e}");
    }
}
