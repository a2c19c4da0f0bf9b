//! `consentry`: check policies, replay recorded traffic through the filter's real `.wasm`,
//! diff two policies over the same traffic, explain one message, and report on decision
//! logs. Exit codes: 0 ok, 1 findings, 2 usage or input error.

use anstream::{eprintln, println};
use anstyle::{AnsiColor, Style};
use anyhow::{bail, Result};
use clap::{Parser, Subcommand, ValueEnum};
use consentry_harness::check::{self, Severity};
use consentry_harness::host::Settings;
use consentry_harness::replay::{LoadedPolicy, Replayed, Runner};
use consentry_harness::report;
use consentry_harness::traffic::{self, Recording};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "consentry", version, about = "Test, replay, diff and explain consentry policies with the filter's real .wasm", long_about = None)]
struct Cli {
    /// Output format.
    #[arg(long, value_enum, global = true, default_value_t = Format::Text)]
    format: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(clap::Args)]
struct WasmArgs {
    /// The filter module; default: $CONSENTRY_WASM, else
    /// target/wasm32-wasip1/release/consentry.wasm in this or a parent directory.
    #[arg(long)]
    wasm: Option<PathBuf>,
    /// Fail on any host call the emulator does not model.
    #[arg(long)]
    strict: bool,
    /// Deliver bodies in chunks of this many bytes (0: one chunk), as a slow client would.
    #[arg(long, default_value_t = 0)]
    chunk_size: usize,
    /// Extra VM environment variables, e.g. the keys the filter reads (without them
    /// fixed replay keys are used): KEY=VALUE, or KEY alone to take the value from this
    /// process's environment, which keeps a real key off the command line (and out of
    /// `ps`).
    #[arg(long = "env", value_name = "KEY[=VALUE]")]
    env: Vec<String>,
    /// Hand the filter each request path as recorded, as an Envoy without path hygiene
    /// would. By default the harness does what the shipped bootstrap's Envoy does first:
    /// normalise the path (dot segments, unreserved escapes, merged slashes) and refuse
    /// escaped slashes with 400.
    #[arg(long)]
    raw_paths: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Validate policies without running anything: every error with file, line and column.
    Check {
        /// Policy files (JSON or YAML).
        #[arg(required = true)]
        policies: Vec<PathBuf>,
        /// Exit 1 on warnings too.
        #[arg(long)]
        deny_warnings: bool,
    },
    /// Run recorded traffic through the filter and check it against its expectations.
    Replay {
        #[arg(long)]
        policy: PathBuf,
        #[command(flatten)]
        wasm: WasmArgs,
        /// Also show every host call the filter made.
        #[arg(long)]
        trace: bool,
        /// Native replay files, Envoy tap traces (files or file_per_tap directories), HAR files.
        #[arg(required = true)]
        traffic: Vec<PathBuf>,
    },
    /// Which flows, fields and subjects a policy change would newly block, strip or let through.
    Diff {
        #[arg(long)]
        old: PathBuf,
        #[arg(long)]
        new: PathBuf,
        #[command(flatten)]
        wasm: WasmArgs,
        #[arg(required = true)]
        traffic: Vec<PathBuf>,
    },
    /// Every field of one message: category, purposes considered, legal basis, consent, decision.
    Explain {
        #[arg(long)]
        policy: PathBuf,
        #[command(flatten)]
        wasm: WasmArgs,
        /// Which exchange of the file (0-based).
        #[arg(long, default_value_t = 0)]
        index: usize,
        /// A traffic file holding the message.
        message: PathBuf,
    },
    /// Blocked and modified flows from decision logs, by caller, recipient and category.
    Report {
        /// Include allowed flows and the legal basis that let each through.
        #[arg(long)]
        all: bool,
        /// Envoy logs, access logs (JSON lines) or decision JSON lines; `-` for stdin.
        #[arg(required = true)]
        logs: Vec<PathBuf>,
    },
}

/// An input problem: exit code 2.
#[derive(Debug)]
struct InputError(String);

