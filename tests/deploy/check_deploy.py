#!/usr/bin/env python3
"""Consistency checks for deploy/, used by tests/deploy/validate.sh.

Each subcommand prints what it checked and exits non-zero with the reasons on failure.

  manifests RENDERED.yaml --bin PGSIDECAR [--variant native|legacy]
      Policy checks on `kubectl kustomize` output: sidecar shape, probes, shutdown
      budget vs. terminationGracePeriodSeconds, secrets, resources, PodMonitor and
      annotations, DATABASE_URL; and `pgsidecar check` of the ConfigMap's proxy.yaml
      with the environment the pod would give it.
  dashboard FILE
      Grafana dashboard structure: JSON, uid, unique panel ids, datasource variable,
      PromQL on every target, the quantiles the dashboard promises.
  metrics-used --scrape FILE --dashboard FILE --alerts FILE
      Every pgsidecar_* name queried by the dashboard and the alert rules exists in a
      live scrape (exact sample names in expressions: a histogram is queried through
      _bucket/_sum/_count; family names are accepted in prose).
  queries --prom URL --dashboard FILE --alerts FILE
      Evaluates every dashboard query on a Prometheus that scrapes a live pgsidecar
      (each must succeed and return series) and checks every alert rule's health.
  rss --pid PID --manifests RENDERED.yaml
      Peak resident memory of a pgsidecar process after traffic, against the memory
      request and limit the manifests give the sidecar.
  compose FILE
      Files and build contexts that docker-compose.yml refers to exist.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

METRIC_RE = re.compile(r"\bpgsidecar_[a-zA-Z0-9_]+")
DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
QUANTITY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


class Failures:
    def __init__(self) -> None:
        self.items: list[str] = []
        self.ok: list[str] = []

    def check(self, cond: bool, msg: str) -> bool:
        (self.ok if cond else self.items).append(msg)
        return cond

    def finish(self) -> int:
        for m in self.ok:
            print(f"  ok: {m}")
        for m in self.items:
            print(f"  FAILED: {m}")
        return 1 if self.items else 0


def seconds(d: str) -> float:
    m = DURATION_RE.match(str(d).strip())
    if not m:
        raise ValueError(f"cannot read duration {d!r}")
    n, unit = float(m.group(1)), m.group(2)
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def mib(q: str) -> float:
    for suffix, mult in QUANTITY.items():
        if str(q).endswith(suffix):
            return float(str(q)[: -len(suffix)]) * mult / 2**20
    return float(q) / 2**20


def expand(value, env: dict[str, str]):
    """${VAR} and ${VAR:-default} in the string values of a parsed YAML document, as
    pgsidecar's config loader does (after parsing, so comments are never expanded)."""

    def sub(m: re.Match) -> str:
        name, _, default = m.group(1).partition(":-")
        if name in env:
            return env[name]
        if ":-" in m.group(1):
            return default
        raise KeyError(name)

    if isinstance(value, dict):
        return {k: expand(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, env) for v in value]
    if isinstance(value, str) and "${" in value:
        return re.sub(r"\$\{([^}]*)\}", sub, value)
    return value


# ---------------------------------------------------------------- manifests


def pod_env(container: dict, secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)),
                                    str(e["value"]))
        elif "valueFrom" in e and "secretKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secrets.get(ref["name"], {}).get(ref["key"], "")
    return env


def memory_formula_mib(cfg: dict) -> float:
    """The sidecar's worst-case memory (deploy/README.md, "Resources"): 16 MiB of binary,
    runtime and metrics; per client up to two 256 KiB read buffers (client and server
    side); and one message held whole while it is read, up to limits.max_message_size."""
    limits = cfg.get("limits", {})
    clients = int(limits.get("max_client_conn", 10000))
    largest = int(limits.get("max_message_size", 128 * 2**20))
    return 16 + clients * 0.5 + largest / 2**20


