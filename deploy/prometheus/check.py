"""Static checks of the monitoring files: run by deploy/check.sh inside its virtualenv.

  - deploy/prometheus/permgate.rules.yaml: the shape the Prometheus Operator's PrometheusRule
    CRD accepts (no unknown keys, `for` durations), and what every alert must carry: a `for`,
    a severity label, summary / description / runbook annotations, a unit test in
    deploy/prometheus/tests/ that expects it to fire;
  - deploy/kubernetes/optional/prometheusrule.yaml: the same groups as the rules file;
  - deploy/kubernetes/optional/podmonitor.yaml: scrapes the Deployment's admin port, sending
    the admin token from the Secret of optional/admin-token-secret.yaml;
  - deploy/grafana/permgate.json: a loadable dashboard (unique panel ids, every target with
    an expression and a refId, every variable it uses defined), whose queries are valid
    PromQL (`promtool check rules` on them, with Grafana's variables replaced).

Prints PASS / FAIL / SKIP lines and a final `RESULT passed failed skipped` line.

usage: python deploy/prometheus/check.py REPO_ROOT [PROMTOOL]
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import yaml

RESULTS = {"PASS": 0, "FAIL": 0, "SKIP": 0}

DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")
GROUP_KEYS = {"name", "interval", "limit", "partial_response_strategy", "query_offset", "labels", "rules"}
RULE_KEYS = {"record", "alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
SEVERITIES = {"critical", "warning", "info"}
ANNOTATIONS = {"summary", "description", "runbook"}
# Grafana variables the dashboard may use, and what they become for promtool.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}


def report(status, name, detail=""):
    RESULTS[status] += 1
    print(f"{status} {name}" + (f": {detail}" if detail else ""), flush=True)


def check(name, ok, detail_if_fail="", detail_if_ok=""):
    report("PASS" if ok else "FAIL", name, detail_if_ok if ok else detail_if_fail)
    return ok


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path):
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=UniqueKeyLoader)


def check_rules(rules_path, tests_dir):
    try:
        doc = load_yaml(rules_path)
    except (OSError, yaml.YAMLError) as e:
        report("FAIL", "rules: permgate.rules.yaml parses", str(e).replace("\n", " "))
        return None
    groups = doc.get("groups") if isinstance(doc, dict) else None
    if not check("rules: top level is {groups: [...]}", isinstance(groups, list) and set(doc) == {"groups"},
                 str(list(doc) if isinstance(doc, dict) else type(doc))):
        return None
    problems, alerts, records = [], [], []
    for g in groups:
        extra = set(g) - GROUP_KEYS
        if extra:
            problems.append(f"group {g.get('name')}: unknown keys {sorted(extra)}")
        for r in g.get("rules") or []:
            what = r.get("alert") or r.get("record")
            extra = set(r) - RULE_KEYS
            if extra:
                problems.append(f"{what}: unknown keys {sorted(extra)}")
            if ("alert" in r) == ("record" in r):
                problems.append(f"{what}: exactly one of alert and record")
            if not isinstance(r.get("expr"), str) or not r["expr"].strip():
                problems.append(f"{what}: no expr")
            if "record" in r:
                records.append(r["record"])
                if set(r) & {"for", "annotations", "keep_firing_for"}:
                    problems.append(f"{what}: a recording rule with alert fields")
                continue
            alerts.append(what)
            if not DURATION.match(str(r.get("for", ""))) or r.get("for") in ("0", "0s", "0m"):
                problems.append(f"{what}: `for` missing, zero, or not a CRD duration: {r.get('for')!r}")
            if (r.get("labels") or {}).get("severity") not in SEVERITIES:
                problems.append(f"{what}: severity label not one of {sorted(SEVERITIES)}")
            missing = ANNOTATIONS - set(r.get("annotations") or {})
            if missing:
                problems.append(f"{what}: annotations missing {sorted(missing)}")
    check("rules: CRD-shaped groups and rules; every alert has for, severity, summary, description, runbook",
          not problems, "; ".join(problems), f"{len(alerts)} alerts, {len(records)} recording rules")
    dupes = sorted({n for n in alerts + records if (alerts + records).count(n) > 1})
    check("rules: alert and record names unique", not dupes, ", ".join(dupes))

    # Every alert is expected to fire by some promtool test (and the tests list exactly the
    # firing alerts, so the other series in those tests are proven silent).
    firing, silent = set(), set()
    try:
        test_files = sorted(f for f in os.listdir(tests_dir) if f.endswith((".yaml", ".yml")))
    except OSError:
        test_files = []
    for fn in test_files:
        t = load_yaml(os.path.join(tests_dir, fn)) or {}
        for test in t.get("tests") or []:
            for a in test.get("alert_rule_test") or []:
                (firing if a.get("exp_alerts") else silent).add(a.get("alertname"))
    untested = [a for a in alerts if a not in firing]
    check("rules: every alert has a promtool test expecting it to fire", bool(test_files) and not untested,
          "untested: " + ", ".join(untested) if test_files else "no tests in deploy/prometheus/tests/",
          f"{len(test_files)} test file(s)")
    return doc


def check_prometheusrule(path, rules_doc):
    try:
        doc = load_yaml(path)
    except (OSError, yaml.YAMLError) as e:
        report("FAIL", "prometheusrule: parses", str(e).replace("\n", " "))
        return
    ok = (doc.get("apiVersion") == "monitoring.coreos.com/v1" and doc.get("kind") == "PrometheusRule"
          and bool((doc.get("metadata") or {}).get("name")) and set(doc) == {"apiVersion", "kind", "metadata", "spec"})
    check("prometheusrule: monitoring.coreos.com/v1 PrometheusRule with metadata and spec", ok)
    check("prometheusrule: labelled app.kubernetes.io/name=permgate",
          ((doc.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/name") == "permgate")
    check("prometheusrule: spec is exactly deploy/prometheus/permgate.rules.yaml",
          rules_doc is not None and doc.get("spec") == rules_doc,
          "differs: run bash deploy/prometheus/generate.sh")


def check_podmonitor(path, deployment_path):
    try:
        doc = load_yaml(path)
        dep = load_yaml(deployment_path)
    except (OSError, yaml.YAMLError) as e:
        report("FAIL", "podmonitor: parses", str(e).replace("\n", " "))
        return
    spec = doc.get("spec") or {}
    pod = ((dep.get("spec") or {}).get("template") or {})
    pod_labels = (pod.get("metadata") or {}).get("labels") or {}
    ports = {p.get("name"): p.get("containerPort")
             for c in (pod.get("spec") or {}).get("containers") or [] for p in c.get("ports") or []}
    selector = (spec.get("selector") or {}).get("matchLabels") or {}
    endpoints = spec.get("podMetricsEndpoints") or []
    check("podmonitor: monitoring.coreos.com/v1 PodMonitor labelled app.kubernetes.io/name=permgate",
          doc.get("apiVersion") == "monitoring.coreos.com/v1" and doc.get("kind") == "PodMonitor"
          and ((doc.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/name") == "permgate")
    check("podmonitor: selects the Deployment's pods",
          bool(selector) and all(pod_labels.get(k) == v for k, v in selector.items()), str(selector))
    check("podmonitor: scrapes /metrics on the admin port 9090 only",
          len(endpoints) == 1 and ports.get(endpoints[0].get("port")) == 9090
          and endpoints[0].get("path", "/metrics") == "/metrics",
          f"endpoints {endpoints}, container ports {ports}")
    secret_path = os.path.join(os.path.dirname(path), "admin-token-secret.yaml")
    try:
        secret = load_yaml(secret_path)
    except (OSError, yaml.YAMLError) as e:
        report("FAIL", "podmonitor: optional/admin-token-secret.yaml parses", str(e).replace("\n", " "))
        return
    auth = (endpoints[0] if endpoints else {}).get("authorization") or {}
    creds = auth.get("credentials") or {}
    check("podmonitor: sends the admin token (Bearer) from the Secret of admin-token-secret.yaml",
          auth.get("type", "Bearer") == "Bearer"
          and creds.get("name") == (secret.get("metadata") or {}).get("name")
          and creds.get("key") in (secret.get("stringData") or {}),
          f"authorization {auth}")


def dashboard_exprs(dash):
    out = []

    def walk(v, key=None):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, k)
        elif isinstance(v, list):
            for x in v:
                walk(x, key)
        elif isinstance(v, str) and key == "expr":
            out.append(v)
    walk(dash)
    return out


def check_dashboard(path, promtool):
    try:
        with open(path, encoding="utf-8") as f:
            dash = json.load(f)
    except (OSError, ValueError) as e:
        report("FAIL", "grafana: permgate.json parses as JSON", str(e))
        return
    report("PASS", "grafana: permgate.json parses as JSON")
    check("grafana: uid, title, schemaVersion set",
          bool(dash.get("uid")) and bool(dash.get("title")) and isinstance(dash.get("schemaVersion"), int))
    panels = []
    for p in dash.get("panels") or []:
        panels.append(p)
        panels.extend(p.get("panels") or [])
    ids = [p.get("id") for p in panels]
    check("grafana: panel ids unique", len(ids) == len(set(ids)) and None not in ids)
    bad = []
    for p in panels:
        if p.get("type") == "row":
            continue
        g = p.get("gridPos") or {}
        if not all(isinstance(g.get(k), int) for k in ("x", "y", "w", "h")) or g["x"] + g["w"] > 24:
            bad.append(f"{p.get('title')}: gridPos {g}")
        if (p.get("datasource") or {}).get("uid") != "${datasource}":
            bad.append(f"{p.get('title')}: datasource is not the ${{datasource}} variable")
        targets = p.get("targets") or []
        refs = [t.get("refId") for t in targets]
        if not targets or not all(t.get("expr") for t in targets) or len(set(refs)) != len(refs):
            bad.append(f"{p.get('title')}: targets without expr or with duplicate refId")
    check("grafana: every panel placed on the 24-column grid, on the datasource variable, with expressions",
          not bad, "; ".join(bad), f"{len(panels)} panels")
    defined = {v.get("name") for v in (dash.get("templating") or {}).get("list") or []}
    used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", json.dumps(dash)))
    used = {u for u in used if not u.startswith("__")}
    check("grafana: every $variable used is defined", used <= defined, f"undefined: {sorted(used - defined)}")

    exprs = dashboard_exprs(dash)
    if not promtool:
        report("SKIP", "grafana: dashboard queries are valid PromQL", "promtool not available")
        return
    rules = {"groups": [{"name": "dashboard", "rules": []}]}
    for i, e in enumerate(exprs):
        for var, value in GRAFANA_VARS.items():
            e = e.replace(var, value)
        e = e.replace("$max_bytes", "67108864")
        e = re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", ".*", e)
        rules["groups"][0]["rules"].append({"record": f"dashboard_query_{i}", "expr": e})
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(rules, f)
    try:
        run = subprocess.run([promtool, "check", "rules", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    check("grafana: dashboard queries are valid PromQL (promtool check rules)", run.returncode == 0,
          (run.stdout + run.stderr).replace("\n", " ")[-800:], f"{len(exprs)} queries")


def main():
    root = os.path.abspath(sys.argv[1])
    promtool = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] else None
    prom = os.path.join(root, "deploy", "prometheus")
    rules_doc = check_rules(os.path.join(prom, "permgate.rules.yaml"), os.path.join(prom, "tests"))
    optional = os.path.join(root, "deploy", "kubernetes", "optional")
    check_prometheusrule(os.path.join(optional, "prometheusrule.yaml"), rules_doc)
    check_podmonitor(os.path.join(optional, "podmonitor.yaml"),
                     os.path.join(root, "deploy", "kubernetes", "deployment.yaml"))
    check_dashboard(os.path.join(root, "deploy", "grafana", "permgate.json"), promtool)
    print(f"RESULT {RESULTS['PASS']} {RESULTS['FAIL']} {RESULTS['SKIP']}", flush=True)
    return 1 if RESULTS["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
