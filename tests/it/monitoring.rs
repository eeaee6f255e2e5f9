//! What operators plug in, checked against the real thing: the Prometheus rules
//! (`deploy/prometheus/permgate.rules.yaml`) and the Grafana dashboard
//! (`deploy/grafana/permgate.json`) name only metrics and labels that a gateway exports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper::Method;
use permgate::env::SharedEnv;
use serde_json::Value;

use crate::support::*;

/// Labels Prometheus adds to every scraped series (static configs, Kubernetes discovery).
const TARGET_LABELS: [&str; 4] = ["job", "instance", "namespace", "pod"];

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Every metric and label named by the rules and the dashboard exists in a live scrape.

#[tokio::test]
async fn rules_and_dashboard_name_only_metrics_and_labels_a_gateway_exports() {
    let gw = start_with(|c| {
        *c = c.replace(
            "request_timeout_ms = 3000",
            "request_timeout_ms = 3000\nmax_retries = 0\nmax_concurrency = 1\nqueue_timeout_ms = 50",
        );
        *c = c.replacen(
            "checkpoints = [\"ft:gpt-4o-mini-2024-07-18:acme:*\"]",
            "checkpoints = [\"ft:gpt-4o-mini-2024-07-18:acme:*\"]\nrate_per_second = 1\nburst = 1",
            1,
        );
    })
    .await;
    // Traffic that creates the labelled series: a miss, a hit, a 429, an upstream 500, a shed,
    // an unauthenticated request, a write, a failed reload.
    assert_eq!(gw.client.get(&list_path(CP), WRITER).await.status, 200);
    assert_eq!(gw.client.get(&list_path(CP), WRITER).await.status, 200);
    assert_eq!(gw.client.get(&list_path(CP), READER).await.status, 200);
    assert_eq!(gw.client.get(&list_path(CP), READER).await.status, 429);
    assert_eq!(gw.client.get(&list_path(CP), "nope").await.status, 401);
    gw.mock.push_fault(permgate::mock_upstream::Fault::Status {
        status: 500,
        body: "{}".into(),
        retry_after: None,
    });
    assert_eq!(gw.client.get(&list_path(CP2), WRITER).await.status, 502);
    let mut held = gw.mock.hold_next();
    let first = {
        let client = gw.client.clone();
        tokio::spawn(async move { client.get(&list_path(GLOBEX), WRITER).await })
    };
    held.arrived().await;
    let shed = gw
        .client
        .get(&format!("{}?limit=5", list_path(CP2)), WRITER)
        .await;
    assert_eq!(shed.status, 503);
    held.release();
    assert_eq!(first.await.unwrap().status, 200);
    let created = gw
        .client
        .post(&list_path(CP), WRITER, r#"{"project_ids":["proj_a"]}"#)
        .await;
    assert_eq!(created.status, 200);
    let env: SharedEnv = Arc::new(|_| None);
    let missing = std::env::temp_dir().join("permgate-no-such-dir/permgate.toml");
    assert!(permgate::reload::reload(&gw.state, &missing, &env).is_err());

    let scraped = gw
        .admin()
        .send(Method::GET, "/metrics", None, &[], None)
        .await;
    assert_eq!(scraped.status, 200);
    let scrape = Scrape::parse(std::str::from_utf8(&scraped.body).unwrap());

    let rules_text = read("deploy/prometheus/permgate.rules.yaml");
    let records: BTreeSet<String> = rules_text
        .lines()
        .filter_map(|l| l.trim().trim_start_matches("- ").strip_prefix("record:"))
        .map(|r| r.trim().to_string())
        .collect();
    assert!(records.len() >= 5, "recording rules found: {records:?}");

    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/permgate.json"))
        .expect("deploy/grafana/permgate.json is JSON");
    let mut dashboard_queries = Vec::new();
    let mut dashboard_strings = Vec::new();
    collect_strings(
        &dashboard,
        None,
        &mut dashboard_queries,
        &mut dashboard_strings,
    );

    let mut problems = Vec::new();
    for (source, exprs, texts) in [
        (
            "deploy/prometheus/permgate.rules.yaml",
            yaml_exprs(&rules_text),
            vec![rules_text.clone()],
        ),
        (
            "deploy/grafana/permgate.json",
            dashboard_queries,
            dashboard_strings,
        ),
    ] {
        let mut refs = Refs::default();
        for text in &texts {
            refs.names_in(text);
        }
        for expr in &exprs {
            refs.promql(expr);
        }
        assert!(
            refs.metrics.len() >= 10
                && !refs.selector_labels.is_empty()
                && !refs.grouping.is_empty(),
            "{source}: the loose PromQL scan found too little ({} metrics, {} selector labels, \
             {} grouping labels): is the parser broken?",
            refs.metrics.len(),
            refs.selector_labels.len(),
            refs.grouping.len()
        );
        problems.extend(scrape.check(source, &refs, &records));
    }
    assert!(
        problems.is_empty(),
        "names in the rules or the dashboard that a gateway does not export (renamed metric or \
         label?):\n  {}\n\nscrape:\n{}",
        problems.join("\n  "),
        scrape.text
    );
}

/// Sample names and the label names seen on each, from the text exposition format.
struct Scrape {
    labels: BTreeMap<String, BTreeSet<String>>,
    text: String,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut labels: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            let entry = labels.entry(line[..end].to_string()).or_default();
            if line[end..].starts_with('{') {
                let (matchers, _) = parse_matchers(&line[end + 1..])
                    .unwrap_or_else(|| panic!("unparsable sample line: {line}"));
                entry.extend(matchers);
            }
        }
        Scrape {
            labels,
            text: text.to_string(),
        }
    }

    /// A sample name, or a histogram's name (whose `_bucket` samples exist).
    fn labels_of(&self, name: &str) -> Option<&BTreeSet<String>> {
        self.labels
            .get(name)
            .or_else(|| self.labels.get(&format!("{name}_bucket")))
    }

    fn all_labels(&self) -> BTreeSet<&str> {
        self.labels
            .values()
            .flatten()
            .map(String::as_str)
            .chain(TARGET_LABELS)
            .collect()
    }

    fn check(&self, source: &str, refs: &Refs, records: &BTreeSet<String>) -> Vec<String> {
        let mut problems = Vec::new();
        for name in &refs.metrics {
            if self.labels_of(name).is_none() {
                problems.push(format!("{source}: metric {name}"));
            }
        }
        for name in &refs.records {
            if !records.contains(name) {
                problems.push(format!(
                    "{source}: recording rule {name} (not defined in permgate.rules.yaml)"
                ));
            }
        }
        let all = self.all_labels();
        for (metric, label) in &refs.selector_labels {
            let known = match metric {
                Some(m) if !m.contains(':') => self
                    .labels_of(m)
                    .is_some_and(|l| l.contains(label) || TARGET_LABELS.contains(&label.as_str())),
                _ => all.contains(label.as_str()),
            };
            if !known {
                let on = metric.as_deref().unwrap_or("a selector");
                problems.push(format!("{source}: label {label} on {on}"));
            }
        }
        for label in &refs.grouping {
            if !all.contains(label.as_str()) {
                problems.push(format!(
                    "{source}: label {label} in by/on/without/ignoring (...)"
                ));
            }
        }
        problems
    }
}

