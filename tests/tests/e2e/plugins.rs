//! Policy plugins with real components (built by `make plugins` from `plugins/`): loading,
//! hot swaps under load, the sandbox, time and memory limits, fallbacks and rollback.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::util::{Server, kvgate_bin, temp_dir};

/// Where `make plugins` installed the default components.
fn installed() -> PathBuf {
    let dir = match std::env::var_os("KVGATE_PLUGINS_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/kvgate/plugins"),
    };
    assert!(dir.join("selector.wasm").exists(), "{} has no components: run `make plugins`", dir.display());
    dir
}

/// A component built from `plugins/testing/` (`test-…`).
fn test_component(name: &str) -> PathBuf {
    let p = installed().parent().unwrap().join("test-plugins").join(format!("{name}.wasm"));
    assert!(p.exists(), "{} is missing: run `make plugins`", p.display());
    p
}

/// Installs `src` as `dir/file` the way an operator should: write aside, then rename.
fn install(src: &Path, dir: &Path, file: &str) {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::copy(src, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join(file)).unwrap();
}

/// A plugins directory holding the default components named in `kinds`.
fn plugins_dir(kinds: &[&str]) -> tempfile::TempDir {
    let tmp = temp_dir("plugins");
    let dir = tmp.path();
    for k in kinds {
        install(&installed().join(format!("{k}.wasm")), dir, &format!("{k}.wasm"));
    }
    tmp
}