def check_manifests(args) -> int:
    f = Failures()
    docs = [d for d in yaml.safe_load_all(open(args.rendered)) if d]
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    configmaps = {d["metadata"]["name"]: d for d in by_kind.get("ConfigMap", [])}
    secrets = {d["metadata"]["name"]: dict(d.get("stringData", {})) for d in by_kind.get("Secret", [])}
    workloads = by_kind.get("Deployment", []) + by_kind.get("Job", [])
    f.check(len(workloads) >= 2, f"{len(workloads)} workloads (a Deployment and a Job expected)")
    f.check(bool(by_kind.get("Deployment")), "a Deployment is rendered")
    f.check(bool(by_kind.get("Job")), "a Job is rendered")
    podmonitors = by_kind.get("PodMonitor", [])
    f.check(len(podmonitors) == 1, "one PodMonitor (monitoring.coreos.com/v1) is rendered")

    for w in workloads:
        name = f"{w['kind']}/{w['metadata']['name']}"
        spec = w["spec"]["template"]["spec"]
        meta = w["spec"]["template"]["metadata"]
        inits = spec.get("initContainers", [])
        mains = spec.get("containers", [])
        side = [c for c in inits + mains if c["name"] == "pgsidecar"]
        if not f.check(len(side) == 1, f"{name}: has one pgsidecar container"):
            continue
        side = side[0]
        if args.variant == "native":
            f.check(side in inits and side.get("restartPolicy") == "Always",
                    f"{name}: pgsidecar is a native sidecar (initContainers, restartPolicy: Always)")
        else:
            f.check(side in mains and "restartPolicy" not in side,
                    f"{name}: pgsidecar is a regular container (legacy variant)")
        apps = [c for c in mains if c["name"] != "pgsidecar"]
        f.check(len(apps) >= 1, f"{name}: has an application container")

        # Configuration: ConfigMap mounted, --config inside the mount, resolvable env.
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        mounts = side.get("volumeMounts", [])
        cm_names = [volumes[m["name"]]["configMap"]["name"] for m in mounts
                    if "configMap" in volumes.get(m["name"], {})]
        if not f.check(len(cm_names) == 1 and cm_names[0] in configmaps,
                       f"{name}: pgsidecar mounts a ConfigMap that is rendered ({cm_names})"):
            continue
        mount_path = next(m["mountPath"] for m in mounts
                          if "configMap" in volumes.get(m["name"], {}))
        cargs = side.get("args", [])
        cfg_path = cargs[cargs.index("--config") + 1] if "--config" in cargs else ""
        f.check(cfg_path.startswith(mount_path.rstrip("/") + "/"),
                f"{name}: --config {cfg_path} is inside the ConfigMap mount {mount_path}")
        cfg_file = Path(cfg_path).name
        cfg_text = configmaps[cm_names[0]]["data"].get(cfg_file)
        if not f.check(cfg_text is not None, f"{name}: ConfigMap has key {cfg_file}"):
            continue
        for e in side.get("env", []) + [e for c in apps for e in c.get("env", [])]:
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                f.check(ref["key"] in secrets.get(ref["name"], {}),
                        f"{name}: env {e['name']} -> Secret {ref['name']} key {ref['key']} exists")
        env = pod_env(side, secrets)
        try:
            cfg = expand(yaml.safe_load(cfg_text), env)
        except KeyError as e:
            f.check(False, f"{name}: proxy.yaml needs ${{{e.args[0]}}}, which the pod does not set")
            continue
        # The binary itself must accept the file with that environment.
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as t:
            t.write(cfg_text)
        run_env = {k: v for k, v in os.environ.items() if not k.startswith("PGSIDECAR_")}
        run_env.update(env)
        r = subprocess.run([args.bin, "check", "--config", t.name], env=run_env,
                           capture_output=True, text=True)
        os.unlink(t.name)
        f.check(r.returncode == 0,
                f"{name}: `pgsidecar check` accepts the ConfigMap's proxy.yaml with the pod's env"
                + ("" if r.returncode == 0 else f": {r.stderr.strip() or r.stdout.strip()}"))

        admin_port = int(str(cfg["admin_listen"]).rsplit(":", 1)[1])
        listen_host, listen_port = str(cfg["listen"]).rsplit(":", 1)
        f.check(not str(cfg["admin_listen"]).startswith("127."),
                f"{name}: admin_listen {cfg['admin_listen']} is reachable by kubelet probes")
        f.check(bool(cfg.get("admin", {}).get("token")),
                f"{name}: admin.token is set (admin port is not on loopback)")
        ports = {p.get("name"): p["containerPort"] for p in side.get("ports", [])}
        f.check(ports.get("admin") == admin_port,
                f"{name}: container port 'admin' = {ports.get('admin')} matches admin_listen {admin_port}")
        f.check(ports.get("postgres") == int(listen_port),
                f"{name}: container port 'postgres' = {ports.get('postgres')} matches listen {listen_port}")

        for probe, path in (("startupProbe", "/startupz"), ("livenessProbe", "/livez"),
                            ("readinessProbe", "/readyz")):
            p = side.get(probe, {}).get("httpGet", {})
            port = p.get("port")
            port = ports.get(port, port) if isinstance(port, str) else port
            f.check(p.get("path") == path and port == admin_port,
                    f"{name}: {probe} GET {p.get('path')} on port {port} (want {path} on {admin_port})")
        sp = side.get("startupProbe", {})
        budget = sp.get("periodSeconds", 10) * sp.get("failureThreshold", 3)
        grace = seconds(cfg.get("admin", {}).get("startup_grace", "60s"))
        f.check(budget >= grace,
                f"{name}: startupProbe allows {budget}s >= admin.startup_grace {grace:g}s")

        delay = seconds(cfg.get("admin", {}).get("shutdown_delay", "5s"))
        timeout = seconds(cfg.get("admin", {}).get("shutdown_timeout", "30s"))
        tgps = spec.get("terminationGracePeriodSeconds", 30)
        f.check(tgps >= delay + timeout + 5,
                f"{name}: terminationGracePeriodSeconds {tgps} >= shutdown_delay {delay:g}s + "
                f"shutdown_timeout {timeout:g}s + 5s margin")
        f.check(tgps <= delay + timeout + 30,
                f"{name}: terminationGracePeriodSeconds {tgps} is not far above the drain time")

        res = side.get("resources", {})
        req, lim = res.get("requests", {}), res.get("limits", {})
        f.check(all(k in req for k in ("cpu", "memory")) and "memory" in lim,
                f"{name}: pgsidecar has cpu/memory requests and a memory limit")
        if "memory" in req and "memory" in lim:
            need = memory_formula_mib(cfg)
            f.check(8 <= mib(req["memory"]) <= 64,
                    f"{name}: sidecar memory request {req['memory']} is modest")
            f.check(need <= mib(lim["memory"]) <= need * 1.5,
                    f"{name}: memory limit {lim['memory']} covers the config's worst case "
                    f"({need:.0f} MiB = 16 MiB + max_client_conn x 0.5 MiB + max_message_size) "
                    f"without being far above it")

        sc = side.get("securityContext", {})
        psc = spec.get("securityContext", {})
        f.check(psc.get("runAsNonRoot") is True or sc.get("runAsNonRoot") is True,
                f"{name}: runAsNonRoot")
        f.check(sc.get("readOnlyRootFilesystem") is True and sc.get("allowPrivilegeEscalation") is False
                and "ALL" in sc.get("capabilities", {}).get("drop", []),
                f"{name}: pgsidecar has a read-only root, no privilege escalation, no capabilities")

        ann = meta.get("annotations", {})
        f.check(ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == str(admin_port)
                and ann.get("prometheus.io/path", "/metrics") == "/metrics",
                f"{name}: prometheus.io annotations point at the admin port {admin_port}")
        for pm in podmonitors:
            sel = pm["spec"]["selector"].get("matchLabels", {})
            labels = meta.get("labels", {})
            f.check(sel and all(labels.get(k) == v for k, v in sel.items()),
                    f"{name}: pod labels match PodMonitor/{pm['metadata']['name']} selector {sel}")
            for ep in pm["spec"]["podMetricsEndpoints"]:
                f.check(ep.get("port") in ports and ep.get("path", "/metrics") == "/metrics",
                        f"{name}: PodMonitor endpoint port {ep.get('port')!r} is a named port of pgsidecar")

        users = {u["name"] for u in cfg.get("users", [])}
        dbs = {d["name"] for d in cfg.get("databases", [])}
        for c in apps:
            aenv = pod_env(c, secrets)
            url = aenv.get("DATABASE_URL", "")
            u = urllib.parse.urlparse(url)
            f.check(u.scheme in ("postgres", "postgresql") and u.hostname in ("127.0.0.1", "localhost")
                    and u.port == int(listen_port),
                    f"{name}: {c['name']} DATABASE_URL points at the sidecar ({u.hostname}:{u.port})")
            f.check(u.username in users, f"{name}: DATABASE_URL user {u.username!r} is a pgsidecar user")
            f.check(not dbs or u.path.lstrip("/") in dbs,
                    f"{name}: DATABASE_URL database {u.path.lstrip('/')!r} is allowed by pgsidecar")
            client_pw = [x.get("password") for x in cfg.get("users", []) if x["name"] == u.username]
            f.check(bool(client_pw) and urllib.parse.unquote(u.password or "") == client_pw[0],
                    f"{name}: DATABASE_URL password is the one pgsidecar expects for {u.username!r}")
            if args.variant == "legacy" and w["kind"] == "Job":
                f.check(aenv.get("PGSIDECAR_QUIT_ON_EXIT") == "true"
                        and aenv.get("PGSIDECAR_ADMIN_URL", "").endswith(f":{admin_port}")
                        and aenv.get("PGSIDECAR_ADMIN_TOKEN") == cfg["admin"]["token"],
                        f"{name}: importer calls POST /quitquitquit on the admin port with the admin token")
    return f.finish()


