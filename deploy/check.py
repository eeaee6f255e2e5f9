"""Static checks of deploy/: run by deploy/check.sh inside its virtualenv.

Needs PyYAML and kubernetes-validate (which bundles the Kubernetes OpenAPI
JSON schemas, so validation works offline), plus tomllib (Python >= 3.11) or
tomli. Prints one line per check: PASS / FAIL / SKIP, and exits non-zero if
any check failed.

usage: python deploy/check.py REPO_ROOT K8S_VERSION [K8S_VERSION...]
       python deploy/check.py --workload-identity-toml CONFIGMAP_YAML OUT_TOML
         (writes the ConfigMap's permgate.toml with its workload identity block
         uncommented, for check.sh's `permgate check-config`)
"""

import json
import os
import re
import sys

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

import kubernetes_validate
from kubernetes_validate import (
    InvalidSchemaError,
    SchemaNotFoundError,
    ValidationError,
)

NAME_LABEL = "app.kubernetes.io/name"
APP = "permgate"
DATA_PORT = 8080
ADMIN_PORT = 9090

RESULTS = {"PASS": 0, "FAIL": 0, "SKIP": 0}


def report(status, name, detail=""):
    RESULTS[status] += 1
    line = f"{status} {name}"
    if detail:
        line += f": {detail}"
    print(line, flush=True)


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
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml_docs(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.load_all(f, Loader=UniqueKeyLoader) if d is not None]


def rel(root, path):
    return os.path.relpath(path, root)


def dig(obj, *keys, default=None):
    for k in keys:
        if isinstance(obj, dict) and k in obj:
            obj = obj[k]
        elif isinstance(obj, list) and isinstance(k, int) and -len(obj) <= k < len(obj):
            obj = obj[k]
        else:
            return default
    return obj


def port_of(addr):
    m = re.fullmatch(r".*:(\d+)", addr or "")
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------
# YAML


def check_yaml(root):
    docs_by_file = {}
    files = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, "deploy")):
        dirnames.sort()
        for fn in sorted(filenames):
            if fn.endswith((".yaml", ".yml")):
                files.append(os.path.join(dirpath, fn))
    check("yaml: found YAML files under deploy/", bool(files), "none found")
    for path in files:
        try:
            docs = load_yaml_docs(path)
        except yaml.YAMLError as e:
            report("FAIL", f"yaml-parse {rel(root, path)}", str(e).replace("\n", " "))
            continue
        ok = bool(docs) and all(isinstance(d, dict) for d in docs)
        if check(f"yaml-parse {rel(root, path)}", ok, "empty or not a mapping",
                 f"{len(docs)} document(s)"):
            docs_by_file[path] = docs
    return docs_by_file


# --------------------------------------------------------------------------
# Kubernetes schemas (kubernetes-validate, offline)


def check_schemas(root, docs_by_file, versions):
    k8s_dir = os.path.join(root, "deploy", "kubernetes")
    objects = []  # (path, doc)
    for path, docs in docs_by_file.items():
        if not path.startswith(k8s_dir + os.sep):
            continue
        for doc in docs:
            if doc.get("kind") == "Kustomization":
                continue
            if str(doc.get("apiVersion", "")).startswith("monitoring.coreos.com/"):
                # Prometheus Operator custom resources (optional/): kubernetes-validate has no
                # schema for them; deploy/prometheus/check.py checks them.
                print(f"INFO k8s-schema: {rel(root, path)} {doc.get('kind')} is a custom "
                      "resource, checked by deploy/prometheus/check.py", flush=True)
                continue
            if str(doc.get("apiVersion", "")).startswith("cert-manager.io/"):
                print(f"INFO k8s-schema: {rel(root, path)} {doc.get('kind')} is a custom "
                      "resource, checked below (workload identity)", flush=True)
                continue
            objects.append((path, doc))
    check("k8s: found Kubernetes objects", bool(objects), "none found",
          f"{len(objects)} object(s)")
    bundled = kubernetes_validate.utils.all_versions()
    for version in versions:
        if not any(v.startswith(version.rsplit(".", 1)[0] + ".") or v == version for v in bundled):
            report("FAIL", f"k8s-schema v{version}",
                   f"kubernetes-validate {kubernetes_validate.__version__} ships only {', '.join(bundled)}")
            continue
        for path, doc in objects:
            what = f"{doc.get('kind')}/{dig(doc, 'metadata', 'name')}"
            name = f"k8s-schema v{version} strict {rel(root, path)} {what}"
            try:
                got = kubernetes_validate.validate(doc, version, strict=True)
                report("PASS", name, f"validated against {got}")
            except ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                report("FAIL", name, f"{where}: {e.message}")
            except SchemaNotFoundError as e:
                report("FAIL", name, e.message)
            except InvalidSchemaError as e:
                report("FAIL", name, e.message)
    return objects


