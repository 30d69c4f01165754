"""`helm lint` and `helm template` of deploy/helm/pgsidecar without the helm binary
(not in Debian's or Ubuntu's archive): helm-python-sdk binds Helm's own Go SDK
(libhelm_c, shipped in the wheel), so this is Helm's linter and template engine.

    python tests/deploy/helm_check.py lint deploy/helm/pgsidecar
    python tests/deploy/helm_check.py template deploy/helm/pgsidecar [--set-json '{...}'] > out.yaml
    python tests/deploy/helm_check.py policy out.yaml --bin target/release/pgsidecar [--variant legacy]
"""
import argparse
import json
import sys

from helm_python import chart as helm_chart


def lint(args) -> int:
    report = helm_chart.lint(args.chart, strict=True, kube_version="v1.29.0")
    bad = 0
    for m in report.get("messages", []):
        sev = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}.get(m.get("severity"), "?")
        print(f"[{sev}] {m.get('path')}: {m.get('error')}")
        bad += m.get("severity", 0) >= 2
    for e in report.get("errors") or []:
        print(f"[ERROR] {e}")
        bad += 1
    print(f"{report.get('total_charts_linted', 0)} chart(s) linted, {bad} warning(s)/error(s)")
    return 1 if bad or not report.get("total_charts_linted") else 0


def template(args) -> int:
    c = helm_chart.Chart.load(args.chart)
    values = json.loads(args.set_json) if args.set_json else None
    out = c.render(values, name=args.name, namespace="default", is_install=True)
    for path in sorted(out):
        text = out[path].strip()
        if text and not path.endswith("NOTES.txt") and any(
            line.strip() and not line.lstrip().startswith("#") for line in text.splitlines()
        ):
            print(f"---\n# Source: {path}\n{text}")
    return 0


def policy(args) -> int:
    """What the chart promises: the sidecar's placement per variant, a memory limit that
    covers the config's worst case, a ConfigMap `pgsidecar check` accepts with the pod's
    environment, and the PrometheusRule carrying exactly deploy/prometheus/alerts.yml."""
    import os
    import pathlib
    import subprocess
    import tempfile

    import yaml

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from check_deploy import memory_formula_mib, mib  # noqa: E402

    problems = []

    def check(ok, what):
        print(("  ok: " if ok else "  FAILED: ") + what)
        if not ok:
            problems.append(what)

    docs = [d for d in yaml.safe_load_all(open(args.rendered)) if d]
    kinds = {d["kind"]: d for d in docs}
    dep = kinds["Deployment"]["spec"]["template"]["spec"]
    inits, mains = dep.get("initContainers", []), dep.get("containers", [])
    side = [c for c in inits + mains if c["name"] == "pgsidecar"]
    check(len(side) == 1, "one pgsidecar container")
    if args.variant == "native":
        check(side[0] in inits and side[0].get("restartPolicy") == "Always",
              "native: pgsidecar is an init container with restartPolicy: Always")
    else:
        check(side[0] in mains and "restartPolicy" not in side[0],
              "legacy: pgsidecar is a regular container")
    cfg_text = kinds["ConfigMap"]["data"]["proxy.yaml"]
    cfg = yaml.safe_load(cfg_text)
    need = memory_formula_mib(cfg)
    lim = mib(side[0]["resources"]["limits"]["memory"])
    check(need <= lim <= need + 1, f"memory limit {lim:g} MiB = 16 + max_client_conn x 0.5 + "
          f"max_message_size ({need:.1f} MiB)")
    env = {e["name"]: "x" for e in side[0].get("env", [])}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as t:
        t.write(cfg_text)
        t.flush()
        r = subprocess.run([args.bin, "check", "--config", t.name],
                           env={**os.environ, **env}, capture_output=True, text=True)
    check(r.returncode == 0, f"`pgsidecar check` accepts the ConfigMap ({r.stdout.strip()}{r.stderr.strip()})")
    root = pathlib.Path(__file__).resolve().parents[2]
    alerts = (root / "deploy/prometheus/alerts.yml").read_text()
    check((root / "deploy/helm/pgsidecar/files/alerts.yml").read_text() == alerts,
          "chart's files/alerts.yml is deploy/prometheus/alerts.yml")
    rule = kinds.get("PrometheusRule")
    check(rule is not None and rule["spec"]["groups"] == yaml.safe_load(alerts)["groups"],
          "PrometheusRule carries the alert groups of deploy/prometheus/alerts.yml")
    if args.variant == "legacy":
        check("NetworkPolicy" in kinds, "NetworkPolicy rendered when enabled")
    return 1 if problems else 0


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("lint")
    p.add_argument("chart")
    p.set_defaults(fn=lint)
    p = sub.add_parser("template")
    p.add_argument("chart")
    p.add_argument("--name", default="demo")
    p.add_argument("--set-json", default="")
    p.set_defaults(fn=template)
    p = sub.add_parser("policy")
    p.add_argument("rendered")
    p.add_argument("--bin", required=True)
    p.add_argument("--variant", choices=("native", "legacy"), default="native")
    p.set_defaults(fn=policy)
    args = ap.parse_args()
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
