//! The emulated host against Envoy's behaviour, with small hand-written modules (WAT)
//! that make exactly the calls under test.

use consentry_harness::host::{ExchangeInput, Fate, Plugin, Settings, StartError};
use std::path::PathBuf;

fn module(name: &str, wat: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("consentry-host-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.wasm"));
    std::fs::write(&path, wat::parse_str(wat).unwrap()).unwrap();
    path
}

/// The exports every proxy-wasm module has, with the given request callbacks.
fn skeleton(imports: &str, data: &str, on_request_headers: &str, on_request_body: &str) -> String {
    format!(
        r#"(module
  {imports}
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 65536))
  {data}
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32) (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n))) (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32) {on_request_headers})
  (func (export "proxy_on_request_body") (param $ctx i32) (param $size i32) (param $eos i32) (result i32) {on_request_body})
  (func (export "proxy_on_request_trailers") (param i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_response_body") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_response_trailers") (param i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_log") (param i32))
  (func (export "proxy_on_delete") (param i32))
)"#
    )
}

fn input(body: &[u8]) -> ExchangeInput {
    ExchangeInput {
        request_headers: vec![
            (":method".into(), "POST".into()),
            (":path".into(), "/x".into()),
            ("Content-Type".into(), "text/plain".into()),
        ],
        request_body: body.to_vec(),
        response: Some(consentry_harness::host::Delivered {
            headers: vec![(":status".into(), "200".into())],
            body: b"ok".to_vec(),
            trailers: vec![],
        }),
        ..ExchangeInput::default()
    }
}

fn no_calls(_: &consentry_harness::host::HttpCall) -> Option<consentry_harness::host::CallAnswer> {
    None
}

#[test]
fn an_import_outside_the_abi_is_refused_with_its_name() {
    let path = module(
        "unknown-import",
        &skeleton(
            r#"(import "env" "proxy_teleport" (func (param i32)))"#,
            "",
            "(i32.const 0)",
            "(i32.const 0)",
        ),
    );
    let err = Plugin::load(&path).err().expect("refused").to_string();
    assert!(
        err.contains("env.proxy_teleport") && err.contains("not part of the proxy-wasm ABI"),
        "{err}"
    );
}

#[test]
fn a_refused_configuration_is_a_start_error_with_the_log() {
    let wat = skeleton("", "", "(i32.const 0)", "(i32.const 0)").replace(
        r#"(func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))"#,
        r#"(func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 0))"#,
    );
    let plugin = Plugin::load(&module("refuse", &wat)).unwrap();
    assert!(matches!(
        plugin.start(Settings::default(), b"{}"),
        Err(StartError::Refused(_))
    ));
}

#[test]
fn body_callbacks_see_the_cumulative_size_after_pause_and_continue_forwards_all() {
    // Pause until end of stream; at the end the size must be the whole body (10 bytes
    // in chunks of 4), or the module traps.
    let body = "(if (result i32) (local.get $eos) (then (if (i32.ne (local.get $size) (i32.const 10)) (then unreachable)) (i32.const 0)) (else (i32.const 1)))";
    let plugin = Plugin::load(&module("pause", &skeleton("", "", "(i32.const 0)", body))).unwrap();
    let mut vm = plugin
        .start(
            Settings {
                chunk_size: 4,
                ..Settings::default()
            },
            b"",
        )
        .unwrap();
    let out = vm.run(&input(b"0123456789"), &mut no_calls);
    assert!(out.trap.is_none(), "{:?}", out.trap);
    let Fate::Forwarded(d) = &out.request else {
        panic!("{:?}", out.request)
    };
    assert_eq!(d.body, b"0123456789");
    assert_eq!(
        d.headers
            .iter()
            .find(|(k, _)| k == "content-type")
            .map(|(_, v)| v.as_str()),
        Some("text/plain"),
        "names are lower-cased"
    );
}