/// What a source refers to: metric names, recording rule names, labels in selectors (with the
/// metric they select, if any) and in grouping clauses.
#[derive(Default)]
struct Refs {
    metrics: BTreeSet<String>,
    records: BTreeSet<String>,
    selector_labels: BTreeSet<(Option<String>, String)>,
    grouping: BTreeSet<String>,
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

impl Refs {
    /// Every `permgate_*` identifier anywhere in `text` (expressions, annotations, panel
    /// descriptions); those with a colon are recording rules.
    fn names_in(&mut self, text: &str) {
        for token in text.split(|c: char| !is_ident(c)) {
            // A colon ending a word is prose ("permgate_fleet_redis_up: 1 connected").
            let token = token.trim_end_matches(':');
            if token.starts_with("permgate_") && !token.contains(':') {
                self.metrics.insert(token.to_string());
            } else if token.contains(":permgate_") || token.starts_with("permgate_") {
                self.records.insert(token.to_string());
            }
        }
    }

    /// Labels of `{...}` selectors and of `by|without|on|ignoring|group_left|group_right (...)`.
    fn promql(&mut self, expr: &str) {
        self.names_in(expr);
        let chars: Vec<(usize, char)> = expr.char_indices().collect();
        let mut i = 0;
        while i < chars.len() {
            let (at, c) = chars[i];
            if c == '"' {
                // Skip string literals (label values).
                i += 1;
                while i < chars.len() && chars[i].1 != '"' {
                    if chars[i].1 == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
            } else if c == '{' {
                let before = expr[..at].trim_end();
                let metric: String = before
                    .chars()
                    .rev()
                    .take_while(|&c| is_ident(c))
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                let metric = (!metric.is_empty()).then_some(metric);
                if let Some((labels, used)) = parse_matchers(&expr[at + 1..]) {
                    for label in labels {
                        self.selector_labels.insert((metric.clone(), label));
                    }
                    let end = at + 1 + used;
                    while i < chars.len() && chars[i].0 < end {
                        i += 1;
                    }
                    continue;
                }
            } else if is_ident(c) && (i == 0 || !is_ident(chars[i - 1].1)) {
                let word: String = expr[at..].chars().take_while(|&c| is_ident(c)).collect();
                let rest = expr[at + word.len()..].trim_start();
                let grouping = matches!(
                    word.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                );
                if grouping && rest.starts_with('(') {
                    let close = rest.find(')').expect("grouping clause closes");
                    for label in rest[1..close].split(',') {
                        let label = label.trim();
                        if !label.is_empty() {
                            self.grouping.insert(label.to_string());
                        }
                    }
                }
                i += word.chars().count();
                continue;
            }
            i += 1;
        }
    }
}

/// Parses `name op "value", ...}` (after a `{`): the label names and the bytes consumed
/// through the `}`. `None` if it is not a list of matchers (a Grafana `{{legend}}`, say).
fn parse_matchers(s: &str) -> Option<(Vec<String>, usize)> {
    let mut labels = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        if i < b.len() && b[i] == b'}' {
            return Some((labels, i + 1));
        }
        let start = i;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
            i += 1;
        }
        if i == start {
            return None;
        }
        labels.push(s[start..i].to_string());
        skip_ws(&mut i);
        let op = ["=~", "!~", "!=", "="]
            .into_iter()
            .find(|op| s[i..].starts_with(op))?;
        i += op.len();
        skip_ws(&mut i);
        if i >= b.len() || b[i] != b'"' {
            return None;
        }
        i += 1;
        while i < b.len() && b[i] != b'"' {
            if b[i] == b'\\' {
                i += 1;
            }
            i += 1;
        }
        i += 1;
        skip_ws(&mut i);
        if i < b.len() && b[i] == b',' {
            i += 1;
        }
        if i > b.len() {
            return None;
        }
    }
}

