//! The consentry harness: runs the filter's real `.wasm` under wasmtime in a host that
//! behaves as Envoy's proxy-wasm host does, and replays recorded traffic through it.
//!
//! - [`host`]: the proxy-wasm ABI 0.2.1 host and Envoy's stream lifecycle.
//! - [`traffic`]: recorded traffic (native format, Envoy tap traces, HAR).
//! - [`replay`]: runs recordings and checks them against expectations.
//! - [`check`]: validates a policy with file, line and column for every problem.
//! - [`record`]: reads decision records v2 (and refuses other versions).
//! - [`report`]: summarises decision logs for security reviewers.

pub mod check;
pub mod envoy_path;
pub mod host;
pub mod record;
pub mod replay;
pub mod report;
pub mod traffic;
pub mod yamlpos;
