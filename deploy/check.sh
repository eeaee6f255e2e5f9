#!/usr/bin/env bash
# Static checks of everything under deploy/. Run from the repository root:
#
#   bash deploy/check.sh
#
# Needs no cluster, no Docker and no running systemd, and (after installing its
# tools) no network: Kubernetes objects are validated with the PyPI package
# kubernetes-validate, which bundles the Kubernetes OpenAPI JSON schemas.
# On a fresh Debian machine as root it installs what is missing: python3-venv,
# systemd (for systemd-analyze), procps (/bin/kill) and prometheus (for promtool;
# its service is never started) with apt-get, kubernetes-validate with pip into a
# throw-away virtualenv. Prints one line per check (PASS/FAIL/SKIP) and
# exits non-zero if any check failed.
#
# Monitoring (deploy/prometheus/, deploy/grafana/): `promtool check rules` and
# `promtool test rules deploy/prometheus/tests/*.yaml`, the generated
# PrometheusRule is up to date (deploy/prometheus/generate.sh --check), and
# deploy/prometheus/check.py's checks of the rules, the PrometheusRule, the
# PodMonitor and the Grafana dashboard. Without promtool these are SKIPs, or
# FAILs when CI is set.
#
# Environment:
#   K8S_VERSIONS                 Kubernetes versions to validate against
#                                (default "1.30.0 1.37.0": 1.30 is the oldest
#                                that has the preStop sleep action)
#   KUBERNETES_VALIDATE_VERSION  pinned kubernetes-validate (default 1.37.0)
#   PERMGATE_CHECK_NO_APT=1      never call apt-get
set -euo pipefail

K8S_VERSIONS="${K8S_VERSIONS:-1.30.0 1.37.0}"
KUBERNETES_VALIDATE_VERSION="${KUBERNETES_VALIDATE_VERSION:-1.37.0}"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/permgate-deploy-check.XXXXXX")"
trap 'rm -rf "$work"' EXIT

passed=0
failed=0
skipped=0
pass() { passed=$((passed + 1)); echo "PASS $*"; }
fail() { failed=$((failed + 1)); echo "FAIL $*"; }
skip() { skipped=$((skipped + 1)); echo "SKIP $*"; }
info() { echo "INFO $*"; }

started=$SECONDS

# ---------------------------------------------------------------- tools

apt_updated=0
apt_install() {
    [[ "${PERMGATE_CHECK_NO_APT:-}" == 1 ]] && return 1
    command -v apt-get >/dev/null 2>&1 || return 1
    [[ "$(id -u)" == 0 ]] || return 1
    if [[ $apt_updated == 0 ]]; then
        apt-get update -qq >"$work/apt.log" 2>&1 || { cat "$work/apt.log" >&2; return 1; }
        apt_updated=1
    fi
    info "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
        >>"$work/apt.log" 2>&1 || { tail -n 20 "$work/apt.log" >&2; return 1; }
}

if ! command -v python3 >/dev/null 2>&1; then
    apt_install python3 python3-venv || true
fi
if ! command -v python3 >/dev/null 2>&1; then
    fail "tools: python3 not found and could not be installed"
    echo "deploy: $passed passed, $failed failed, $skipped skipped"
    exit 1
fi
if ! python3 -m venv "$work/venv" >/dev/null 2>&1; then
    rm -rf "$work/venv"
    # Debian ships venv/ensurepip separately (python3-venv, python3.X-venv).
    pyver="$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    apt_install python3-venv "python${pyver}-venv" || apt_install python3-venv || true
    python3 -m venv "$work/venv" >/dev/null 2>&1 || true
fi
if [[ ! -x "$work/venv/bin/python" ]]; then
    fail "tools: cannot create a Python virtualenv (install python3-venv)"
    echo "deploy: $passed passed, $failed failed, $skipped skipped"
    exit 1
fi
if "$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}" \
        "tomli>=1.1; python_version < '3.11'" >"$work/pip.log" 2>&1; then
    pass "tools: kubernetes-validate ${KUBERNETES_VALIDATE_VERSION} installed in a virtualenv ($(python3 --version 2>&1))"
else
    cat "$work/pip.log" >&2
    fail "tools: pip install kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}"
fi

