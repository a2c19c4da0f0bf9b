//! consentry: consent and purpose enforcement for JSON traffic between services.
//!
//! [`engine`] is the pure policy engine (no proxy-wasm); `filter` is the thin
//! proxy-wasm glue, compiled only for `wasm32`.
//!
//! A panic in the filter traps the VM, and Envoy then fails every request on that
//! worker: outside tests the crate may not `unwrap`, `expect` or `panic!` (clippy, run
//! with `-D warnings` by scripts/test for the host and for wasm32). Bad input and failed
//! host calls are errors the engine reports as refusals.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod engine;

#[cfg(target_arch = "wasm32")]
mod abi;
#[cfg(target_arch = "wasm32")]
mod filter;