# ---------------------------------------------------------------- dashboard / alerts


def dashboard_exprs(dash: dict) -> list[tuple[str, str]]:
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if "expr" in t:
                    out.append((p.get("title", "?"), t["expr"]))
            walk(p.get("panels", []))

    walk(dash.get("panels", []))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v.get("query")
            q = q.get("query") if isinstance(q, dict) else q
            out.append((f"variable {v['name']}", q or ""))
    return out


def alert_exprs(rules: dict) -> list[tuple[str, str, str]]:
    out = []
    for g in rules.get("groups", []):
        for r in g.get("rules", []):
            prose = " ".join(str(v) for v in r.get("annotations", {}).values())
            out.append((r.get("alert") or r.get("record"), r["expr"], prose))
    return out


def check_dashboard(args) -> int:
    f = Failures()
    try:
        dash = json.load(open(args.file))
    except json.JSONDecodeError as e:
        f.check(False, f"{args.file} is not JSON: {e}")
        return f.finish()
    f.check(dash.get("uid") == "pgsidecar" and dash.get("title"), "uid and title set")
    f.check(dash.get("id") is None, "no instance-specific numeric id")
    ids, panels = [], []

    def walk(ps):
        for p in ps:
            panels.append(p)
            ids.append(p.get("id"))
            walk(p.get("panels", []))

    walk(dash.get("panels", []))
    f.check(len(ids) == len(set(ids)) and None not in ids, f"{len(ids)} panels with unique ids")
    vars_ = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    f.check(vars_.get("datasource", {}).get("type") == "datasource", "datasource variable")
    for p in panels:
        if p.get("type") == "row":
            continue
        f.check(all(k in p.get("gridPos", {}) for k in ("h", "w", "x", "y")), f"panel {p['title']!r}: gridPos")
        ds = p.get("datasource", {})
        f.check(ds.get("uid") == "${datasource}", f"panel {p['title']!r}: uses the datasource variable")
        f.check(bool(p.get("targets")) and all(t.get("expr") for t in p["targets"]),
                f"panel {p['title']!r}: has PromQL targets")
    exprs = " ".join(e for _, e in dashboard_exprs(dash))
    for metric in ("pgsidecar_checkout_wait_seconds_bucket", "pgsidecar_query_duration_seconds_bucket"):
        for q in ("0.5", "0.95", "0.99"):
            f.check(f"histogram_quantile({q}, sum by (le) (rate({metric}" in exprs,
                    f"p{q[2:] or '50'} of {metric} via histogram_quantile over rate(...[5m])")
    for metric in ("pgsidecar_clients", "pgsidecar_server_connections", "pgsidecar_breaker_state",
                   "pgsidecar_pool_max_connections", "pgsidecar_pool_connections", "pgsidecar_errors_total"):
        f.check(metric + "{" in exprs or metric + "[" in exprs, f"dashboard shows {metric}")
    f.check(all("[5m]" in e for _, e in dashboard_exprs(dash) if "rate(" in e or "increase(" in e),
            "every rate()/increase() uses a [5m] window")
    return f.finish()