impl std::fmt::Display for InputError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InputError {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let bold_red = Style::new().bold().fg_color(Some(AnsiColor::Red.into()));
            eprintln!("{bold_red}error{bold_red:#}: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn style(c: AnsiColor) -> Style {
    Style::new().fg_color(Some(c.into()))
}

fn find_wasm(arg: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = arg {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("CONSENTRY_WASM") {
        return Ok(PathBuf::from(p));
    }
    let mut dir = std::env::current_dir()?;
    loop {
        let candidate = dir.join("target/wasm32-wasip1/release/consentry.wasm");
        if candidate.is_file() {
            return Ok(candidate);
        }
        if !dir.pop() {
            bail!(InputError(
                "no consentry.wasm found: build it with `cargo build --release --target wasm32-wasip1 -p consentry`, or pass --wasm".into()
            ));
        }
    }
}

fn settings(args: &WasmArgs, trace: bool) -> Result<Settings> {
    let mut s = Settings {
        strict: args.strict,
        chunk_size: args.chunk_size,
        path_hygiene: !args.raw_paths,
        trace,
        ..Settings::default()
    };
    for kv in &args.env {
        let (k, v) = match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => match std::env::var(kv) {
                Ok(v) => (kv.clone(), v),
                Err(_) => bail!(InputError(format!(
                    "--env {kv}: {kv} is not set in this environment; export it, or write KEY=VALUE"
                ))),
            },
        };
        s.env.push((k, v));
    }
    Ok(s)
}

fn runner(policy: &Path, args: &WasmArgs, trace: bool) -> Result<Runner> {
    let wasm = find_wasm(args.wasm.as_deref())?;
    let policy = LoadedPolicy::read(policy).map_err(|e| InputError(format!("{e:#}")))?;
    let file = policy.file.clone();
    Runner::new(&wasm, policy, settings(args, trace)?).map_err(|e| {
        anyhow::Error::new(InputError(format!(
            "{file}: {e:#}\n(run `consentry check {file}` for line numbers)"
        )))
    })
}

fn load_traffic(paths: &[PathBuf]) -> Result<Vec<Recording>> {
    let mut all = Vec::new();
    for p in paths {
        all.extend(traffic::load_path(p).map_err(|e| InputError(e.to_string()))?);
    }
    Ok(all)
}

fn progress(n: usize) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if n < 50 || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(n as u64);
    if let Ok(s) = indicatif::ProgressStyle::with_template(
        "{bar:40} {pos}/{len} exchanges {per_sec} eta {eta}",
    ) {
        bar.set_style(s);
    }
    bar
}