# --------------------------------------------------------------------------
# Cross-object consistency: what the manifests promise each other and SPEC.md


def check_consistency(root, objects):
    k8s_dir = os.path.join(root, "deploy", "kubernetes")
    by_kind = {}
    for path, doc in objects:
        if os.path.dirname(path) == k8s_dir:  # optional/ is not part of the base
            by_kind.setdefault(doc["kind"], []).append(doc)

    # labels (examples/ holds other services' objects)
    examples = os.path.join(k8s_dir, "examples") + os.sep
    unlabeled = [f"{d['kind']}/{d['metadata']['name']}" for p, d in objects
                 if not p.startswith(examples) and dig(d, "metadata", "labels", NAME_LABEL) != APP]
    check(f"k8s: every object labelled {NAME_LABEL}={APP}", not unlabeled,
          ", ".join(unlabeled))

    # kustomization
    kpath = os.path.join(k8s_dir, "kustomization.yaml")
    try:
        kust = load_yaml_docs(kpath)[0]
    except (OSError, IndexError, yaml.YAMLError) as e:
        report("FAIL", "kustomization: readable", str(e))
        kust = {}
    resources = kust.get("resources") or []
    missing = [r for r in resources if not os.path.isfile(os.path.join(k8s_dir, r))]
    check("kustomization: every listed resource exists", not missing, ", ".join(missing))
    top = sorted(f for f in os.listdir(k8s_dir)
                 if f.endswith((".yaml", ".yml")) and f != "kustomization.yaml")
    unlisted = [f for f in top if f not in resources and f != "secret.yaml"]
    check("kustomization: every manifest listed (except the placeholder secret.yaml)",
          not unlisted, "unlisted: " + ", ".join(unlisted))
    check("kustomization: placeholder secret.yaml is not applied", "secret.yaml" not in resources,
          "secret.yaml would overwrite the real admin key on every apply")
    for kind in ("ConfigMap", "Deployment", "Service", "PodDisruptionBudget",
                 "HorizontalPodAutoscaler", "NetworkPolicy", "Secret"):
        check(f"k8s: exactly one {kind} in the base", len(by_kind.get(kind, [])) == 1,
              f"found {len(by_kind.get(kind, []))}")

    dep = (by_kind.get("Deployment") or [{}])[0]
    cm = (by_kind.get("ConfigMap") or [{}])[0]
    secret = (by_kind.get("Secret") or [{}])[0]
    svc = (by_kind.get("Service") or [{}])[0]
    pdb = (by_kind.get("PodDisruptionBudget") or [{}])[0]
    hpa = (by_kind.get("HorizontalPodAutoscaler") or [{}])[0]
    netpol = (by_kind.get("NetworkPolicy") or [{}])[0]

    pod = dig(dep, "spec", "template", "spec", default={})
    containers = pod.get("containers") or [{}]
    c = containers[0]
    pod_labels = dig(dep, "spec", "template", "metadata", "labels", default={})
    named_ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}

    # Deployment
    check("deployment: replicas >= 2", (dep.get("spec", {}).get("replicas") or 0) >= 2)
    sel = dig(dep, "spec", "selector", "matchLabels", default={})
    check("deployment: selector matches pod labels",
          sel.get(NAME_LABEL) == APP and all(pod_labels.get(k) == v for k, v in sel.items()))
    check("deployment: container ports 8080 (http) and 9090 (admin)",
          named_ports.get("http") == DATA_PORT and named_ports.get("admin") == ADMIN_PORT,
          str(named_ports))

    def probe_ok(probe, path):
        g = dig(c, probe, "httpGet", default={})
        port = g.get("port")
        port = named_ports.get(port, port)
        return g.get("path") == path and port == ADMIN_PORT

    check("deployment: readinessProbe GET /readyz on admin port 9090", probe_ok("readinessProbe", "/readyz"))
    check("deployment: livenessProbe GET /healthz on admin port 9090", probe_ok("livenessProbe", "/healthz"))
    res = c.get("resources") or {}
    check("deployment: cpu+memory requests and limits",
          all(dig(res, a, b) for a in ("requests", "limits") for b in ("cpu", "memory")))
    psc = pod.get("securityContext") or {}
    csc = c.get("securityContext") or {}
    check("deployment: runAsNonRoot with a numeric non-zero user",
          (psc.get("runAsNonRoot") or csc.get("runAsNonRoot")) is True
          and (csc.get("runAsUser") or psc.get("runAsUser") or 0) > 0)
    check("deployment: readOnlyRootFilesystem", csc.get("readOnlyRootFilesystem") is True)
    check("deployment: allowPrivilegeEscalation false", csc.get("allowPrivilegeEscalation") is False)
    check("deployment: capabilities drop ALL", dig(csc, "capabilities", "drop", default=[]) == ["ALL"])
    check("deployment: seccompProfile RuntimeDefault",
          (dig(csc, "seccompProfile", "type") or dig(psc, "seccompProfile", "type")) == "RuntimeDefault")
    check("deployment: no service account token, no service-link env vars",
          pod.get("automountServiceAccountToken") is False and pod.get("enableServiceLinks") is False)

    mounts = {m.get("mountPath"): m for m in c.get("volumeMounts") or []}
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}

    def volume_at(path):
        m = mounts.get(path)
        return volumes.get(m.get("name")) if m else None

    cfg_vol = volume_at("/etc/permgate") or {}
    cfg_sources = config_sources(cfg_vol)
    check("deployment: ConfigMap mounted at /etc/permgate",
          any(dig(src, "configMap", "name") == dig(cm, "metadata", "name")
              and {"key": "permgate.toml", "path": "permgate.toml"}
              in dig(src, "configMap", "items", default=[])
              and not dig(src, "configMap", "optional")
              for src in cfg_sources)
          and mounts["/etc/permgate"].get("readOnly") is True
          and "subPath" not in mounts["/etc/permgate"])
    key_vol = volume_at("/run/secrets/permgate") or {}
    key_items = {i.get("key"): i.get("path") for i in dig(key_vol, "secret", "items", default=[])}
    check("deployment: admin-key Secret mounted as /run/secrets/permgate/openai-admin-key",
          dig(key_vol, "secret", "secretName") == dig(secret, "metadata", "name")
          and key_items.get("openai-admin-key") == "openai-admin-key"
          and "subPath" not in mounts.get("/run/secrets/permgate", {}))
    check("deployment: secret file readable by the non-root group only",
          dig(key_vol, "secret", "defaultMode") == 0o440 and bool(psc.get("fsGroup")))
    check("deployment: emptyDir at /var/log/permgate for the audit file",
          "emptyDir" in (volume_at("/var/log/permgate") or {}))
    check("deployment: args are serve --config /etc/permgate/permgate.toml",
          c.get("args") == ["serve", "--config", "/etc/permgate/permgate.toml"], str(c.get("args")))
    env = {e.get("name"): e.get("value") for e in c.get("env") or []}
    check("deployment: PERMGATE_LOG_FORMAT=json", env.get("PERMGATE_LOG_FORMAT") == "json")
    check("deployment: no admin key in the environment",
          not any("KEY" in (n or "") or "valueFrom" in e for n, e in
                  ((e.get("name"), e) for e in c.get("env") or [])))

    # ConfigMap -> permgate.toml
    toml_text = dig(cm, "data", "permgate.toml")
    conf = {}
    try:
        conf = tomllib.loads(toml_text or "")
        check("configmap: permgate.toml parses as TOML", bool(conf), "empty")
    except tomllib.TOMLDecodeError as e:
        report("FAIL", "configmap: permgate.toml parses as TOML", str(e))
    check_permgate_toml("configmap", conf, toml_text or "",
                        admin_key_file="/run/secrets/permgate/openai-admin-key")
    srv = conf.get("server", {})
    check("configmap: listen/admin_listen match the container ports",
          port_of(srv.get("listen")) == named_ports.get("http")
          and port_of(srv.get("admin_listen")) == named_ports.get("admin"))
    audit_path = dig(conf, "audit", "path") or ""
    check("configmap: [audit] path is on the writable emptyDir",
          os.path.dirname(audit_path) == "/var/log/permgate", audit_path)
    drain_s = (srv.get("drain_timeout_ms") or 10000) / 1000
    sleep_s = dig(c, "lifecycle", "preStop", "sleep", "seconds") or 0
    grace = pod.get("terminationGracePeriodSeconds") or 30
    check("deployment: terminationGracePeriodSeconds > preStop sleep + drain timeout",
          grace > drain_s + sleep_s, f"{grace} <= {sleep_s} + {drain_s}",
          f"{grace}s > {sleep_s}s + {drain_s:g}s")

    # Secret placeholder
    sval = str(dig(secret, "stringData", "openai-admin-key", default=""))
    check("secret: value is an obvious placeholder", "REPLACE-ME" in sval and not sval.startswith("sk-"))

    # Service
    sports = dig(svc, "spec", "ports", default=[])
    tports = [named_ports.get(p.get("targetPort"), p.get("targetPort")) for p in sports]
    check("service: exposes the data port 8080 only",
          [p.get("port") for p in sports] == [DATA_PORT] and tports == [DATA_PORT], str(sports))
    check("service: selects the pods", dig(svc, "spec", "selector", NAME_LABEL) == APP)

    # PDB / HPA
    check("pdb: selects the pods", dig(pdb, "spec", "selector", "matchLabels", NAME_LABEL) == APP)
    check("hpa: autoscaling/v2 on the Deployment",
          hpa.get("apiVersion") == "autoscaling/v2"
          and dig(hpa, "spec", "scaleTargetRef", "kind") == "Deployment"
          and dig(hpa, "spec", "scaleTargetRef", "name") == dig(dep, "metadata", "name"))
    check("hpa: CPU utilisation metric, minReplicas >= 2",
          any(dig(m, "resource", "name") == "cpu" for m in dig(hpa, "spec", "metrics", default=[]))
          and (dig(hpa, "spec", "minReplicas") or 1) >= 2)

    # NetworkPolicy
    check("networkpolicy: selects the pods, Ingress and Egress",
          dig(netpol, "spec", "podSelector", "matchLabels", NAME_LABEL) == APP
          and sorted(dig(netpol, "spec", "policyTypes", default=[])) == ["Egress", "Ingress"])
    ing = {}
    for rule in dig(netpol, "spec", "ingress", default=[]):
        for p in rule.get("ports") or [{}]:
            ing[p.get("port")] = [dig(f, "namespaceSelector", "matchLabels") for f in rule.get("from") or []]
    check("networkpolicy: ingress only to 8080 and 9090, each from labelled namespaces",
          sorted(ing, key=str) == [DATA_PORT, ADMIN_PORT] and all(v and all(v) for v in ing.values()),
          str(ing))
    eg = set()
    for rule in dig(netpol, "spec", "egress", default=[]):
        for p in rule.get("ports") or [{"port": "ANY"}]:
            eg.add((p.get("protocol", "TCP"), p.get("port")))
    check("networkpolicy: egress only DNS (53/udp, 53/tcp) and 443/tcp",
          eg == {("UDP", 53), ("TCP", 53), ("TCP", 443)}, str(sorted(eg, key=str)))