fn serve(dir: &Path, extra: &[&str]) -> Server {
    let mut args = vec!["--plugins-dir", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// `GET /admin/plugins`, the entry of `kind`.
fn status(s: &Server, kind: &str) -> Value {
    let body: Value = ureq::get(&s.url("/admin/plugins")).call().unwrap().into_json().unwrap();
    body["data"].as_array().unwrap().iter().find(|p| p["kind"] == kind).cloned().unwrap()
}

/// Polls until `ok` holds for `kind`'s status (the watcher reloads a moment after a change).
fn wait_for(s: &Server, kind: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = status(s, kind);
        if ok(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "gave up waiting; {kind} is {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

const PASSAGES: [&str; 3] = [
    "Cargo builds Rust code, fetches crates from the registry and runs the tests of a package.",
    "Traits define shared behaviour in Rust; generic functions are bounded by them at compile time.",
    "The borrow checker forbids dangling references and data races before a program ever runs.",
];

fn rag(order: [usize; 3]) -> Value {
    let mut m = vec![json!({"role": "system", "content": "Answer from the passages."})];
    m.extend(order.iter().map(|&i| json!({"role": "user", "content": PASSAGES[i]})));
    m.push(json!({"role": "user", "content": "What does Cargo do?"}));
    json!({"messages": m, "temperature": 0, "max_tokens": 4, "logprobs": true, "top_logprobs": 2})
}

fn ask(s: &Server, body: &Value, headers: &[(&str, &str)]) -> Value {
    let mut r = ureq::post(&s.url("/v1/chat/completions"));
    for (k, v) in headers {
        r = r.set(k, v);
    }
    match r.send_string(&body.to_string()) {
        Ok(r) => r.into_json().unwrap(),
        Err(e) => panic!("the request failed: {e}"),
    }
}

/// Runs of the prompt spliced from stored chunks.
fn spans(r: &Value) -> u64 {
    r["kvgate"]["spans"].as_u64().unwrap()
}

/// The first generated token's logprob: a fingerprint of the KV the prompt was prefilled with.
fn first_logprob(r: &Value) -> f64 {
    r["choices"][0]["logprobs"]["content"][0]["logprob"].as_f64().unwrap()
}

#[test]
fn the_default_plugins_serve_and_report() {
    let tmp = plugins_dir(&["chunker", "selector", "evictor"]);
    let dir = tmp.path();
    let s = serve(dir, &[]);
    ask(&s, &rag([0, 1, 2]), &[]);
    let r = ask(&s, &rag([2, 0, 1]), &[]);
    assert!(spans(&r) >= 3, "every passage is found again: {}", r["kvgate"]);
    for (kind, name) in [("chunker", "cdc-chunker"), ("selector", "attention-selector"), ("evictor", "cost-evictor")] {
        let st = status(&s, kind);
        assert_eq!((st["serving"].as_str(), st["name"].as_str()), (Some("plugin"), Some(name)), "{st}");
        assert_eq!(st["sha256"].as_str().unwrap().len(), 64);
        assert_eq!(st["wit"], "0.2.0", "{st}");
    }
    let chunker_calls = status(&s, "chunker")["calls"].as_u64().unwrap();
    assert!(chunker_calls >= 1, "the first prompt's new content was cut by the plugin");
    assert_eq!(status(&s, "selector")["calls"], 1, "only the second request reused chunks");
    assert!(status(&s, "selector")["p99_call_us"].as_u64().is_some());
    assert_eq!(s.metric("kvgate:plugin_calls_total{kind=\"chunker\"}"), chunker_calls as f64);
}

/// The selector is swapped (atomic rename into the watched directory) while a client keeps
/// sending requests: none fails, and the same request is answered differently afterwards.
#[test]
fn swapping_the_selector_under_load_changes_behaviour_and_fails_nothing() {
    let tmp = plugins_dir(&["chunker", "selector"]);
    let dir = tmp.path();
    let s = serve(dir, &[]);
    let budget = [("x-kvgate-recompute-budget", "0.3")];
    ask(&s, &rag([0, 1, 2]), &budget); // stores the chunks
    let before = ask(&s, &rag([2, 0, 1]), &budget);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let served = std::thread::scope(|scope| {
        let client = scope.spawn(|| {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = ask(&s, &rag([[2, 0, 1], [1, 2, 0]][n % 2]), &budget);
                assert!(r["choices"][0]["message"]["content"].is_string(), "{r}");
                n += 1;
            }
            n
        });
        std::thread::sleep(Duration::from_millis(500));
        install(&test_component("test-every-token-selector"), dir, "selector.wasm");
        wait_for(&s, "selector", |st| st["name"] == "test-every-token-selector");
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        client.join().unwrap()
    });
    assert!(served >= 2, "requests kept flowing during the swap ({served})");
    let after = ask(&s, &rag([2, 0, 1]), &budget);
    assert_eq!(before["kvgate"]["recomputed_tokens"], after["kvgate"]["recomputed_tokens"]);
    assert_ne!(first_logprob(&before), first_logprob(&after), "another selection, another prefill");
    let st = status(&s, "selector");
    assert!(st["calls"].as_u64().unwrap() >= 1 && st["previous_version"].is_string(), "{st}");
    assert_eq!(st["wit"], "0.1.0", "a component built against kvgate:policy@0.1.0 still loads and serves");
    assert_eq!(s.metric("kvgate:request_errors_total{status=\"5xx\"}"), 0.0);
}

/// With a recompute taper the selector is asked for more than the budget (the check layer's
/// count): the servers that send a selector budget 7 run without one.
const NO_TAPER: &[&str] = &["--recompute-taper", "1"];

/// Budget 7 is what the misbehaving test selectors react to: pick the fraction of the reused
/// tokens that rounds to exactly 7.
fn budget_seven(s: &Server) -> String {
    ask(s, &rag([0, 1, 2]), &[]);
    let r = ask(s, &rag([2, 0, 1]), &[("x-kvgate-recompute-budget", "0")]);
    let reused = r["kvgate"]["reused_tokens"].as_f64().unwrap();
    format!("{}", 7.0 / reused)
}

#[test]
fn a_looping_a_hogging_and_a_trapping_selector_each_fall_back_to_full_recompute() {
    // The hog gets a long time limit and a small memory limit, so that the memory limit, not
    // the clock, is what stops it however busy the machine is.
    let roomy = ["--plugin-timeout-ms", "5000", "--plugin-memory-bytes", "16MiB"];
    for (component, counter, limits) in [
        ("test-spin-selector", "timeouts", &[][..]),
        ("test-hog-selector", "memory_exceeded", &roomy[..]),
        ("test-trap-selector", "traps", &[][..]),
    ] {
        let tmp = temp_dir("plugins");
        let dir = tmp.path();
        install(&test_component(component), dir, "selector.wasm");
        let s = serve(dir, &[limits, NO_TAPER].concat());
        assert_eq!(status(&s, "selector")["name"], component, "it loads: only budget 7 misbehaves");
        let seven = budget_seven(&s);
        let started = Instant::now();
        let r = ask(&s, &rag([1, 2, 0]), &[("x-kvgate-recompute-budget", &seven)]);
        let took = started.elapsed();
        let off = ask(&s, &rag([1, 2, 0]), &[("x-kvgate-cache", "off")]);
        // The fallback recomputes every reused token: exactly what `off` computes.
        assert_eq!(r["kvgate"]["recomputed_tokens"], r["kvgate"]["reused_tokens"], "{component}: {}", r["kvgate"]);
        assert_eq!(r["choices"][0]["logprobs"], off["choices"][0]["logprobs"], "{component}");
        let st = status(&s, "selector");
        assert_eq!(st[counter], 1, "{component}: {st}");
        assert_eq!(st["fallbacks"], 1, "{component}: {st}");
        assert!(took < Duration::from_secs(30), "{component} held the request for {took:?}");
    }
}

#[test]
fn repeated_failures_roll_back_to_the_previous_version() {
    let tmp = plugins_dir(&["selector"]);
    let dir = tmp.path();
    let s = serve(dir, &[&["--no-watch-plugins"], NO_TAPER].concat());
    let seven = budget_seven(&s);
    install(&test_component("test-trap-selector"), dir, "selector.wasm");
    let reload: Value = ureq::post(&s.url("/admin/plugins/reload")).call().unwrap().into_json().unwrap();
    assert_eq!(reload["ok"], true, "{reload}");
    assert_eq!(status(&s, "selector")["name"], "test-trap-selector");
    for _ in 0..3 {
        ask(&s, &rag([1, 2, 0]), &[("x-kvgate-recompute-budget", &seven)]);
    }
    let st = status(&s, "selector");
    assert_eq!((st["name"].as_str(), st["rollbacks"].as_u64()), (Some("attention-selector"), Some(1)), "{st}");
    assert!(st["last_rejected"].as_str().unwrap().contains("rolled back"), "{st}");
    let r = ask(&s, &rag([1, 2, 0]), &[("x-kvgate-recompute-budget", &seven)]);
    assert_eq!(r["kvgate"]["recomputed_tokens"], 7, "the restored selector answers again");
    // The same bad file is not reloaded on the next reload.
    let again: Value = ureq::post(&s.url("/admin/plugins/reload")).call().unwrap().into_json().unwrap();
    assert_eq!(again["data"][1]["outcome"], "rejected", "{again}");
    assert_eq!(status(&s, "selector")["name"], "attention-selector");
}

#[test]
fn out_of_range_cut_points_are_rejected_at_load_and_fall_back_at_run_time() {
    // Always wrong: refused at load, the built-in cutter serves.
    let tmp = temp_dir("plugins");
    let dir = tmp.path();
    install(&test_component("test-bad-chunker"), dir, "chunker.wasm");
    let s = serve(dir, &[]);
    let st = status(&s, "chunker");
    assert_eq!(st["serving"], "builtin", "{st}");
    assert!(st["last_rejected"].as_str().unwrap().contains("outside"), "{st}");
    assert_eq!(ask(&s, &rag([0, 1, 2]), &[])["kvgate"]["chunks_hit"], 0);
    drop(s);

    // Right at load, wrong on real prompts: every call falls back to fixed cuts.
    let tmp = temp_dir("plugins");
    let dir = tmp.path();
    install(&test_component("test-sly-chunker"), dir, "chunker.wasm");
    let s = serve(dir, &[]);
    assert_eq!(status(&s, "chunker")["name"], "test-sly-chunker");
    ask(&s, &rag([0, 1, 2]), &[]);
    let r = ask(&s, &rag([2, 0, 1]), &[]);
    assert!(spans(&r) >= 3, "fixed cuts still find every passage: {}", r["kvgate"]);
    let st = status(&s, "chunker");
    assert!(st["invalid_answers"].as_u64().unwrap() >= 1, "its answer was refused and fixed cuts served: {st}");
}

#[test]
fn a_plugin_cannot_open_files() {
    let escape = Path::new("/tmp/kvgate-plugin-escape");
    let _ = std::fs::remove_file(escape);
    let tmp = temp_dir("plugins");
    let dir = tmp.path();
    install(&test_component("test-file-chunker"), dir, "chunker.wasm");
    let s = serve(dir, &[]);
    assert_eq!(status(&s, "chunker")["name"], "test-file-chunker");
    let r = ask(&s, &rag([0, 1, 2]), &[]);
    assert!(r["choices"][0]["message"]["content"].is_string());
    let st = status(&s, "chunker");
    assert_eq!(
        (st["calls"].as_u64(), st["traps"].as_u64(), st["invalid_answers"].as_u64()),
        (Some(1), Some(0), Some(0))
    );
    assert!(!escape.exists(), "the plugin created a file on the host");
    // Its signal for "I could read /etc/passwd" is an invalid cut: it loaded, and no answer
    // was refused (asserted above).
}

#[test]
fn a_corrupt_wasm_dropped_in_leaves_the_old_plugin_serving() {
    let tmp = plugins_dir(&["selector"]);
    let dir = tmp.path();
    let s = serve(dir, &[]);
    let tmp = dir.join(".selector.wasm.tmp");
    std::fs::write(&tmp, b"\0asm\x0d\0\x01\0 this is not a component").unwrap();
    std::fs::rename(&tmp, dir.join("selector.wasm")).unwrap();
    let st = wait_for(&s, "selector", |st| st["last_rejected"].is_string());
    assert_eq!(st["name"], "attention-selector", "{st}");
    assert!(st["last_rejected"].as_str().unwrap().contains("not a valid WebAssembly component"), "{st}");
    ask(&s, &rag([0, 1, 2]), &[]);
    let r = ask(&s, &rag([2, 0, 1]), &[]);
    assert!(spans(&r) >= 3, "{}", r["kvgate"]);
    assert_eq!(status(&s, "selector")["calls"], 1);
}

#[test]
fn plugin_check_and_reload_on_the_command_line() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(kvgate_bin()).args(args).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    };
    let selector = installed().join("selector.wasm");
    let (ok, text) = run(&["plugin", "check", selector.to_str().unwrap()]);
    assert!(ok && text.contains("kvgate:policy/selector@0.2.0") && text.contains("attention-selector"), "{text}");
    let bad = test_component("test-bad-chunker");
    let (ok, text) = run(&["plugin", "check", bad.to_str().unwrap()]);
    assert!(!ok && text.contains("outside"), "{text}");
    let junk_dir = temp_dir("junk");
    let junk = junk_dir.path().join("junk.wasm");
    std::fs::write(&junk, b"hello").unwrap();
    let (ok, text) = run(&["plugin", "check", junk.to_str().unwrap()]);
    assert!(!ok && text.contains("not a valid WebAssembly component"), "{text}");
    let (ok, text) = run(&["plugin", "check", "/nonexistent.wasm"]);
    assert!(!ok && text.contains("cannot read"), "{text}");
    // The examples operators copy pass the same checks (self-test, a canned request).
    let examples = installed().parent().unwrap().join("example-plugins");
    for name in ["epic-selector", "adaptive-selector", "deviation-selector", "paragraph-chunker", "lfu-evictor"] {
        let (ok, text) = run(&["plugin", "check", examples.join(format!("{name}.wasm")).to_str().unwrap()]);
        assert!(ok && text.contains(name), "{name}: {text}");
    }

    let tmp = plugins_dir(&["selector"]);

    let dir = tmp.path();
    let s = serve(dir, &["--no-watch-plugins", "--admin-token", "t0k"]);
    install(&test_component("test-every-token-selector"), dir, "selector.wasm");
    let (ok, text) = run(&["plugin", "reload", "--url", &s.base, "--admin-token", "t0k"]);
    assert!(ok && text.contains("selector") && text.contains("loaded"), "{text}");
    assert_eq!(status_with_token(&s, "t0k")["name"], "test-every-token-selector");
    let (ok, text) = run(&["plugin", "reload", "--url", &s.base]);
    assert!(!ok && text.contains("401"), "{text}");
}

fn status_with_token(s: &Server, token: &str) -> Value {
    let body: Value = ureq::get(&s.url("/admin/plugins"))
        .set("authorization", &format!("Bearer {token}"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    body["data"][1].clone()
}
