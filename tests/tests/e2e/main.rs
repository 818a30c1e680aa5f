//! End-to-end tests: the real model, the real server, real HTTP.
//!
//! One test binary (shared helpers in `util`). Tests that run the model share it
//! through `util::model()`.

mod engine;
mod util;
