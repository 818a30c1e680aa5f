//! kvgate (temporary while the API is written)
pub mod bench;
pub mod engine;
