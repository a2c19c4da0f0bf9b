//! Recorded traffic: what the harness replays. Every input format (the native format,
//! Envoy tap traces, HAR 1.2) is read into the same [`Recording`] type.

use serde::Serialize;
use std::collections::BTreeMap;

pub mod har;
pub mod native;
pub mod tap;

/// One HTTP message as it crossed the wire.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Message {
    /// Header names lower-case, in order, repeated names kept. A request carries the
    /// pseudo-headers `:method`, `:path`, `:authority` (and `:scheme`); a response `:status`.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, String)>,
    /// The recording says the body was cut short (tap `truncated`); replaying it
    /// judges the truncated bytes.
    pub body_truncated: bool,
}

impl Message {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What a test expects of one direction after the filter ran.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DirectionExpectation {
    /// Status the filter answered with locally (a refusal); `None` = not checked.
    pub status: Option<u16>,
    /// Whether the message reached its recipient at all.
    pub delivered: Option<bool>,
    /// The body the recipient received, compared as JSON (exact, key order ignored).
    pub body: Option<serde_json::Value>,
    /// Headers the recipient received: `Some(v)` must equal v, `None` must be absent.
    pub headers: BTreeMap<String, Option<String>>,
    /// Outcome in the decision log: allowed, modified, blocked, uninspectable.
    pub outcome: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Expectation {
    pub request: DirectionExpectation,
    pub response: DirectionExpectation,
}

/// How the scripted consent store answers during one exchange.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum StoreBehaviour {
    /// Answers lookups from this data: subject → consent key → granted.
    Answer(BTreeMap<String, BTreeMap<String, bool>>),
    /// Answers every lookup with this HTTP status and an empty body.
    Status(u16),
    /// Answers 200 with a body that is not the store's format.
    Garbage,
    /// Never answers: the call times out.
    Timeout,
    /// The connection fails.
    Down,
}

impl Default for StoreBehaviour {
    fn default() -> Self {
        StoreBehaviour::Answer(BTreeMap::new())
    }
}

/// One request/response exchange to replay.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Recording {
    /// Where it came from: `file`, `file#3`, `file:entries[3]`.
    pub source: String,
    pub name: Option<String>,
    pub request: Message,
    /// `None` when the recording has no response (the upstream never answered).
    pub response: Option<Message>,
    /// Envoy's upstream cluster (`xds.cluster_name`), when known.
    pub cluster: Option<String>,
    /// The caller's mTLS identity (`connection.uri_san_peer_certificate`), when known.
    pub peer_principal: Option<String>,
    pub store: StoreBehaviour,
    pub expect: Option<Expectation>,
    /// Problems found while reading that did not stop it (e.g. a truncated body).
    pub warnings: Vec<String>,
}

/// A problem reading a traffic file: which file, where, what to do.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}{}: {message}", location.as_ref().map(|l| format!(":{l}")).unwrap_or_default())]
pub struct TrafficError {
    pub file: String,
    /// `line:column` or a JSON Pointer, when known.
    pub location: Option<String>,
    pub message: String,
}

/// Reads recordings from a path, choosing the format by what the file holds: a
/// directory is Envoy tap `file_per_tap` output; a file is HAR (`log.entries`), a tap
/// trace (`http_buffered_trace`) or the native format (`exchanges`).
pub fn load_path(path: &std::path::Path) -> Result<Vec<Recording>, TrafficError> {
    let file = path.display().to_string();
    if path.is_dir() {
        return tap::load_dir(path);
    }
    let text = std::fs::read_to_string(path).map_err(|e| TrafficError {
        file: file.clone(),
        location: None,
        message: format!("cannot read it: {e}"),
    })?;
    let head: String = text.chars().take(4096).collect();
    if head.contains("\"log\"") && text.contains("\"entries\"") {
        har::load(&file, &text)
    } else if [
        "http_buffered_trace",
        "httpBufferedTrace",
        "http_streamed_trace_segment",
        "httpStreamedTraceSegment",
    ]
    .iter()
    .any(|k| head.contains(k))
    {
        tap::load(&file, &text)
    } else if text.contains("exchanges") {
        native::load(&file, &text)
    } else {
        Err(TrafficError {
            file,
            location: None,
            message: "not a traffic file this tool reads: expected a native replay file (`exchanges:`), an Envoy tap trace (`http_buffered_trace`), a HAR 1.2 file (`log.entries`), or a directory of tap files".into(),
        })
    }
}
