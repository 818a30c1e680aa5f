//! Shared helpers: the model, the reference outputs, a server on a free port.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use kvgate::engine::LoadedModel;

/// The GGUF the tests run on: `$KVGATE_MODEL`, else the file `make model` fetches.
pub fn model_path() -> PathBuf {
    let p = match std::env::var_os("KVGATE_MODEL") {
        Some(p) => PathBuf::from(p),
        None => {
            let home = std::env::var_os("HOME").expect("HOME is set");
            PathBuf::from(home).join(".cache/kvgate/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    };
    assert!(p.exists(), "model {} is missing: run `make model` (or `make test`)", p.display());
    p
}

/// The model, loaded once per test binary.
pub fn model() -> Arc<LoadedModel> {
    static MODEL: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    MODEL.get_or_init(|| LoadedModel::load(&model_path(), Some("smollm2")).expect("model loads")).clone()
}

/// llama.cpp's outputs for the default model.
pub fn reference() -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/llamacpp-smollm2-135m.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("reference file")).expect("reference JSON")
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

/// A `kvgate serve` process on a free port, stopped (SIGTERM) when dropped.
pub struct Server {
    pub child: std::process::Child,
    pub base: String,
    /// The data directory it was given.
    pub data_dir: PathBuf,
    /// The data directory the server made itself, removed on drop (after the server stops).
    own_data_dir: Option<tempfile::TempDir>,
}

/// A fresh directory under the system temp dir, removed when dropped.
pub fn temp_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("kvgate-test-{name}-")).tempdir().expect("create a temp dir")
}

/// The `kvgate` binary: `$KVGATE_BIN`, else the one cargo built beside this test.
pub fn kvgate_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KVGATE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let bin = exe.parent().and_then(|deps| deps.parent()).expect("target dir").join("kvgate");
    assert!(bin.exists(), "{} is missing: build it with `cargo build --release` (or run `make test`)", bin.display());
    bin
}

impl Server {
    /// Starts the server with extra `args` (and a fresh data directory) and waits until
    /// `/ready` answers 200.
    pub fn start(args: &[&str]) -> Self {
        let dir = temp_dir("data");
        let mut s = Self::start_in(dir.path(), args);
        s.own_data_dir = Some(dir);
        s
    }

    /// Starts the server on the data directory `data_dir` (kept when the server stops).
    pub fn start_in(data_dir: &std::path::Path, args: &[&str]) -> Self {
        Self::start_with(data_dir, args, std::process::Stdio::inherit())
    }

    /// Starts the server with its log (stderr) written to `log`.
    pub fn start_logged(args: &[&str], log: &std::path::Path) -> Self {
        let file = std::fs::File::create(log).expect("create the log file");
        let dir = temp_dir("data");
        let mut s = Self::start_with(dir.path(), args, file.into());
        s.own_data_dir = Some(dir);
        s
    }