def config_sources(volume):
    """The sources of the /etc/permgate volume: a projected volume's, or a plain ConfigMap."""
    if "projected" in volume:
        return dig(volume, "projected", "sources", default=[])
    return [{"configMap": volume["configMap"]}] if "configMap" in volume else []


def check_permgate_toml(label, conf, text, admin_key_file):
    for section, keys in (("server", ("listen", "admin_listen")),
                          ("upstream", ("base_url",)),
                          ("cache", ("ttl_seconds", "max_bytes"))):
        missing = [k for k in keys if k not in conf.get(section, {})]
        check(f"{label}: [{section}] has {', '.join(keys)}", not missing, "missing " + ", ".join(missing))
    srv = conf.get("server", {})
    check(f"{label}: listens on 0.0.0.0:8080 / admin 0.0.0.0:9090",
          srv.get("listen") == f"0.0.0.0:{DATA_PORT}" and srv.get("admin_listen") == f"0.0.0.0:{ADMIN_PORT}")
    up = conf.get("upstream", {})
    check(f"{label}: admin_key_file = {admin_key_file}", up.get("admin_key_file") == admin_key_file,
          str(up.get("admin_key_file")))
    check(f"{label}: no key material in the config",
          not (set(up) & {"admin_key", "api_key", "key"})
          and "password" not in conf.get("redis", {})
          and not re.search(r"sk-[A-Za-z0-9_-]{16,}", text))
    clients = conf.get("clients") or []
    check(f"{label}: at least one [[clients]] with a 64-hex token_sha256",
          bool(clients) and all(re.fullmatch(r"[0-9a-f]{64}", c.get("token_sha256", "")) for c in clients))


