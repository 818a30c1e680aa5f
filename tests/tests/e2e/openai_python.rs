//! The official `openai` Python client against a real server (`make venv` installs it).

use crate::util::test_server;

#[test]
fn official_openai_python_client_works_streaming_and_not() {
    let python = std::env::var("KVGATE_PYTHON")
        .expect("KVGATE_PYTHON must name a Python with the `openai` package: run `make test`");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/openai_client.py");
    let s = test_server();
    let out =
        std::process::Command::new(python).arg(script).arg(&s.base).arg("smollm2-test").output().expect("run python");
    assert!(
        out.status.success(),
        "openai client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
