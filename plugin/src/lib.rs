//! consentry: consent and purpose enforcement for JSON traffic between services.
//!
//! [`engine`] is the pure policy engine (no proxy-wasm); `filter` is the thin
//! proxy-wasm glue, compiled only for `wasm32`.

pub mod engine;

#[cfg(target_arch = "wasm32")]
mod abi;
#[cfg(target_arch = "wasm32")]
mod filter;