# --------------------------------------------------------------------------
# Workload identity: TLS from cert-manager, JWKS, callers' projected tokens, admin token


def workload_identity_toml(text):
    """permgate.toml with its `# >>>` ... `# <<<` block uncommented (marker lines dropped)."""
    out, inside = [], False
    for line in text.split("\n"):
        stripped = line.strip()
        if stripped.startswith("# >>>"):
            inside = True
        elif stripped.startswith("# <<<"):
            inside = False
        else:
            out.append(re.sub(r"^(\s*)# ?", r"\1", line, count=1) if inside else line)
    return "\n".join(out)


def hours(duration):
    m = re.fullmatch(r"(\d+)h", str(duration or ""))
    return int(m.group(1)) if m else None


def projected_files(pod):
    """{/etc/permgate/PATH: (kind, name, key, optional)} of the volume mounted at /etc/permgate."""
    c = (pod.get("containers") or [{}])[0]
    mount = next((m for m in c.get("volumeMounts") or [] if m.get("mountPath") == "/etc/permgate"), {})
    vol = next((v for v in pod.get("volumes") or [] if v.get("name") == mount.get("name")), {})
    files = {}
    for src in dig(vol, "projected", "sources", default=[]):
        for kind in ("configMap", "secret"):
            if kind in src:
                for item in src[kind].get("items") or []:
                    files["/etc/permgate/" + item.get("path", "")] = (
                        kind, src[kind].get("name"), item.get("key"), src[kind].get("optional") is True)
    return files


