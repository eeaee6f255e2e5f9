//! What operators plug in, checked against the real thing: the Prometheus rules
//! (`deploy/prometheus/permgate.rules.yaml`) and the Grafana dashboard
//! (`deploy/grafana/permgate.json`) name only metrics and labels that a gateway exports, and a
//! real Prometheus scraping a real `permgate serve` evaluates every rule without error and
//! raises the circuit alert once upstream goes away.
//!
//! The Prometheus test needs the `prometheus` binary (Debian package `prometheus`, which
//! `.ci/run` installs). Without it the test is skipped with a message, unless `CI` is set:
//! then it fails.

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use permgate::env::SharedEnv;
use serde_json::Value;

use crate::support::*;

const CIRCUIT_ALERT: &str = "PermgateUpstreamCircuitOpen";

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
        // The permgate_fleet_* series exist only with [redis]; nothing listens there, and
        // the fleet's tasks are not started: its series exist, reading "not connected".
        c.push_str("\n[redis]\nurl = \"redis://127.0.0.1:9\"\n");
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
    // Never connected to Redis, so no fleet lease: the write is refused, upstream not called.
    assert_eq!(created.status, 503);
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

// ---------------------------------------------------------------------------------------------
// A real Prometheus, a real `permgate serve`, a real mock upstream process that then dies.