def scrape_names(text: str) -> tuple[set[str], dict[str, str]]:
    samples, types = set(), {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, typ = line.split(None, 3)
            types[name] = typ.strip()
        elif line and not line.startswith("#"):
            samples.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return samples, types


def family_of(sample: str, types: dict[str, str]) -> str | None:
    if sample in types:
        return sample
    for suffix in ("_bucket", "_sum", "_count"):
        base = sample[: -len(suffix)] if sample.endswith(suffix) else None
        if base and types.get(base) in ("histogram", "summary"):
            if suffix == "_bucket" and types[base] != "histogram":
                return None
            return base
    return None


def check_metrics_used(args) -> int:
    f = Failures()
    samples, types = scrape_names(open(args.scrape).read())
    f.check(len(types) > 0, f"live scrape has {len(types)} metric families, {len(samples)} sample names")
    used: dict[str, set[str]] = {}
    prose: dict[str, set[str]] = {}
    dash = json.load(open(args.dashboard))
    for where, expr in dashboard_exprs(dash):
        for m in METRIC_RE.findall(expr):
            used.setdefault(m, set()).add(f"dashboard: {where}")
    rules = yaml.safe_load(open(args.alerts))
    for name, expr, text in alert_exprs(rules):
        for m in METRIC_RE.findall(expr):
            used.setdefault(m, set()).add(f"alert {name}")
        for m in METRIC_RE.findall(text):
            prose.setdefault(m, set()).add(f"alert {name} annotations")
    f.check(len(used) > 0, f"{len(used)} pgsidecar_* names queried by the dashboard and alerts")
    for m in sorted(used):
        fam = family_of(m, types)
        f.check(m in samples and fam is not None,
                f"{m} ({types.get(fam, 'missing')}) used by {', '.join(sorted(used[m]))}")
    for m in sorted(prose):
        f.check(m in types or m in samples,
                f"{m} named in {', '.join(sorted(prose[m]))} exists")
    return f.finish()


def prom_get(base: str, path: str, **params) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def check_queries(args) -> int:
    f = Failures()
    base = args.prom.rstrip("/")
    dash = json.load(open(args.dashboard))
    for where, expr in dashboard_exprs(dash):
        if where.startswith("variable "):
            m = re.match(r"label_values\((.*),\s*(\w+)\)$", expr.strip())
            if not f.check(bool(m), f"{where}: label_values(...) query"):
                continue
            series = m.group(1).replace("$instance", ".*").replace("$pool", ".*")
            try:
                res = prom_get(base, "/api/v1/series", **{"match[]": series})
                vals = {s.get(m.group(2)) for s in res["data"]} - {None}
                f.check(res["status"] == "success" and bool(vals), f"{where}: values {sorted(vals)}")
            except Exception as e:  # noqa: BLE001
                f.check(False, f"{where}: {e}")
            continue
        q = expr.replace("$instance", ".*").replace("$pool", ".*")
        try:
            res = prom_get(base, "/api/v1/query", query=q)
            n = len(res["data"]["result"])
            f.check(res["status"] == "success" and n > 0, f"{where}: {n} series for {q[:90]}")
        except urllib.error.HTTPError as e:
            f.check(False, f"{where}: {e.code} {e.read().decode()[:200]} for {q}")
        except Exception as e:  # noqa: BLE001
            f.check(False, f"{where}: {e}")
    # Rules: loaded, evaluated at least once, healthy.
    deadline = time.monotonic() + 20
    while True:
        groups = prom_get(base, "/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(not r.get("lastEvaluation", "0001").startswith("0001") for r in rules):
            break
        if time.monotonic() > deadline:
            break
        time.sleep(1)
    want = {name for name, _, _ in alert_exprs(yaml.safe_load(open(args.alerts)))}
    got = {r["name"]: r for r in rules}
    f.check(want == set(got), f"Prometheus loaded the {len(want)} alert rules")
    for name in sorted(got):
        r = got[name]
        f.check(r.get("health") == "ok",
                f"rule {name}: health {r.get('health')} {r.get('lastError', '')}".rstrip())
    return f.finish()


def check_rss(args) -> int:
    f = Failures()
    status = Path(f"/proc/{args.pid}/status").read_text()
    hwm_kib = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))
    rss_mib = hwm_kib / 1024
    docs = [d for d in yaml.safe_load_all(open(args.manifests)) if d]
    reqs = []
    for d in docs:
        if d["kind"] in ("Deployment", "Job"):
            spec = d["spec"]["template"]["spec"]
            for c in spec.get("initContainers", []) + spec.get("containers", []):
                if c["name"] == "pgsidecar":
                    reqs.append((mib(c["resources"]["requests"]["memory"]),
                                 mib(c["resources"]["limits"]["memory"])))
    req = min(r for r, _ in reqs)
    lim = min(l for _, l in reqs)
    print(f"  pgsidecar peak RSS after traffic: {rss_mib:.1f} MiB "
          f"(manifests: request {req:g} MiB, limit {lim:g} MiB)")
    if args.against == "limit":
        f.check(rss_mib < lim, f"peak RSS {rss_mib:.1f} MiB stays under the memory limit {lim:g} MiB")
        return f.finish()
    f.check(rss_mib <= req, f"peak RSS {rss_mib:.1f} MiB fits the memory request {req:g} MiB")
    f.check(rss_mib * 2 <= lim, f"limit {lim:g} MiB leaves at least 2x headroom")
    return f.finish()