def check_workload_identity(root, docs_by_file):
    k8s_dir = os.path.join(root, "deploy", "kubernetes")
    where = {"base": k8s_dir, "optional": os.path.join(k8s_dir, "optional"),
             "examples": os.path.join(k8s_dir, "examples")}
    docs = {k: [d for p, ds in docs_by_file.items() if os.path.dirname(p) == v for d in ds]
            for k, v in where.items()}

    def one(place, kind, name=None):
        found = [d for d in docs[place] if d.get("kind") == kind
                 and (name is None or dig(d, "metadata", "name") == name)]
        return found[0] if len(found) == 1 else {}

    dep, cm, svc = one("base", "Deployment"), one("base", "ConfigMap"), one("base", "Service")
    files = projected_files(dig(dep, "spec", "template", "spec", default={}))
    check("workload-identity: /etc/permgate is one projected volume; only permgate.toml is required",
          files.get("/etc/permgate/permgate.toml", ("",) * 4)[3] is False
          and all(f[3] for p, f in files.items() if p != "/etc/permgate/permgate.toml"),
          str(files))
    text = dig(cm, "data", "permgate.toml") or ""
    named = set(re.findall(r"/etc/permgate/[A-Za-z0-9_./-]+", text))
    check("workload-identity: the files the ConfigMap names under /etc/permgate are the projected ones",
          named == set(files) - {"/etc/permgate/permgate.toml"},
          f"named only: {sorted(named - set(files))}, projected only: "
          f"{sorted(set(files) - named - {'/etc/permgate/permgate.toml'})}")
    try:
        wi = tomllib.loads(workload_identity_toml(text))
        report("PASS", "workload-identity: the ConfigMap's commented block parses as TOML once uncommented")
    except tomllib.TOMLDecodeError as e:
        report("FAIL", "workload-identity: the ConfigMap's commented block parses as TOML once uncommented", str(e))
        wi = {}
    check_tls_files(one("optional", "Certificate"), svc, files, wi)
    check_jwks(one("optional", "ConfigMap", "permgate-jwks"), files, wi)
    redis_ca = one("optional", "ConfigMap", "permgate-redis-ca")
    check("workload-identity: optional/redis-ca-configmap.yaml is what the volume projects as redis-ca.pem",
          files.get("/etc/permgate/redis-ca.pem", ())[1:3] == (dig(redis_ca, "metadata", "name"), "ca.crt")
          and "ca.crt" in (redis_ca.get("data") or {}))
    callers = [d for d in docs["examples"] if d.get("kind") == "Deployment"]
    check("workload-identity: examples/ has a caller Deployment", bool(callers))
    for caller in callers:
        check_caller(caller, wi)
    admin = one("optional", "Secret", "permgate-admin-token")
    check("admin-token: optional/admin-token-secret.yaml is a placeholder Secret with key token",
          "REPLACE-ME" in str(dig(admin, "stringData", "token", default="")))
    digest = str(dig(tomllib.loads(text) if text else {}, "server", "admin_token_sha256", default=""))
    check("admin-token: the ConfigMap sets server.admin_token_sha256 (64 hex)",
          re.fullmatch(r"[0-9a-f]{64}", digest) is not None, digest or "unset")


