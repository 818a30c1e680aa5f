//! The chunk store through the server: restarts, crashes, the admin endpoints, metrics.

use serde_json::{Value, json};

use crate::util::{Server, temp_dir};

pub(crate) const PASSAGES: [&str; 3] = [
    "Cargo builds Rust code, fetches crates from the registry and runs the tests.",
    "Traits define shared behaviour in Rust; generic functions are bounded by them.",
    "The borrow checker forbids dangling references and data races at compile time.",
];

fn rag(order: [usize; 3], question: &str) -> Value {
    let mut m = vec![json!({"role": "system", "content": "Answer from the passages."})];
    m.extend(order.iter().map(|&i| json!({"role": "user", "content": PASSAGES[i]})));
    m.push(json!({"role": "user", "content": question}));
    json!({"messages": m, "temperature": 0, "max_tokens": 6})
}

/// GET with an optional bearer token; status and JSON body.
pub(crate) fn get(s: &Server, path: &str, token: Option<&str>) -> (u16, Value) {
    send(ureq::get(&s.url(path)), token)
}

fn delete(s: &Server, path: &str) -> (u16, Value) {
    send(ureq::delete(&s.url(path)), None)
}

fn send(mut r: ureq::Request, token: Option<&str>) -> (u16, Value) {
    if let Some(t) = token {
        r = r.set("authorization", &format!("Bearer {t}"));
    }
    let r = match r.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{e}"),
    };
    (r.status(), serde_json::from_str(&r.into_string().unwrap()).unwrap())
}

#[test]
fn chunks_survive_a_restart_and_the_admin_endpoints_list_and_delete_them() {
    let tmp = temp_dir("restart");
    let dir = tmp.path();
    let stored = {
        let mut s = Server::start_in(dir, &[]);
        let (st, r) = s.post("/v1/chat/completions", &rag([0, 1, 2], "What does Cargo do?"));
        assert_eq!((st, r["kvgate"]["chunks_hit"].as_u64()), (200, Some(0)), "{r}");
        assert!(s.stop(), "clean shutdown");
        r["kvgate"]["chunks_stored"].as_u64().unwrap()
    };
    let s = Server::start_in(dir, &[]);
    let (_, again) = s.post("/v1/chat/completions", &rag([2, 0, 1], "What are traits?"));
    let k = &again["kvgate"];
    assert!(k["spans"].as_u64().unwrap() >= 3, "every passage came back from disk: {k}");
    assert_eq!(k["chunks_hit"].as_u64(), Some(stored), "{k}");
    assert!(s.metric("kvgate:chunk_store_hits_total{tier=\"disk\"}") >= stored as f64);
    assert_eq!(s.metric("kvgate:chunk_store_corruptions_total"), 0.0);
    assert!(s.metric("kvgate:chunk_store_disk_load_seconds_count") >= stored as f64);
    assert_eq!(s.metric("kvgate:chunk_store_disk_enabled"), 1.0);

    // The list, paged.
    let (st, all) = get(&s, "/admin/chunks", None);
    assert_eq!(st, 200);
    let chunks = all["data"].as_array().unwrap();
    let total = stored + k["chunks_stored"].as_u64().unwrap();
    assert_eq!(chunks.len() as u64, total, "{all}");
    for c in chunks {
        assert!(c["tiers"].as_array().unwrap().contains(&json!("disk")) || c["hits"] == 0, "{c}");
        assert!(c["tokens"].as_u64().unwrap() > 0 && c["cost_us"].as_u64().unwrap() > 0, "{c}");
        assert!(c["partial_hits"].as_u64().unwrap() <= c["hits"].as_u64().unwrap(), "{c}");
    }
    let reused = chunks.iter().filter(|c| c["hits"].as_u64().unwrap() >= 1).count() as u64;
    assert_eq!(reused, stored, "each chunk of the first request was used by the second");
    let limit = total as usize - 1;
    let (_, page1) = get(&s, &format!("/admin/chunks?limit={limit}"), None);
    assert_eq!((page1["data"].as_array().unwrap().len(), &page1["has_more"]), (limit, &json!(true)));
    let after = page1["next_after"].as_str().unwrap();
    let (_, page2) = get(&s, &format!("/admin/chunks?limit={limit}&after={after}"), None);
    assert_eq!((page2["data"].as_array().unwrap().len(), &page2["has_more"]), (1, &json!(false)));
    assert_eq!(page2["data"][0]["key"], chunks[limit]["key"]);

    // One chunk, then all.
    let key = chunks[0]["key"].as_str().unwrap();
    assert_eq!(get(&s, &format!("/admin/chunks/{key}"), None).1["key"], key);
    assert_eq!(delete(&s, &format!("/admin/chunks/{key}")).0, 200);
    let (st, e) = delete(&s, &format!("/admin/chunks/{key}"));
    assert_eq!((st, e["error"]["code"].as_str()), (404, Some("chunk_not_found")));
    let (st, e) = get(&s, "/admin/chunks/xyz", None);
    assert_eq!((st, e["error"]["code"].as_str()), (400, Some("invalid_value")));
    let (st, e) = get(&s, "/admin/chunks?limit=0", None);
    assert_eq!((st, e["error"]["code"].as_str()), (400, Some("invalid_value")));
    let (st, flushed) = delete(&s, "/admin/chunks");
    assert_eq!((st, flushed["flushed_chunks"].as_u64()), (200, Some(total - 1)));
    assert_eq!(get(&s, "/admin/chunks", None).1["data"], json!([]));
    assert_eq!(s.metric("kvgate:chunk_store_entries{tier=\"disk\"}"), 0.0);
}