def check_compose(args) -> int:
    f = Failures()
    path = Path(args.file)
    base = path.parent
    doc = yaml.safe_load(path.read_text())
    for name, svc in doc.get("services", {}).items():
        build = svc.get("build")
        if build:
            ctx = build if isinstance(build, str) else build.get("context", ".")
            df = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            f.check((base / ctx / df).is_file(), f"{name}: build {ctx}/{df} exists")
        image = svc.get("image", "")
        if image and not build:
            f.check(":" in image and not image.endswith(":latest"), f"{name}: image {image} is pinned")
        for v in svc.get("volumes", []):
            src = v.split(":", 1)[0] if isinstance(v, str) else v.get("source", "")
            if src.startswith("."):
                f.check((base / src).exists(), f"{name}: mounted {src} exists")
    return f.finish()


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("manifests")
    p.add_argument("rendered")
    p.add_argument("--bin", required=True)
    p.add_argument("--variant", choices=("native", "legacy"), default="native")
    p.set_defaults(fn=check_manifests)
    p = sub.add_parser("dashboard")
    p.add_argument("file")
    p.set_defaults(fn=check_dashboard)
    p = sub.add_parser("metrics-used")
    p.add_argument("--scrape", required=True)
    p.add_argument("--dashboard", required=True)
    p.add_argument("--alerts", required=True)
    p.set_defaults(fn=check_metrics_used)
    p = sub.add_parser("queries")
    p.add_argument("--prom", required=True)
    p.add_argument("--dashboard", required=True)
    p.add_argument("--alerts", required=True)
    p.set_defaults(fn=check_queries)
    p = sub.add_parser("rss")
    p.add_argument("--pid", required=True)
    p.add_argument("--manifests", required=True)
    p.add_argument("--against", choices=("request", "limit"), default="request")
    p.set_defaults(fn=check_rss)
    p = sub.add_parser("compose")
    p.add_argument("file")
    p.set_defaults(fn=check_compose)
    args = ap.parse_args()
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