def check_tls_files(cert, svc, files, wi):
    spec = cert.get("spec") or {}
    check("workload-identity: optional/certificate.yaml is a cert-manager.io/v1 Certificate labelled "
          f"{NAME_LABEL}={APP}",
          cert.get("apiVersion") == "cert-manager.io/v1" and dig(cert, "metadata", "labels", NAME_LABEL) == APP)
    tls = {p: f for p, f in files.items() if f[0] == "secret" and f[1] == spec.get("secretName")}
    check("workload-identity: the Certificate's Secret is projected as tls/tls.crt, tls/tls.key, tls/ca.crt",
          {p: f[2] for p, f in tls.items()} == {"/etc/permgate/tls/tls.crt": "tls.crt",
                                                "/etc/permgate/tls/tls.key": "tls.key",
                                                "/etc/permgate/tls/ca.crt": "ca.crt"}, str(tls))
    name = dig(svc, "metadata", "name")
    check("workload-identity: the Certificate is for server auth, names the Service, rotates its key",
          "server auth" in (spec.get("usages") or []) and name in (spec.get("dnsNames") or [])
          and dig(spec, "privateKey", "rotationPolicy") == "Always" and bool(dig(spec, "issuerRef", "name")))
    duration, renew = hours(spec.get("duration")), hours(spec.get("renewBefore"))
    check("workload-identity: the Certificate renews well before it expires",
          bool(duration and renew) and renew < duration, f"{spec.get('renewBefore')} / {spec.get('duration')}")
    server_tls = dig(wi, "server", "tls", default={})
    check("workload-identity: [server.tls] cert_file and key_file are the projected pair",
          server_tls.get("cert_file") in tls and server_tls.get("key_file") in tls
          and tls[server_tls["cert_file"]][2] == "tls.crt" and tls[server_tls["key_file"]][2] == "tls.key",
          str(server_tls))


def check_jwks(jwks_cm, files, wi):
    jwt = wi.get("jwt") or {}
    src = files.get(jwt.get("jwks_file"), ())
    check("workload-identity: [jwt] jwks_file is optional/jwks-configmap.yaml's jwks.json, projected",
          src[:3] == ("configMap", dig(jwks_cm, "metadata", "name"), "jwks.json"), str(src))
    try:
        keys = json.loads(dig(jwks_cm, "data", "jwks.json", default="")).get("keys")
        ok = isinstance(keys, list)
    except (ValueError, AttributeError):
        ok = False
    check("workload-identity: the JWKS placeholder is a JSON Web Key Set", ok)
    check("workload-identity: [jwt] has issuer, audiences and leeway_seconds",
          bool(jwt.get("issuer")) and bool(jwt.get("audiences")) and "leeway_seconds" in jwt, str(jwt))