fn run(cli: Cli) -> Result<ExitCode> {
    let json = cli.format == Format::Json;
    match cli.command {
        Command::Check {
            policies,
            deny_warnings,
        } => {
            let mut findings = Vec::new();
            for p in &policies {
                findings.extend(check::check_file(p).map_err(|e| InputError(format!("{e:#}")))?);
            }
            let errors = findings
                .iter()
                .filter(|f| f.severity == Severity::Error)
                .count();
            let warnings = findings.len() - errors;
            if json {
                println!("{}", serde_json::to_string_pretty(&findings)?);
            } else {
                for f in &findings {
                    let (label, st) = match f.severity {
                        Severity::Error => ("error", style(AnsiColor::Red).bold()),
                        Severity::Warning => ("warning", style(AnsiColor::Yellow).bold()),
                    };
                    let at = if f.pointer.is_empty() {
                        String::new()
                    } else {
                        format!(" (at {})", f.pointer)
                    };
                    println!("{}: {st}{label}{st:#}: {}{at}", f.location(), f.message);
                }
                let ok = style(AnsiColor::Green).bold();
                if findings.is_empty() {
                    println!(
                        "{ok}ok{ok:#}: {} polic{} checked, no problems",
                        policies.len(),
                        if policies.len() == 1 { "y" } else { "ies" }
                    );
                } else {
                    println!("{errors} error(s), {warnings} warning(s)");
                }
            }
            Ok(ExitCode::from(u8::from(
                errors > 0 || (deny_warnings && warnings > 0),
            )))
        }
        Command::Replay {
            policy,
            wasm,
            trace,
            traffic,
        } => {
            let mut r = runner(&policy, &wasm, trace)?;
            let recs = load_traffic(&traffic)?;
            let bar = progress(recs.len());
            let started = std::time::Instant::now();
            let mut results = Vec::new();
            for rec in &recs {
                results.push(r.run(rec)?);
                bar.inc(1);
            }
            bar.finish_and_clear();
            let elapsed = started.elapsed();
            let failed = results.iter().filter(|x| !x.passed()).count();
            let checked = results.iter().filter(|x| x.expected).count();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "policy": r.policy().file,
                        "exchanges": results,
                        "summary": { "exchanges": results.len(), "with_expectations": checked, "failed": failed },
                    }))?
                );
            } else {
                for x in &results {
                    print_replayed(x, trace);
                }
                let st = if failed == 0 {
                    style(AnsiColor::Green).bold()
                } else {
                    style(AnsiColor::Red).bold()
                };
                println!(
                    "\n{st}{} passed, {} failed{st:#} ({} exchanges, {} with expectations, {:.1} ms)",
                    results.len() - failed,
                    failed,
                    results.len(),
                    checked,
                    elapsed.as_secs_f64() * 1000.0
                );
            }
            Ok(ExitCode::from(u8::from(failed > 0)))
        }
        Command::Diff {
            old,
            new,
            wasm,
            traffic,
        } => {
            let mut a = runner(&old, &wasm, false)?;
            let mut b = runner(&new, &wasm, false)?;
            let recs = load_traffic(&traffic)?;
            let mut changes = Vec::new();
            for rec in &recs {
                let (x, y) = (a.run(rec)?, b.run(rec)?);
                changes.extend(diff_exchange(&x, &y));
            }
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({ "old": old, "new": new, "exchanges": recs.len(), "changes": changes })
                    )?
                );
            } else if changes.is_empty() {
                println!("no differences over {} exchange(s)", recs.len());
            } else {
                for c in &changes {
                    print_change(c);
                }
                println!(
                    "\n{} change(s) over {} exchange(s)",
                    changes.len(),
                    recs.len()
                );
            }
            Ok(ExitCode::from(u8::from(!changes.is_empty())))
        }
        Command::Explain {
            policy,
            wasm,
            index,
            message,
        } => {
            let mut r = runner(&policy, &wasm, false)?;
            let recs = load_traffic(std::slice::from_ref(&message))?;
            let Some(rec) = recs.get(index) else {
                bail!(InputError(format!(
                    "{} holds {} exchange(s); --index {index} is out of range",
                    message.display(),
                    recs.len()
                )));
            };
            let x = r.run(rec)?;
            let explained = explain(&x, &r.policy().value);
            if json {
                println!("{}", serde_json::to_string_pretty(&explained)?);
            } else {
                print_explained(&x, &explained);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Report { all, logs } => {
            let mut entries = Vec::new();
            for p in &logs {
                let (e, warnings) =
                    report::read_entries(p).map_err(|e| InputError(format!("{e:#}")))?;
                for w in warnings {
                    eprintln!("{}: {w}", p.display());
                }
                entries.extend(e);
            }
            let rep = report::build(
                &entries,
                &report::ReportOptions {
                    include_allowed: all,
                },
            );
            if json {
                println!("{}", serde_json::to_string_pretty(&rep)?);
            } else {
                let color = anstream::AutoStream::choice(&std::io::stdout())
                    != anstream::ColorChoice::Never;
                print!("{}", report::render_text(&rep, color));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn fate_line(d: &consentry_harness::replay::DirectionResult) -> String {
    let outcome = d
        .decision
        .as_ref()
        .and_then(|v| v.get("outcome"))
        .and_then(Value::as_str)
        .unwrap_or("not touched");
    let recipient = d
        .decision
        .as_ref()
        .and_then(|v| v.get("recipient"))
        .and_then(Value::as_str)
        .map(|r| format!(" to {r}"))
        .unwrap_or_default();
    match d.status {
        Some(s) => format!(
            "{}{recipient} {s}, outcome {outcome}",
            d.fate.replace('_', " ")
        ),
        None => format!("{}{recipient}, outcome {outcome}", d.fate.replace('_', " ")),
    }
}

fn print_replayed(x: &Replayed, trace: bool) {
    let (mark, st) = if x.passed() {
        ("PASS", style(AnsiColor::Green).bold())
    } else {
        ("FAIL", style(AnsiColor::Red).bold())
    };
    println!("{st}{mark}{st:#} {}", x.label());
    println!("  request : {}", fate_line(&x.request));
    println!("  response: {}", fate_line(&x.response));
    for w in &x.warnings {
        let y = style(AnsiColor::Yellow);
        println!("  {y}warning{y:#}: {w}");
    }
    for m in &x.mismatches {
        for (i, line) in m.lines().enumerate() {
            println!("  {}{line}", if i == 0 { "✗ " } else { "  " });
        }
    }
    if trace {
        for t in &x.raw.trace {
            println!("    host: {t}");
        }
    }
}

/// One difference between two policies' treatment of an exchange.
#[derive(serde::Serialize)]
struct Change {
    exchange: String,
    direction: &'static str,
    /// flow: whole-message outcome; field: the action at one path template for one
    /// subject (or for the decisions without a subject).
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    category: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<String>,
    old: String,
    new: String,
}

/// (path template, category, action, subject) of each decision of a direction's record
/// (see [`consentry_harness::record::decisions`]), each once.
fn field_actions(
    d: &consentry_harness::replay::DirectionResult,
) -> Vec<(String, String, String, Option<String>)> {
    let Some(entry) = d.decision.as_ref().and_then(Value::as_object) else {
        return Vec::new();
    };
    let mut out: Vec<(String, String, String, Option<String>)> =
        consentry_harness::record::decisions(entry)
            .into_iter()
            .map(|d| (d.path, d.category, d.action, d.subject))
            .collect();
    out.sort();
    out.dedup();
    out
}

fn flow_state(d: &consentry_harness::replay::DirectionResult) -> String {
    let outcome = d
        .decision
        .as_ref()
        .and_then(|v| v.get("outcome"))
        .and_then(Value::as_str);
    match (d.fate, d.status, outcome) {
        (_, Some(s), Some(o)) => format!("{o} ({s})"),
        (f, Some(s), None) => format!("{} ({s})", f.replace('_', " ")),
        (_, None, Some(o)) => o.to_string(),
        (f, None, None) => f.replace('_', " "),
    }
}

fn diff_exchange(a: &Replayed, b: &Replayed) -> Vec<Change> {
    let mut out = Vec::new();
    for (dir, x, y) in [
        ("request", &a.request, &b.request),
        ("response", &a.response, &b.response),
    ] {
        let (fa, fb) = (flow_state(x), flow_state(y));
        if fa != fb {
            out.push(Change {
                exchange: a.label(),
                direction: dir,
                kind: "flow",
                path: None,
                category: None,
                subject: None,
                old: fa,
                new: fb,
            });
        }
        let (xa, ya) = (field_actions(x), field_actions(y));
        // A field is its path template, category and subject: templates stand for every
        // record, so the subject tells records apart.
        for (path, cat, act, subj) in &ya {
            let before = xa
                .iter()
                .find(|(p, c, _, s)| p == path && c == cat && s == subj)
                .map(|(_, _, a, _)| a.clone());
            let before = before.unwrap_or_else(|| "not declared".into());
            if &before != act {
                out.push(Change {
                    exchange: a.label(),
                    direction: dir,
                    kind: "field",
                    path: Some(path.clone()),
                    category: Some(cat.clone()),
                    subject: subj.clone(),
                    old: before,
                    new: act.clone(),
                });
            }
        }
        for (path, cat, act, subj) in &xa {
            if !ya
                .iter()
                .any(|(p, c, _, s)| p == path && c == cat && s == subj)
            {
                out.push(Change {
                    exchange: a.label(),
                    direction: dir,
                    kind: "field",
                    path: Some(path.clone()),
                    category: Some(cat.clone()),
                    subject: subj.clone(),
                    old: act.clone(),
                    new: "not declared".into(),
                });
            }
        }
    }
    out
}

fn print_change(c: &Change) {
    let verdict = match c.new.as_str() {
        "allow" => style(AnsiColor::Yellow).bold(),
        "block" | "strip" => style(AnsiColor::Red).bold(),
        _ => Style::new().bold(),
    };
    match c.kind {
        "flow" => println!(
            "{} {}: {} → {verdict}{}{verdict:#}",
            c.exchange, c.direction, c.old, c.new
        ),
        _ => println!(
            "{} {} {} ({}){}: {} → {verdict}{}{verdict:#}",
            c.exchange,
            c.direction,
            c.path.as_deref().unwrap_or(""),
            c.category.as_deref().unwrap_or(""),
            c.subject
                .as_deref()
                .map(|s| format!(" subject {s}"))
                .unwrap_or_default(),
            c.old,
            c.new
        ),
    }
}

/// Per direction, every decision group of the record (path templates, category, action,
/// how many fields and subjects) with the purposes the recipient could have used.
fn explain(x: &Replayed, policy: &Value) -> Value {
    let mut dirs = Vec::new();
    for (dir, d) in [("request", &x.request), ("response", &x.response)] {
        let Some(dec) = &d.decision else { continue };
        let recipient = dec.get("recipient").and_then(Value::as_str).unwrap_or("");
        let purposes: Vec<&str> = policy
            .pointer(&format!(
                "/services/{}/purposes",
                recipient.replace('~', "~0").replace('/', "~1")
            ))
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let fields: Vec<Value> = dec
            .get("decisions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|f| {
                let cat = f.get("category").and_then(Value::as_str).unwrap_or("");
                let considered: Vec<Value> = purposes
                    .iter()
                    .filter_map(|p| {
                        let pv = policy.get("purposes")?.get(*p)?;
                        let allows = pv.get("allows")?.as_array()?;
                        let covering = allows.iter().filter_map(Value::as_str).find(|a| consentry::engine::category_covers(a, cat))?;
                        Some(serde_json::json!({ "purpose": p, "basis": pv.get("basis"), "allows": covering }))
                    })
                    .collect();
                let subjects = match (dec.as_object(), f.as_object()) {
                    (Some(e), Some(g)) => consentry_harness::record::group_subjects(e, g).len(),
                    _ => 0,
                };
                let mut f = f.clone();
                if let Some(o) = f.as_object_mut() {
                    o.insert("purposes_considered".into(), Value::Array(considered));
                    // The pseudonyms, not the indexes into the record's list.
                    o.insert("subject_count".into(), Value::from(subjects));
                    o.remove("subjects");
                }
                f
            })
            .collect();
        dirs.push(serde_json::json!({
            "direction": dir,
            "caller": dec.get("caller"),
            "recipient": recipient,
            "recipient_purposes": purposes,
            "outcome": dec.get("outcome"),
            "detail": dec.get("detail"),
            "inspected": dec.get("inspected").and_then(Value::as_bool).unwrap_or(true),
            "allowed_categories": dec.get("allowed_categories").cloned().unwrap_or_else(|| Value::Array(Vec::new())),
            "records": dec.get("records").cloned().unwrap_or(Value::from(0)),
            "decisions": fields,
        }));
    }
    serde_json::json!({ "exchange": x.label(), "directions": dirs })
}

fn print_explained(x: &Replayed, e: &Value) {
    println!("{}", x.label());
    let dirs = e
        .get("directions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if dirs.is_empty() {
        println!("  the policy did not touch this exchange (no binding covers it, or it holds no declared data)");
    }
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
    for d in &dirs {
        let b = Style::new().bold();
        println!(
            "\n{b}{}{b:#} from {} to {}: {}",
            s(d, "direction"),
            s(d, "caller"),
            s(d, "recipient"),
            s(d, "outcome")
        );
        if let Some(detail) = d.get("detail").and_then(Value::as_str) {
            println!("  detail: {detail}");
        }
        let purposes: Vec<String> = d
            .get("recipient_purposes")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "  recipient's purposes, in order: {}",
            if purposes.is_empty() {
                "none".into()
            } else {
                purposes.join(", ")
            }
        );
        if d.get("inspected").and_then(Value::as_bool) == Some(false) {
            println!("  not read: the recipient may receive every category of this route whatever the consent (log.every_field lists each field)");
            for g in d
                .get("allowed_categories")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                println!(
                    "  [{}]  allowed by {} on basis {}",
                    s(g, "category"),
                    s(g, "purpose"),
                    s(g, "basis")
                );
            }
        }
        for f in d
            .get("decisions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let action = s(f, "action");
            let st = if action == "allow" {
                style(AnsiColor::Green)
            } else {
                style(AnsiColor::Red)
            };
            let paths: Vec<&str> = f
                .get("paths")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let n = f.get("n").and_then(Value::as_u64).unwrap_or(1);
            let subjects = f.get("subject_count").and_then(Value::as_u64).unwrap_or(0);
            let folded = f.get("folded").and_then(Value::as_u64).unwrap_or(0);
            println!(
                "  {}  [{}]  {st}{action}{st:#}  ({}{}{})",
                if paths.is_empty() {
                    "-".to_string()
                } else {
                    paths.join(", ")
                },
                s(f, "category"),
                if n == 1 {
                    "1 field".to_string()
                } else {
                    format!("{n} fields")
                },
                match subjects {
                    0 => String::new(),
                    1 => ", 1 subject".to_string(),
                    k => format!(", {k} subjects"),
                },
                if folded > 0 {
                    format!(", {folded} at paths not listed")
                } else {
                    String::new()
                }
            );
            let considered = f
                .get("purposes_considered")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if considered.is_empty() {
                println!("      no purpose of the recipient allows this category");
            }
            for c in &considered {
                println!(
                    "      considered {} ({}), allows {}",
                    s(c, "purpose"),
                    s(c, "basis"),
                    s(c, "allows")
                );
            }
            match (
                f.get("purpose").and_then(Value::as_str),
                f.get("basis").and_then(Value::as_str),
            ) {
                (Some(p), Some(basis)) if action == "allow" => {
                    println!("      allowed by {p} on basis {basis}")
                }
                (Some(p), _) => println!("      refused: {} ({p})", s(f, "reason")),
                _ => println!("      refused: {}", s(f, "reason")),
            }
            if let Some(ev) = f.get("evidence").and_then(Value::as_str) {
                println!("      consent evidence: {ev}");
            }
        }
    }
}