# Debian's prometheus package starts a prometheus service when installed: a
# temporary policy-rc.d (when there is none) denies that, and under a running
# systemd the unit is stopped and disabled as well. Only promtool is used here.
install_prometheus() {
    local policy=/usr/sbin/policy-rc.d ours=0 rc=0
    if [[ "$(id -u)" == 0 && ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 0755 "$policy" && ours=1
    fi
    apt_install prometheus || rc=$?
    if [[ $ours == 1 ]]; then rm -f "$policy"; fi
    if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
        systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    fi
    return $rc
}
if ! command -v promtool >/dev/null 2>&1; then
    install_prometheus || true
fi

if ! command -v systemd-analyze >/dev/null 2>&1; then
    apt_install systemd || true
fi
# The unit's ExecReload=/bin/kill (procps) must exist for systemd-analyze verify.
if command -v systemd-analyze >/dev/null 2>&1 && [[ ! -x /bin/kill ]]; then
    apt_install procps || true
fi

# ------------------------------------------- YAML, Kubernetes, Docker (Python)

if [[ -x "$work/venv/bin/kubernetes-validate" ]]; then
    read -r -a k8s_versions <<<"$K8S_VERSIONS"
    set +e
    "$work/venv/bin/python" "$here/check.py" "$root" "${k8s_versions[@]}" >"$work/py.out" 2>&1
    py_rc=$?
    set -e
    result_line=""
    while IFS= read -r line; do
        if [[ "$line" == RESULT\ * ]]; then
            result_line="$line"
        else
            echo "$line"
        fi
    done <"$work/py.out"
    if [[ -n "$result_line" ]]; then
        read -r _ p f s <<<"$result_line"
        passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))
    fi
    if [[ $py_rc != 0 && ( -z "$result_line" || "${f:-0}" == 0 ) ]]; then
        fail "deploy/check.py exited $py_rc"
    fi
else
    skip "yaml, kubernetes, dockerfile checks: kubernetes-validate is not installed"
fi

# ------------------------------- Prometheus rules, alerts tests, Grafana dashboard