def check_caller(caller, wi):
    name = dig(caller, "metadata", "name")
    pod = dig(caller, "spec", "template", "spec", default={})
    tokens = [(v.get("name"), s["serviceAccountToken"]) for v in pod.get("volumes") or []
              for s in dig(v, "projected", "sources", default=[]) if "serviceAccountToken" in s]
    check(f"caller {name}: one projected serviceAccountToken, no automounted API token",
          len(tokens) == 1 and pod.get("automountServiceAccountToken") is False)
    if len(tokens) != 1:
        return
    volume, token = tokens[0]
    audiences = dig(wi, "jwt", "audiences", default=[])
    check(f"caller {name}: token audience is one of permgate's [jwt] audiences",
          token.get("audience") in audiences, f"{token.get('audience')} not in {audiences}")
    check(f"caller {name}: token lives at most an hour (at least the API minimum of 600 s)",
          600 <= (token.get("expirationSeconds") or 0) <= 3600, str(token.get("expirationSeconds")))
    c = (pod.get("containers") or [{}])[0]
    mount = next((m for m in c.get("volumeMounts") or [] if m.get("name") == volume), {})
    env = {e.get("name"): e.get("value") for e in c.get("env") or []}
    path = f"{mount.get('mountPath')}/{token.get('path')}"
    check(f"caller {name}: PERMGATE_TOKEN_FILE is the token's path ({path})",
          env.get("PERMGATE_TOKEN_FILE") == path and mount.get("readOnly") is True)
    subject = f"system:serviceaccount:{dig(caller, 'metadata', 'namespace')}:{pod.get('serviceAccountName')}"
    clients = [c for c in wi.get("clients") or [] if c.get("jwt_subject") == subject]
    check(f"caller {name}: a [[clients]] jwt_subject names its service account ({subject})",
          len(clients) == 1 and "token_sha256" not in clients[0])


# --------------------------------------------------------------------------
# Docker image and its config


def dockerfile_stages(text):
    # join continuation lines, drop comments
    lines, buf = [], ""
    for raw in text.splitlines():
        s = raw.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        lines.append((buf + s).strip())
        buf = ""
    stages = []
    for line in lines:
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            stages.append({"from": rest.strip(), "instrs": []})
        elif stages:
            stages[-1]["instrs"].append((instr, rest.strip()))
    return stages


def check_docker(root):
    path = os.path.join(root, "deploy", "Dockerfile")
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as e:
        report("FAIL", "dockerfile: readable", str(e))
        return
    stages = dockerfile_stages(text)
    check("dockerfile: multi-stage (2+ FROM)", len(stages) >= 2, f"{len(stages)} stage(s)")
    if not stages:
        return
    build, final = stages[0], stages[-1]
    check("dockerfile: builder FROM rust:1-bookworm", build["from"].lower().startswith("rust:1-bookworm"),
          build["from"])
    check("dockerfile: builder runs cargo build --release --locked",
          any(i == "RUN" and re.search(r"cargo build\b.*--release\b", r) and "--locked" in r
              for i, r in build["instrs"]))
    check("dockerfile: runtime is distroless (no shell)", "distroless" in final["from"], final["from"])
    check("dockerfile: no RUN in the shell-less runtime stage",
          not any(i == "RUN" for i, _ in final["instrs"]))
    users = [r for i, r in final["instrs"] if i == "USER"]
    user = users[-1].split(":")[0] if users else ""
    check("dockerfile: USER is non-root and numeric", user.isdigit() and int(user) != 0, user or "no USER")
    exposed = {tok.split("/")[0] for i, r in final["instrs"] if i == "EXPOSE" for tok in r.split()}
    check("dockerfile: EXPOSE 8080 and 9090", {"8080", "9090"} <= exposed, str(sorted(exposed)))
    copies = [r for i, r in final["instrs"] if i == "COPY"]
    cfg = [r for r in copies if r.split()[-1] == "/etc/permgate/permgate.toml"]
    check("dockerfile: config copied to /etc/permgate/permgate.toml", bool(cfg))
    srcs = [r.split()[-2] for r in cfg if "--from" not in r]
    check("dockerfile: copied config exists in the repo",
          bool(srcs) and all(os.path.isfile(os.path.join(root, s)) for s in srcs), str(srcs))
    check("dockerfile: binary at /usr/local/bin/permgate",
          any(r.split()[-1] == "/usr/local/bin/permgate" for r in copies))
    hc = [r for i, r in final["instrs"] if i == "HEALTHCHECK"]
    check("dockerfile: HEALTHCHECK absent, NONE or exec-form",
          all(r.upper() == "NONE" or re.search(r"\bCMD\s+\[", r) for r in hc), str(hc))
    ep = [r for i, r in final["instrs"] if i in ("ENTRYPOINT", "CMD")]
    check("dockerfile: ENTRYPOINT/CMD in exec form", bool(ep) and all(r.startswith("[") for r in ep))
    check("dockerfile: no ARG/ENV carrying a key",
          not re.search(r"^\s*(ARG|ENV)\s+[^\n]*(KEY|PASSWORD|TOKEN)", text, re.M | re.I))
    ign = os.path.join(root, "deploy", "Dockerfile.dockerignore")
    ign_text = open(ign).read() if os.path.isfile(ign) else ""
    check("dockerfile: Dockerfile.dockerignore excludes target/ and .git/",
          "target/" in ign_text and ".git" in ign_text)

    cpath = os.path.join(root, "deploy", "docker", "permgate.toml")
    try:
        text = open(cpath, encoding="utf-8").read()
        conf = tomllib.loads(text)
        report("PASS", "docker-config: deploy/docker/permgate.toml parses as TOML")
    except (OSError, tomllib.TOMLDecodeError) as e:
        report("FAIL", "docker-config: deploy/docker/permgate.toml parses as TOML", str(e))
        return
    check_permgate_toml("docker-config", conf, text, admin_key_file="/run/secrets/openai-admin-key")