#[test]
fn a_server_killed_mid_write_restarts_and_serves() {
    let tmp = temp_dir("sigkill");
    let dir = tmp.path();
    let mut s = Server::start_in(dir, &[]);
    for (i, order) in [[0, 1, 2], [1, 2, 0], [2, 0, 1]].into_iter().enumerate() {
        let mut body = rag(order, &format!("Question number {i}: what is Rust?"));
        body["messages"][1]["content"] = json!(format!("Passage set {i}. {}", PASSAGES[order[0]]));
        assert_eq!(s.post("/v1/chat/completions", &body).0, 200);
        if i == 0 {
            // The first request's chunks are on disk (and so durable) before the others.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while s.metric("kvgate:chunk_store_entries{tier=\"disk\"}") < 1.0 {
                assert!(std::time::Instant::now() < deadline, "nothing reached the disk");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
    s.child.kill().unwrap(); // SIGKILL: no shutdown, the disk writer may be mid-payload
    s.child.wait().unwrap();
    let s = Server::start_in(dir, &[]);
    let (st, r) = s.post("/v1/chat/completions", &rag([0, 1, 2], "What does Cargo do?"));
    assert_eq!(st, 200, "{r}");
    assert!(r["kvgate"]["chunks_hit"].as_u64().unwrap() >= 1, "chunks written before the kill are served: {r}");
    assert_eq!(s.metric("kvgate:chunk_store_corruptions_total"), 0.0);
    let (_, listed) = get(&s, "/admin/chunks?limit=1000", None);
    assert!(listed["data"].as_array().unwrap().len() >= 3, "{listed}");
}

#[test]
fn the_admin_token_guards_admin_endpoints_only() {
    let s = Server::start(&["--admin-token", "s3cret"]);
    let (st, e) = get(&s, "/admin/chunks", None);
    assert_eq!((st, e["error"]["code"].as_str()), (401, Some("invalid_admin_token")));
    let (st, _) = get(&s, "/admin/chunks", Some("wrong"));
    assert_eq!(st, 401);
    let (st, e) = get(&s, "/admin/nothing-here", None);
    assert_eq!(st, 401, "unauthenticated callers learn nothing about admin routes: {e}");
    assert_eq!(get(&s, "/admin/chunks", Some("s3cret")).0, 200);
    assert_eq!(get(&s, "/v1/models", None).0, 200, "the API itself needs no admin token");
}

#[test]
fn without_a_disk_tier_the_server_serves_from_ram() {
    let s = Server::start(&["--disk-budget-bytes", "0"]);
    assert_eq!(s.post("/v1/chat/completions", &rag([0, 1, 2], "What does Cargo do?")).0, 200);
    let (_, r) = s.post("/v1/chat/completions", &rag([1, 0, 2], "What does Cargo do?"));
    assert!(r["kvgate"]["spans"].as_u64().unwrap() >= 3, "{}", r["kvgate"]);
    assert_eq!(s.metric("kvgate:chunk_store_disk_enabled"), 0.0);
    assert!(!s.data_dir.join("index").exists());
}

/// Unmounts a tmpfs when dropped.
struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A real full disk: the data directory is a small tmpfs that fills up, then grows.
/// Mounting needs root, which the developers' machines and CI have; elsewhere this test says
/// so and stops (the store's unit test covers ENOSPC behind its I/O seam everywhere).
#[test]
fn a_full_disk_is_survived_and_storing_resumes_when_space_returns() {
    let tmp = temp_dir("tmpfs");
    let dir = tmp.path();
    let mount = |opts: &str| {
        let mut c = std::process::Command::new("mount");
        c.args(["-t", "tmpfs", "-o", opts, "tmpfs"]).arg(dir).stderr(std::process::Stdio::null());
        c.status().is_ok_and(|s| s.success())
    };
    if !mount("size=6m") {
        eprintln!("skipped: cannot mount a tmpfs here (not root)");
        return;
    }
    let _unmount = Tmpfs(dir.to_path_buf());
    let s = Server::start_in(dir, &["--disk-budget-bytes", "1GiB"]);
    let passage = |i: usize| {
        let words: Vec<String> = (0..90).map(|w| format!("w{}x{}", i, w % 17)).collect();
        format!("Passage {i}: {}", words.join(" "))
    };
    let ask = |i: usize| {
        let body = json!({"messages": [
            {"role": "system", "content": "Answer from the passage."},
            {"role": "user", "content": passage(i)},
            {"role": "user", "content": "What is it about?"}
        ], "temperature": 0, "max_tokens": 2});
        let (st, r) = s.post("/v1/chat/completions", &body);
        assert_eq!(st, 200, "{r}");
        r
    };
    // Each passage is a few MB of KV: the 6 MB disk is full after a couple.
    let mut i = 0;
    while s.metric("kvgate:chunk_store_disk_degraded") == 0.0 {
        ask(i);
        i += 1;
        assert!(i < 20, "the disk never filled up");
        std::thread::sleep(std::time::Duration::from_millis(300)); // let the writer get to it
    }
    assert!(s.metric("kvgate:chunk_store_write_errors_total") >= 1.0);
    // Still serving, and reusing from RAM what the disk could not take.
    let r = ask(i - 1);
    assert!(r["kvgate"]["chunks_hit"].as_u64().unwrap() >= 1, "{r}");
    let on_disk = s.metric("kvgate:chunk_store_entries{tier=\"disk\"}");

    // Space returns: storing resumes after the retry pause.
    assert!(
        mount("remount,size=256m") || {
            let mut c = std::process::Command::new("mount");
            c.args(["-o", "remount,size=256m"]).arg(dir).status().is_ok_and(|s| s.success())
        }
    );
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while s.metric("kvgate:chunk_store_disk_degraded") == 1.0 {
        ask(i);
        i += 1;
        assert!(std::time::Instant::now() < deadline, "storing never resumed");
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    assert!(s.metric("kvgate:chunk_store_entries{tier=\"disk\"}") > on_disk);
}

/// A RAG prompt as frameworks send it: the passages in `order`, joined in one message under
/// numbered `label`s, then the question.
pub(crate) fn joined(order: [usize; 3], label: &str, question: &str) -> Value {
    let body: Vec<String> =
        order.iter().enumerate().map(|(i, &p)| format!("{label} {}: {}", i + 1, PASSAGES[p])).collect();
    json!({"messages": [
        {"role": "system", "content": "Answer from the passages."},
        {"role": "user", "content": format!("{}\n\nQuestion: {question}", body.join("\n\n"))},
    ], "temperature": 0, "max_tokens": 2})
}

/// Passages joined under labels are found inside their stored chunks after a restart: the
/// span index is rebuilt from the disk tier.
#[test]
fn a_restart_keeps_span_hits() {
    let tmp = temp_dir("restart-spans");
    let dir = tmp.path();
    {
        let mut s = Server::start_in(dir, &[]);
        assert_eq!(s.post("/v1/chat/completions", &joined([0, 1, 2], "Passage", "What does Cargo do?")).0, 200);
        assert!(s.stop());
    }
    let s = Server::start_in(dir, &[]);
    let (st, r) = s.post("/v1/chat/completions", &joined([2, 0, 1], "Document", "What are traits?"));
    assert_eq!(st, 200, "{r}");
    let k = &r["kvgate"];
    assert!(k["partial_spans"].as_u64().unwrap() >= 2, "passages found inside the stored chunk: {k}");
    assert!(k["reused_tokens"].as_u64().unwrap() >= 45, "{k}");
    assert!(s.metric("kvgate:chunk_store_hits_total{tier=\"disk\"}") >= 1.0, "they came from disk");
    let (_, listed) = get(&s, "/admin/chunks", None);
    let partial: u64 = listed["data"].as_array().unwrap().iter().map(|c| c["partial_hits"].as_u64().unwrap()).sum();
    assert!(partial >= 1, "/admin/chunks shows the chunk matched in part: {listed}");
}

/// Passages long enough that each holds runs the span index finds on its own.
const CORPUS: [&str; 3] = [
    "The lighthouse keeper on the northern island recorded the weather every morning at six, noting the wind, \
     the height of the swell and the colour of the sky, and sent the log to the harbour office by the Friday boat.",
    "Copper wire conducts electricity with little loss, which is why the old telegraph lines ran on it; aluminium \
     replaced it on long overhead spans because it weighs a third as much for the same resistance per kilogram.",
    "Sourdough bread rises on wild yeast and lactic bacteria kept alive in a starter of flour and water, fed daily, \
     which gives the crumb its open holes and the crust its slight sour taste after a long, cool fermentation.",
];

/// A corpus ingested with `kvgate ingest` ahead of traffic is found inside the first client
/// prompt that joins its passages under labels, in another order; bad input is refused with
/// a readable error and stores nothing.
#[test]
fn an_ingested_corpus_is_reused_by_the_first_prompt_that_quotes_it() {
    let s = Server::start(&[]);
    let dir = temp_dir("ingest");
    for (i, p) in CORPUS.iter().enumerate() {
        std::fs::write(dir.path().join(format!("doc{i}.txt")), p).unwrap();
    }
    let out = std::process::Command::new(crate::util::kvgate_bin())
        .args(["ingest", "--url", &s.base, "--batch", "2"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("ingested 3 documents"), "{stdout}");

    let body: Vec<String> = [2, 0, 1].iter().enumerate().map(|(i, &p)| format!("[{}] {}", i + 1, CORPUS[p])).collect();
    let ask = json!({"messages": [
        {"role": "system", "content": "Answer from the sources."},
        {"role": "user", "content": format!("{}\n\nWhy did aluminium replace copper?", body.join("\n\n"))},
    ], "temperature": 0, "max_tokens": 2});
    let (st, r) = s.post("/v1/chat/completions", &ask);
    assert_eq!(st, 200, "{r}");
    let k = &r["kvgate"];
    assert!(k["spans"].as_u64().unwrap() >= 3, "every ingested passage found: {k}");
    assert!(k["reused_tokens"].as_u64().unwrap() >= 100, "{k}");

    let before = s.metric("kvgate:chunk_store_entries{tier=\"ram\"}");
    for (bad, says) in [
        (json!({"documents": []}), "1 to"),
        (json!({"documents": ["fine", "  "]}), "document 1 is empty"),
        (json!({"docs": ["x"]}), "documents"),
        (json!({"documents": ["x"], "namespace": "nope"}), "namespace"),
    ] {
        let (st, e) = s.post("/v1/kvgate/ingest", &bad);
        assert!(st == 400 || st == 403, "{bad}: {st} {e}");
        let msg = e["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(says), "{bad}: {e}");
    }
    assert_eq!(s.metric("kvgate:chunk_store_entries{tier=\"ram\"}"), before, "a refused ingest stores nothing");
    let out = std::process::Command::new(crate::util::kvgate_bin())
        .args(["ingest", "--url", "http://127.0.0.1:9"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
}
