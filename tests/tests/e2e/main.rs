//! End-to-end tests: the real model, the real server, real HTTP.
//!
//! One test binary (shared helpers in `util`). Tests that run the model in-process share it
//! through `util::model()`; tests over HTTP each start
//! their own server (`util::test_server()`).

mod api;
mod blend;
mod engine;
mod fleet;
mod gateway;
mod openai_python;
mod plugins;
mod scheduler;
mod store;
mod util;