# --------------------------------------------------------------------------
# systemd environment file, and a scan of every file for secret-looking text


def check_env_file(root):
    path = os.path.join(root, "deploy", "systemd", "permgate.env")
    env, bad = {}, []
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(.*)", s)
        if m:
            env[m.group(1)] = m.group(2)
        else:
            bad.append(n)
    check("systemd-env: permgate.env is KEY=VALUE lines", not bad, f"bad lines {bad}")
    check("systemd-env: sets PERMGATE_LOG and PERMGATE_LOG_FORMAT=json",
          "PERMGATE_LOG" in env and env.get("PERMGATE_LOG_FORMAT") == "json", str(env))
    check("systemd-env: holds no key", not any(re.search(r"KEY|PASSWORD|TOKEN", k) for k in env))


def check_no_secrets(root):
    patterns = [
        re.compile(r"sk-(?:admin-|proj-|svcacct-)?[A-Za-z0-9_-]{20,}"),
        re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
        re.compile(r"redis://[^\s:@/]*:[^\s@/]+@"),  # password in a Redis URL
    ]
    hits = []
    for dirpath, _, filenames in os.walk(os.path.join(root, "deploy")):
        for fn in filenames:
            p = os.path.join(dirpath, fn)
            try:
                text = open(p, encoding="utf-8").read()
            except (OSError, UnicodeDecodeError):
                continue
            for pat in patterns:
                if pat.search(text):
                    hits.append(f"{rel(root, p)} ~ {pat.pattern}")
    check("secrets: no real-looking key, private key or password in deploy/", not hits, "; ".join(hits))


def main():
    if sys.argv[1] == "--workload-identity-toml":
        # For check.sh: the ConfigMap's permgate.toml with the workload identity block on.
        doc = load_yaml_docs(sys.argv[2])[0]
        with open(sys.argv[3], "w", encoding="utf-8") as f:
            f.write(workload_identity_toml(doc["data"]["permgate.toml"]))
        return 0
    root = os.path.abspath(sys.argv[1])
    versions = sys.argv[2:] or [kubernetes_validate.utils.latest_version()]
    print(f"INFO kubernetes-validate {kubernetes_validate.__version__}, schemas bundled: "
          f"{', '.join(sorted(set(kubernetes_validate.utils.all_versions()), key=lambda v: [int(x) for x in v.split('.')]))}; validating against {', '.join(versions)}",
          flush=True)
    docs_by_file = check_yaml(root)
    objects = check_schemas(root, docs_by_file, versions)
    check_consistency(root, objects)
    check_workload_identity(root, docs_by_file)
    check_docker(root)
    check_env_file(root)
    check_no_secrets(root)
    print(f"RESULT {RESULTS['PASS']} {RESULTS['FAIL']} {RESULTS['SKIP']}", flush=True)
    return 1 if RESULTS["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