#[test]
fn a_headers_pause_that_is_never_resumed_stalls() {
    let plugin = Plugin::load(&module(
        "stall",
        &skeleton("", "", "(i32.const 1)", "(i32.const 0)"),
    ))
    .unwrap();
    let mut vm = plugin.start(Settings::default(), b"").unwrap();
    let out = vm.run(&input(b"abc"), &mut no_calls);
    assert!(
        matches!(out.request, Fate::Stalled { .. }),
        "{:?}",
        out.request
    );
}

#[test]
fn a_body_over_the_buffer_limit_is_refused_by_envoy_413() {
    let plugin = Plugin::load(&module(
        "limit",
        &skeleton("", "", "(i32.const 0)", "(i32.const 1)"),
    ))
    .unwrap();
    let mut vm = plugin
        .start(
            Settings {
                buffer_limit: 8,
                chunk_size: 4,
                ..Settings::default()
            },
            b"",
        )
        .unwrap();
    let out = vm.run(&input(b"0123456789abcdef"), &mut no_calls);
    assert!(
        matches!(out.request, Fate::EnvoyRefused { status: 413, .. }),
        "{:?}",
        out.request
    );
}

#[test]
fn set_buffer_bytes_accepts_only_replace_from_zero_or_append() {
    // At end of stream: set_buffer_bytes(request body, start 2, size 1, "X") must be
    // BadArgument (2); then start 0 size 3 replaces the first three bytes.
    let imports = r#"(import "env" "proxy_set_buffer_bytes" (func $set (param i32 i32 i32 i32 i32) (result i32)))"#;
    let data = r#"(data (i32.const 1024) "XY")"#;
    let body = r#"
      (if (result i32) (local.get $eos)
        (then
          (if (i32.ne (call $set (i32.const 0) (i32.const 2) (i32.const 1) (i32.const 1024) (i32.const 1)) (i32.const 2))
            (then unreachable))
          (drop (call $set (i32.const 0) (i32.const 0) (i32.const 3) (i32.const 1024) (i32.const 2)))
          (i32.const 0))
        (else (i32.const 1)))"#;
    let plugin = Plugin::load(&module(
        "setbuf",
        &skeleton(imports, data, "(i32.const 0)", body),
    ))
    .unwrap();
    let mut vm = plugin.start(Settings::default(), b"").unwrap();
    let out = vm.run(&input(b"abcdef"), &mut no_calls);
    assert!(out.trap.is_none(), "{:?}", out.trap);
    let Fate::Forwarded(d) = &out.request else {
        panic!("{:?}", out.request)
    };
    assert_eq!(d.body, b"XYdef");
}

#[test]
fn a_trap_answers_503_like_envoy_fail_closed() {
    let plugin = Plugin::load(&module(
        "trap",
        &skeleton("", "", "unreachable", "(i32.const 0)"),
    ))
    .unwrap();
    let mut vm = plugin.start(Settings::default(), b"").unwrap();
    let out = vm.run(&input(b""), &mut no_calls);
    assert!(out.trap.is_some());
    assert_eq!(
        out.client.unwrap().headers[0],
        (":status".to_string(), "503".to_string())
    );
}

#[test]
fn strict_mode_fails_on_calls_the_emulator_does_not_model() {
    let imports = r#"(import "env" "proxy_grpc_cancel" (func $cancel (param i32) (result i32)))"#;
    let plugin = Plugin::load(&module(
        "strict",
        &skeleton(
            imports,
            "",
            "(drop (call $cancel (i32.const 1))) (i32.const 0)",
            "(i32.const 0)",
        ),
    ))
    .unwrap();
    let mut lenient = plugin.start(Settings::default(), b"").unwrap();
    assert!(lenient.run(&input(b""), &mut no_calls).trap.is_none());
    let mut strict = plugin
        .start(
            Settings {
                strict: true,
                ..Settings::default()
            },
            b"",
        )
        .unwrap();
    let trap = strict
        .run(&input(b""), &mut no_calls)
        .trap
        .unwrap_or_default();
    assert!(trap.contains("proxy_grpc_cancel"), "{trap}");
}