    fn start_with(data_dir: &std::path::Path, args: &[&str], stderr: std::process::Stdio) -> Self {
        use std::io::BufRead;
        // Quiet unless the test asks for another log level.
        let log = if args.contains(&"--log") { &[][..] } else { &["--log", "warn"][..] };
        let mut child = std::process::Command::new(kvgate_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--threads", "2"])
            .args(log)
            .arg("--model")
            .arg(model_path())
            .arg("--data-dir")
            .arg(data_dir)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start kvgate");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line).expect("read the listening line");
        let base = line.trim().strip_prefix("kvgate listening on ").expect("listening line").to_string();
        let server = Self { child, base, data_dir: data_dir.to_path_buf(), own_data_dir: None };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            // 200 when ready; 401 when /ready needs a key (then it is up; the API tells the rest).
            match ureq::get(&server.url("/ready")).call() {
                Ok(r) if r.status() == 200 => break,
                Err(ureq::Error::Status(401, _)) => break,
                _ if std::time::Instant::now() > deadline => panic!("server never became ready"),
                _ => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
        }
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs JSON; returns the status and the parsed body (for errors too).
    pub fn post(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        self.post_raw(path, &body.to_string())
    }

    pub fn post_raw(&self, path: &str, body: &str) -> (u16, serde_json::Value) {
        let r = match ureq::post(&self.url(path)).set("content-type", "application/json").send_string(body) {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("request failed: {e}"),
        };
        let status = r.status();
        let text = r.into_string().expect("body");
        (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")))
    }

    /// POSTs a streaming request and returns the raw SSE text.
    pub fn stream(&self, path: &str, body: &serde_json::Value) -> String {
        let r = ureq::post(&self.url(path)).send_string(&body.to_string()).expect("stream request");
        assert_eq!(r.header("content-type"), Some("text/event-stream"));
        r.into_string().expect("stream body")
    }

    /// The value of an unlabelled metric (or the first sample of a labelled one) on `/metrics`.
    pub fn metric(&self, name: &str) -> f64 {
        metric_at(&self.url("/metrics"), name)
    }

    /// Sends SIGTERM and waits for the process to exit; returns whether it exited cleanly.
    pub fn stop(&mut self) -> bool {
        let _ = std::process::Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
        // The data directory, if the server made it, goes with `own_data_dir` after this.
    }
}

/// The first sample of metric `name` (which may carry its labels) at the `/metrics` URL `url`.
pub fn metric_at(url: &str, name: &str) -> f64 {
    let text = ureq::get(url).call().expect("GET /metrics").into_string().expect("metrics");
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
}

/// A server with the default flags and the model named `smollm2-test`. Each test starts its
/// own: a process held in a static would outlive the test binary.
pub fn test_server() -> Server {
    Server::start(&["--model-name", "smollm2-test"])
}

/// The `data:` payloads of an SSE body, checking the framing on the way.
pub fn sse_events(body: &str) -> Vec<String> {
    assert!(body.ends_with("data: [DONE]\n\n"), "stream does not end with [DONE]: {body:?}");
    let events: Vec<String> = body
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").unwrap_or_else(|| panic!("event without `data: `: {e:?}")).to_string())
        .collect();
    assert_eq!(events.iter().filter(|e| *e == "[DONE]").count(), 1);
    events
}

/// A `redis-server` of the test's own, without persistence.
pub struct Redis {
    port: u16,
    child: Option<std::process::Child>,
}

impl Redis {
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut r = Self { port, child: None };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let bin = std::env::var("KVGATE_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = std::process::Command::new(&bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{bin}` ({e}): `make test` installs redis-server"));
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.conn().is_err() {
            assert!(std::time::Instant::now() < deadline, "redis-server did not come up on port {}", self.port);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A raw TCP connection to it.
    pub fn tcp(&self) -> std::net::TcpStream {
        std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect to redis")
    }

    pub fn conn(&self) -> redis::RedisResult<redis::Connection> {
        let mut c = redis::Client::open(self.url())?.get_connection_with_timeout(std::time::Duration::from_secs(1))?;
        c.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
        redis::cmd("PING").query::<String>(&mut c)?;
        Ok(c)
    }

    pub fn signal(&self, sig: libc::c_int) {
        let pid = self.child.as_ref().expect("running").id() as libc::pid_t;
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    /// Killed and started again on the same port, empty.
    pub fn restart_empty(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGCONT) };
        }
        self.stop();
    }
}

/// A `kvgate route` process in front of `nodes`, stopped (SIGTERM) when dropped.
pub struct Router {
    child: std::process::Child,
    pub base: String,
}

impl Router {
    /// Starts a router over `nodes` (with extra `args`) and waits until `/ready` answers 200.
    pub fn start(nodes: &[&Server], args: &[&str]) -> Self {
        use std::io::BufRead;
        let mut cmd = std::process::Command::new(kvgate_bin());
        cmd.args(["route", "--listen", "127.0.0.1:0", "--log", "warn", "--model"]).arg(model_path());
        for n in nodes {
            cmd.args(["--node", &n.base]);
        }
        let mut child = cmd.args(args).stdout(std::process::Stdio::piped()).spawn().expect("start kvgate route");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line).expect("read the listening line");
        let base = line.trim().strip_prefix("kvgate router listening on ").expect("listening line").to_string();
        let router = Self { child, base };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while ureq::get(&router.url("/ready")).call().is_err() {
            assert!(std::time::Instant::now() < deadline, "the router never became ready");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        router
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs JSON; returns the status, the node that answered (`x-kvgate-node`) and the body.
    pub fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
        headers: &[(&str, &str)],
    ) -> (u16, String, serde_json::Value) {
        let mut req = ureq::post(&self.url(path));
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let r = match req.send_string(&body.to_string()) {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("request failed: {e}"),
        };
        let (status, node) = (r.status(), r.header("x-kvgate-node").unwrap_or("").to_string());
        let text = r.into_string().expect("body");
        (status, node, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")))
    }

    /// A sample of a metric on `/metrics` (`name` may carry its labels).
    pub fn metric(&self, name: &str) -> f64 {
        metric_at(&self.url("/metrics"), name)
    }

    /// `GET /ready`'s body (also when it is a 503).
    pub fn ready(&self) -> serde_json::Value {
        let r = match ureq::get(&self.url("/ready")).call() {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("GET /ready failed: {e}"),
        };
        r.into_json().expect("JSON")
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}