#[tokio::test]
async fn a_real_prometheus_raises_the_circuit_alert_when_upstream_goes_away() {
    let Some(prometheus) = prometheus_binary() else {
        return;
    };
    let dir = TempDir::new("prometheus");

    // The mock upstream as its own process, so it can die like a real upstream.
    let (mut upstream, fields) = spawn_logged(
        Command::new(env!("CARGO_BIN_EXE_permgate")).args([
            "mock-upstream",
            "--listen",
            "127.0.0.1:0",
            "--admin-key",
            ADMIN_KEY,
        ]),
        "mock upstream serving",
    )
    .await;
    let mock_addr: SocketAddr = fields["addr"].parse().unwrap();

    // The breaker opens after 2 consecutive failures; nothing else differs from production.
    let config = dir.0.join("permgate.toml");
    std::fs::write(
        &config,
        base_config(mock_addr).replace(
            "request_timeout_ms = 3000",
            "request_timeout_ms = 3000\nmax_retries = 0\nbreaker_threshold = 2",
        ),
    )
    .unwrap();
    let (_gateway, fields) = spawn_logged(
        Command::new(env!("CARGO_BIN_EXE_permgate"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("OPENAI_ADMIN_KEY", ADMIN_KEY)
            .env("PERMGATE_LOG", "info,permgate::access=off"),
        "permgate serving",
    )
    .await;
    let data: SocketAddr = fields["listen"].parse().unwrap();
    let admin: SocketAddr = fields["admin_listen"].parse().unwrap();

    // Prometheus: 1 s scrapes and evaluations of the shipped rules file, loopback only.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let prom_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let rules = repo_file("deploy/prometheus/permgate.rules.yaml");
    std::fs::write(
        dir.0.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules:?}\n\
             scrape_configs:\n  - job_name: permgate\n    static_configs:\n      - targets: [\"{admin}\"]\n",
        ),
    )
    .unwrap();
    let log = dir.0.join("prometheus.log");
    let _prometheus = Process(
        Command::new(&prometheus)
            .arg(format!(
                "--config.file={}",
                dir.0.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg(format!("--web.listen-address={prom_addr}"))
            .arg("--storage.tsdb.retention.time=1h")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("prometheus starts"),
    );
    let prom = Prom {
        client: TestClient::new(prom_addr),
        addr: prom_addr,
        log,
    };
    prom.wait_ready().await;
    prom.until("Prometheus scrapes permgate's /metrics", |p| async move {
        let v = p.get("/api/v1/targets").await;
        let target = &v["data"]["activeTargets"][0];
        let error = target["lastError"].as_str().unwrap_or_default();
        assert!(
            error.is_empty(),
            "Prometheus cannot scrape permgate's /metrics: {error}\n(the admin listener \
             serves prometheus-client's OpenMetrics text; it must be labelled \
             `application/openmetrics-text; version=1.0.0; charset=utf-8`: the classic text \
             format of `text/plain; version=0.0.4` has no `info` type)\ntarget: {target}"
        );
        target["health"] == "up"
    })
    .await;

    // Healthy traffic: a miss and a hit.
    let client = TestClient::new(data);
    assert_eq!(client.get(&list_path(CP), READER).await.status, 200);
    assert_eq!(client.get(&list_path(CP), READER).await.status, 200);

    // Prometheus sees the closed circuit, and an evaluation after that leaves the alert silent.
    prom.until("the scrape shows a closed circuit", |p| async move {
        let v = p
            .get("/api/v1/query?query=permgate_upstream_circuit_state")
            .await;
        v["data"]["result"][0]["value"][1] == "0"
    })
    .await;
    let seen = prom.circuit_rule().await["lastEvaluation"].clone();
    prom.until("the circuit rule is evaluated again", |p| {
        let seen = seen.clone();
        async move { p.circuit_rule().await["lastEvaluation"] != seen }
    })
    .await;
    assert_eq!(prom.circuit_rule().await["state"], "inactive");
    assert!(prom.circuit_alert().await.is_none());

    // Upstream dies: connections are refused, two failures open the circuit.
    let _ = upstream.0.kill();
    let _ = upstream.0.wait();
    let statuses: Vec<u16> = {
        let mut s = Vec::new();
        for limit in 1..=3 {
            let path = format!("{}?limit={limit}", list_path(CP));
            s.push(client.get(&path, READER).await.status.as_u16());
        }
        s
    };
    assert_eq!(
        statuses,
        [502, 502, 503],
        "two upstream errors, then the open circuit"
    );

    // The alert goes pending within a few scrapes (it fires after its `for:` of 2 minutes,
    // which this test does not wait for: pending proves the rule matched).
    prom.until(
        &format!("{CIRCUIT_ALERT} pending or firing"),
        |p| async move { p.circuit_alert().await.is_some() },
    )
    .await;
    let alert = prom.circuit_alert().await.unwrap();
    assert_eq!(alert["labels"]["severity"], "warning", "{alert}");
    assert_eq!(alert["labels"]["job"], "permgate", "{alert}");
    assert_eq!(alert["labels"]["instance"], admin.to_string(), "{alert}");
    assert!(
        alert["annotations"]["summary"]
            .as_str()
            .unwrap()
            .contains(&admin.to_string()),
        "{alert}"
    );

    // Every rule of the shipped file evaluated without error in this Prometheus.
    let groups = prom.get("/api/v1/rules").await;
    let mut rules_seen = 0;
    for group in groups["data"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            rules_seen += 1;
            assert_eq!(rule["health"], "ok", "rule failed to evaluate: {rule}");
        }
    }
    let in_file = read("deploy/prometheus/permgate.rules.yaml")
        .lines()
        .filter(|l| {
            l.trim_start().starts_with("- record:") || l.trim_start().starts_with("- alert:")
        })
        .count();
    assert_eq!(
        rules_seen, in_file,
        "every rule of the file is loaded: {groups}"
    );

    // Every dashboard query is valid PromQL for this Prometheus, with Grafana's variables
    // replaced as Grafana would.
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/permgate.json")).unwrap();
    let (mut queries, mut strings) = (Vec::new(), Vec::new());
    collect_strings(&dashboard, None, &mut queries, &mut strings);
    let exprs: Vec<String> = queries
        .iter()
        .filter(|q| !q.starts_with("label_values(") && *q != "prometheus" && *q != "67108864")
        .map(|q| {
            q.replace("$__rate_interval", "1m")
                .replace("$job", ".*")
                .replace("$instance", ".*")
                .replace("$max_bytes", "67108864")
        })
        .collect();
    assert!(exprs.len() >= 20, "{exprs:?}");
    for expr in &exprs {
        let path = format!(
            "/api/v1/query?query={}",
            utf8_percent_encode(expr, NON_ALPHANUMERIC)
        );
        let v = prom.get(&path).await;
        assert_eq!(v["status"], "success", "dashboard query {expr}: {v}");
    }
}

/// `prometheus` on PATH; `None` (with a message) if missing outside CI, a failure under CI.
fn prometheus_binary() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("prometheus"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
        assert!(
            !ci,
            "CI is set but `prometheus` is not on PATH: install Debian's package (.ci/run does: \
             apt-get install --no-install-recommends prometheus)"
        );
        eprintln!(
            "SKIPPED monitoring::a_real_prometheus_raises_the_circuit_alert_when_upstream_goes_away: \
             `prometheus` is not installed (apt-get install --no-install-recommends prometheus); \
             with CI set this is a failure"
        );
    }
    found
}

/// Starts a permgate command logging JSON and waits for its line with `message`; returns the
/// process (killed when dropped) and that line's fields.
async fn spawn_logged(command: &mut Command, message: &str) -> (Process, BTreeMap<String, String>) {
    command
        .env("PERMGATE_LOG_FORMAT", "json")
        .env_remove("PERMGATE_LISTEN")
        .env_remove("PERMGATE_UPSTREAM_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = Process(command.spawn().unwrap());
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let message = message.to_string();
    std::thread::spawn(move || {
        // Keep draining stderr for the process's life so it never blocks on a full pipe.
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            let fields = &v["fields"];
            if fields["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(&message))
            {
                let fields = fields
                    .as_object()
                    .unwrap()
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect::<BTreeMap<_, _>>();
                let _ = tx.send(fields);
            }
        }
    });
    let fields = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
        .await
        .unwrap()
        .expect("the process logged that it is serving");
    (child, fields)
}

struct Prom {
    client: TestClient,
    addr: SocketAddr,
    log: PathBuf,
}

impl Prom {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                let r = self
                    .client
                    .send(Method::GET, "/-/ready", None, &[], None)
                    .await;
                if r.status == 200 {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "prometheus not ready after 30 s; its log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn get(&self, path: &str) -> Value {
        let r = self.client.send(Method::GET, path, None, &[], None).await;
        assert_eq!(r.status, 200, "GET {path}: {:?}", r.body);
        r.json()
    }

    /// Polls `cond` (every 200 ms, at most 30 s: a handful of 1 s scrapes and evaluations).
    async fn until<'a, F, Fut>(&'a self, what: &str, mut cond: F)
    where
        F: FnMut(&'a Prom) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !cond(self).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for: {what}; prometheus log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn circuit_rule(&self) -> Value {
        let v = self.get("/api/v1/rules?type=alert").await;
        v["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().iter())
            .find(|r| r["name"] == CIRCUIT_ALERT)
            .cloned()
            .unwrap_or_else(|| panic!("{CIRCUIT_ALERT} not loaded: {v}"))
    }

    async fn circuit_alert(&self) -> Option<Value> {
        let v = self.get("/api/v1/alerts").await;
        v["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| {
                a["labels"]["alertname"] == CIRCUIT_ALERT
                    && matches!(a["state"].as_str(), Some("pending" | "firing"))
            })
            .cloned()
    }
}
