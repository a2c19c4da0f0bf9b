//! The do-nothing filter of `envoy/bench/run` (configuration `noop-wasm`): the floor for
//! any body-rewriting proxy-wasm filter in Envoy's V8.
//!
//! It does what every filter that rewrites request bodies must do and nothing else: it
//! holds each request body until the end of the stream (`Action::Pause` from
//! `on_http_request_body`), reads it whole with `get_http_request_body(0, size)` and
//! writes the same bytes back with `set_http_request_body(0, size, &body)`. Headers,
//! trailers and responses pass untouched (the SDK's defaults). No parse, no policy, no
//! log line, no counter.
//!
//! Built by the same toolchain and profile as the filter:
//! `cargo build --release --target wasm32-wasip1 -p consentry-bench-noop`
//! (`target/wasm32-wasip1/release/consentry_bench_noop.wasm`).

#[cfg(target_arch = "wasm32")]
mod filter {
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, ContextType, LogLevel};

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Warn);
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
    }}

    struct Root;

    impl Context for Root {}

    impl RootContext for Root {
        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }

        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Noop))
        }
    }

    struct Noop;

    impl Context for Noop {}

    impl HttpContext for Noop {
        fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
            if !end_of_stream {
                // Envoy keeps buffering; `size` is the whole body so far.
                return Action::Pause;
            }
            if let Some(body) = self.get_http_request_body(0, size) {
                self.set_http_request_body(0, size, &body);
            }
            Action::Continue
        }
    }
}