/// The `expr:` values of a rules file, read loosely: a plain or quoted scalar on the line, or
/// a block scalar (`|`, `>`, with chomping) on the more indented lines that follow.
fn yaml_exprs(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut exprs = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let indent = line.len() - line.trim_start().len();
        let Some(value) = line.trim_start().strip_prefix("expr:") else {
            i += 1;
            continue;
        };
        let value = value.trim();
        i += 1;
        if value.starts_with('|') || value.starts_with('>') {
            let mut block = Vec::new();
            while i < lines.len() {
                let l = lines[i];
                let deeper = l.len() - l.trim_start().len() > indent;
                if !(deeper || l.trim().is_empty()) {
                    break;
                }
                block.push(l.trim());
                i += 1;
            }
            exprs.push(block.join("\n"));
        } else if let Some(quoted) = value.strip_prefix('"') {
            exprs.push(
                quoted
                    .trim_end_matches('"')
                    .replace("\\\"", "\"")
                    .replace("\\\\", "\\"),
            );
        } else if let Some(quoted) = value.strip_prefix('\'') {
            exprs.push(quoted.trim_end_matches('\'').replace("''", "'"));
        } else {
            exprs.push(value.to_string());
        }
    }
    assert!(exprs.len() >= 10, "expr: values found: {exprs:?}");
    exprs
}

/// Every string in the dashboard; those under `expr`, `query` and `definition` keys (panel
/// targets, template variables) are PromQL.
fn collect_strings(v: &Value, key: Option<&str>, queries: &mut Vec<String>, all: &mut Vec<String>) {
    match v {
        Value::String(s) => {
            if matches!(key, Some("expr" | "query" | "definition")) {
                queries.push(s.clone());
            }
            all.push(s.clone());
        }
        Value::Array(items) => {
            for item in items {
                collect_strings(item, key, queries, all);
            }
        }
        Value::Object(map) => {
            for (k, item) in map {
                collect_strings(item, Some(k), queries, all);
            }
        }
        _ => {}
    }
}