promtool_bin="$(command -v promtool || true)"
no_promtool() { # no_promtool CHECK: a SKIP, or a FAIL under CI
    if [[ -n "${CI:-}" && "${CI}" != 0 && "${CI}" != false ]]; then
        fail "$1: promtool not found (apt-get install prometheus) and CI is set"
    else
        skip "$1: promtool not found (apt-get install --no-install-recommends prometheus)"
    fi
}
if [[ -n "$promtool_bin" ]]; then
    if promtool check rules "$here/prometheus/permgate.rules.yaml" >"$work/promtool.out" 2>&1; then
        pass "prometheus: promtool check rules deploy/prometheus/permgate.rules.yaml ($(grep -o '[0-9]* rules found' "$work/promtool.out"); $(promtool --version 2>&1 | head -n 1 | cut -d' ' -f1-3))"
    else
        fail "prometheus: promtool check rules: $(tr '\n' ' ' <"$work/promtool.out" | tail -c 600)"
    fi
    shopt -s nullglob
    rule_tests=("$here"/prometheus/tests/*.yaml)
    shopt -u nullglob
    if ((${#rule_tests[@]} == 0)); then
        fail "prometheus: no unit tests in deploy/prometheus/tests/"
    elif promtool test rules "${rule_tests[@]}" >"$work/promtool-test.out" 2>&1; then
        pass "prometheus: promtool test rules (${#rule_tests[@]} file(s): every alert fires and stays silent as expected)"
    else
        cat "$work/promtool-test.out"
        fail "prometheus: promtool test rules deploy/prometheus/tests/*.yaml (output above)"
    fi
else
    no_promtool "prometheus: promtool check rules"
    no_promtool "prometheus: promtool test rules"
fi
if [[ -n "$promtool_bin" ]]; then
    # The example's files do not exist here: the rules file from the repository, and a dummy
    # token file (promtool checks that a credentials_file exists).
    printf 'placeholder-admin-token\n' >"$work/admin-token"
    sed -e "s#/etc/prometheus/rules/permgate.rules.yaml#$here/prometheus/permgate.rules.yaml#" \
        -e "s#/etc/prometheus/secrets/permgate-admin-token#$work/admin-token#" \
        "$here/prometheus/prometheus.yml" >"$work/prometheus.yml"
    if grep -q 'credentials_file: '"$work/admin-token"'$' "$work/prometheus.yml" \
            && promtool check config "$work/prometheus.yml" >"$work/promtool-config.out" 2>&1; then
        pass "prometheus: promtool check config deploy/prometheus/prometheus.yml (scrape job with the admin token's credentials_file)"
    else
        fail "prometheus: promtool check config deploy/prometheus/prometheus.yml: $(tr '\n' ' ' <"$work/promtool-config.out" 2>/dev/null | tail -c 600)"
    fi
else
    no_promtool "prometheus: promtool check config deploy/prometheus/prometheus.yml"
fi
if bash "$here/prometheus/generate.sh" --check >"$work/generate.out" 2>&1; then
    pass "prometheus: kubernetes/optional/prometheusrule.yaml is generated from prometheus/permgate.rules.yaml"
else
    cat "$work/generate.out"
    fail "prometheus: kubernetes/optional/prometheusrule.yaml is out of date: bash deploy/prometheus/generate.sh"
fi
if [[ -x "$work/venv/bin/python" ]]; then
    set +e
    "$work/venv/bin/python" "$here/prometheus/check.py" "$root" "$promtool_bin" >"$work/mon.out" 2>&1
    mon_rc=$?
    set -e
    mon_result=""
    while IFS= read -r line; do
        if [[ "$line" == RESULT\ * ]]; then mon_result="$line"; else echo "$line"; fi
    done <"$work/mon.out"
    if [[ -n "$mon_result" ]]; then
        read -r _ p f s <<<"$mon_result"
        passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))
    fi
    if [[ $mon_rc != 0 && ( -z "$mon_result" || "${f:-0}" == 0 ) ]]; then
        fail "deploy/prometheus/check.py exited $mon_rc"
    fi
    if [[ -z "$promtool_bin" ]]; then
        no_promtool "grafana: dashboard queries are valid PromQL"
    fi
else
    skip "monitoring: rules, PrometheusRule, PodMonitor and dashboard checks need the virtualenv"
fi

# ------------------------------------- permgate check-config (if built)

# Runs an already-built binary only (never cargo): $PERMGATE_BIN, else the
# newest of target/release/permgate and target/debug/permgate.
bin="${PERMGATE_BIN:-}"
if [[ -z "$bin" ]]; then
    for b in "$root/target/release/permgate" "$root/target/debug/permgate"; do
        if [[ -x "$b" && ( -z "$bin" || "$b" -nt "$bin" ) ]]; then bin="$b"; fi
    done
fi
if [[ -z "$bin" || ! -x "$bin" ]]; then
    skip "check-config: no built permgate binary (set PERMGATE_BIN, or cargo build first)"
elif [[ ! -x "$work/venv/bin/python" ]]; then
    skip "check-config: no Python to extract the ConfigMap"
else
    # The key files named in the configs do not exist here: point
    # admin_key_file at a dummy key, keep everything else as written.
    # Random, as a real key is: permgate refuses config text holding a piece of the key's
    # secret. It starts with `key`, as one real key in 62 starts with `k`: the configs' own
    # `openai-admin-key` paths must not count as pieces of it.
    printf 'sk-admin-key%s\n' "$(head -c 48 /dev/urandom | base64 -w0 | tr -dc 'A-Za-z0-9' | head -c 37)" >"$work/dummy-admin-key"
    "$work/venv/bin/python" - "$here/kubernetes/configmap.yaml" "$work/configmap.toml" <<'PY' || true
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
open(sys.argv[2], "w").write(doc["data"]["permgate.toml"])
PY
    # The ConfigMap again with its workload identity block uncommented, its /etc/permgate
    # files replaced by stand-ins (a throw-away self-signed pair, and its public key as the JWKS).
    "$work/venv/bin/python" "$here/check.py" --workload-identity-toml \
        "$here/kubernetes/configmap.yaml" "$work/workload-identity.toml" || true
    etc="$work/etc-permgate"
    mkdir -p "$etc/tls"
    if ! openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
            -subj /CN=permgate -addext subjectAltName=DNS:permgate \
            -keyout "$etc/tls/tls.key" -out "$etc/tls/tls.crt" >/dev/null 2>&1; then
        : >"$etc/tls/tls.key"; : >"$etc/tls/tls.crt"
    fi
    for f in tls/ca.crt kube-root-ca.crt redis-ca.pem; do cp "$etc/tls/tls.crt" "$etc/$f"; done
    # A key set with one usable key: the stand-in pair's P-256 public key as an ES256 JWK.
    openssl ec -in "$etc/tls/tls.key" -pubout -outform DER 2>/dev/null | "$work/venv/bin/python" -c '
import base64, json, sys
point = sys.stdin.buffer.read()[-64:]
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
key = {"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "deploy-check",
       "x": b64(point[:32]), "y": b64(point[32:])}
print(json.dumps({"keys": [key]}))' >"$etc/jwks.json" || printf '{"keys": []}\n' >"$etc/jwks.json"
    if [[ -f "$work/workload-identity.toml" ]]; then
        sed -i "s#/etc/permgate/#$etc/#g" "$work/workload-identity.toml"
    fi
    for cfg in "kubernetes/configmap.yaml:$work/configmap.toml" "docker/permgate.toml:$here/docker/permgate.toml" \
               "kubernetes/configmap.yaml (workload identity block on):$work/workload-identity.toml"; do
        label="${cfg%%:*}"
        src="${cfg#*:}"
        [[ -f "$src" ]] || { fail "check-config: $label: could not extract the config"; continue; }
        sed "s#^admin_key_file = .*#admin_key_file = \"$work/dummy-admin-key\"#" "$src" >"$work/check-config.toml"
        if env -u PERMGATE_LISTEN -u PERMGATE_UPSTREAM_URL timeout 30 \
                "$bin" check-config --config "$work/check-config.toml" >"$work/check-config.out" 2>&1; then
            pass "check-config: $label accepted by ${bin#"$root"/}"
        elif [[ "$label" == *"workload identity"* ]] \
                && grep -qE 'unknown field `(tls|jwt|jwt_subject|tls_identity)`' "$work/check-config.out"; then
            # [server.tls], [jwt] and jwt_subject arrive with other branches; once this binary
            # knows them the block is checked like the rest.
            skip "check-config: $label: ${bin#"$root"/} does not know [server.tls]/[jwt]/jwt_subject yet: $(grep -oE 'unknown field `[a-z_]+`' "$work/check-config.out" | head -n 1)"
        else
            fail "check-config: $label rejected by ${bin#"$root"/}: $(tr '\n' ' ' <"$work/check-config.out" | tail -c 400)"
        fi
    done
fi

# ------------------------------------------------------------------ systemd

unit="$here/systemd/permgate.service"
if [[ ! -f "$unit" ]]; then
    fail "systemd-unit: $unit missing"
else
    # Directives the unit must carry, exactly (one per line in the file).
    # shellcheck disable=SC2016  # $MAINPID is for systemd, not for bash
    required=(
        'Type=exec'
        'ExecStart=/usr/local/bin/permgate serve --config /etc/permgate/permgate.toml'
        'ExecReload=/bin/kill -HUP $MAINPID'
        'EnvironmentFile=-/etc/permgate/permgate.env'
        'LoadCredential=openai-admin-key:/etc/permgate/openai-admin-key'
        'DynamicUser=yes'
        'LogsDirectory=permgate'
        'Restart=on-failure'
        'ProtectSystem=strict'
        'ProtectHome=yes'
        'NoNewPrivileges=yes'
        'PrivateTmp=yes'
        'PrivateDevices=yes'
        'ProtectKernelTunables=yes'
        'ProtectKernelModules=yes'
        'ProtectKernelLogs=yes'
        'ProtectControlGroups=yes'
        'RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX'
        'RestrictNamespaces=yes'
        'LockPersonality=yes'
        'MemoryDenyWriteExecute=yes'
        'SystemCallFilter=@system-service'
        'SystemCallFilter=~@privileged @resources'
        'SystemCallArchitectures=native'
        'CapabilityBoundingSet='
        'WantedBy=multi-user.target'
    )
    missing=()
    for d in "${required[@]}"; do
        grep -qxF -- "$d" "$unit" || missing+=("$d")
    done
    if ((${#missing[@]} == 0)); then
        pass "systemd-unit: all ${#required[@]} required directives present"
    else
        fail "systemd-unit: missing $(printf '[%s] ' "${missing[@]}")"
    fi
    if grep -qF 'admin_key_file = "/run/credentials/permgate.service/openai-admin-key"' "$unit"; then
        pass "systemd-unit: documents admin_key_file = /run/credentials/permgate.service/openai-admin-key"
    else
        fail "systemd-unit: comment telling the config to use the credential path is missing"
    fi
    if grep -qF 'admin_token_sha256' "$unit" && grep -qF 'admin_token_sha256' "$here/systemd/permgate.env"; then
        pass "systemd-unit: unit and permgate.env say where the admin token's hash goes (admin_token_sha256)"
    else
        fail "systemd-unit: unit or permgate.env does not mention server.admin_token_sha256"
    fi
    stop="$(sed -n 's/^TimeoutStopSec=\([0-9]\+\)s\?$/\1/p' "$unit")"
    if [[ -n "$stop" && "$stop" -gt 10 ]]; then
        pass "systemd-unit: TimeoutStopSec=${stop}s > default drain_timeout_ms (10 s)"
    else
        fail "systemd-unit: TimeoutStopSec missing or not above 10 s (drain timeout)"
    fi
    if grep -q '^EnvironmentFile=-' "$unit" && [[ -f "$here/systemd/permgate.env" ]]; then
        pass "systemd-unit: optional EnvironmentFile with sample deploy/systemd/permgate.env"
    else
        fail "systemd-unit: EnvironmentFile=- or deploy/systemd/permgate.env missing"
    fi

    if command -v systemd-analyze >/dev/null 2>&1; then
        # verify insists that ExecStart's binary exists: check a copy whose
        # ExecStart points at a stub (same unit name, so LogsDirectory/credential
        # paths are unchanged).
        mkdir -p "$work/unit"
        printf '#!/bin/sh\nexit 0\n' >"$work/unit/permgate"
        chmod 0755 "$work/unit/permgate"
        sed "s#^ExecStart=/usr/local/bin/permgate #ExecStart=$work/unit/permgate #" \
            "$unit" >"$work/unit/permgate.service"
        set +e
        (cd "$work/unit" && systemd-analyze verify --man=no ./permgate.service) >"$work/verify.out" 2>&1
        verify_rc=$?
        set -e
        # verify exits 0 on unknown keys or bad values ("..., ignoring"): any
        # message about our unit is a failure; others are other units' noise.
        ours="$(grep -F 'permgate' "$work/verify.out" || true)"
        if [[ $verify_rc == 0 && -z "$ours" ]]; then
            pass "systemd-unit: systemd-analyze verify ($(systemd-analyze --version | head -n 1))"
        else
            fail "systemd-unit: systemd-analyze verify (rc=$verify_rc): $(tr '\n' ' ' <"$work/verify.out")"
        fi
        if systemd-analyze security --help 2>/dev/null | grep -q -- '--offline'; then
            set +e
            # --threshold is in tenths: 20 fails an exposure above 2.0.
            (cd "$work/unit" && systemd-analyze security --offline=true --threshold=20 \
                --no-pager ./permgate.service) >"$work/security.out" 2>&1
            sec_rc=$?
            set -e
            score="$(sed -n 's/.*Overall exposure level for permgate.service: \([0-9.]*\).*/\1/p' "$work/security.out")"
            if [[ $sec_rc == 0 && -n "$score" ]]; then
                pass "systemd-unit: systemd-analyze security exposure $score (threshold 2.0)"
            else
                fail "systemd-unit: systemd-analyze security exposure ${score:-?} (rc=$sec_rc, threshold 2.0)"
            fi
        else
            skip "systemd-unit: systemd-analyze security --offline needs systemd >= 250"
        fi
    else
        skip "systemd-unit: systemd-analyze not available (directive checks above still ran)"
    fi
fi

info "finished in $((SECONDS - started)) s"
echo "deploy: $passed passed, $failed failed, $skipped skipped"
[[ $failed == 0 ]]
