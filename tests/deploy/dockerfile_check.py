#!/usr/bin/env python3
"""Project checklist for the root Dockerfile and .dockerignore (no Docker daemon needed).

hadolint (run by validate.sh) covers general Dockerfile hygiene; this covers what the
deployment relies on:

 1. multi-stage: a named builder stage, the final stage copies the binary from it;
 2. every base image has an explicit tag or digest, never `latest` (ARG defaults resolved);
 3. dependency caching: Cargo.toml/Cargo.lock are copied and built before src/;
 4. `cargo build --release --locked`;
 5. the final stage runs as a non-root, numeric USER (so Kubernetes' runAsNonRoot can
    verify it);
 6. STOPSIGNAL SIGTERM (starts pgsidecar's graceful drain);
 7. EXPOSE of the client port and the admin port, matching the baked config's defaults;
 8. exec-form ENTRYPOINT, so pgsidecar is PID 1 and receives the signal itself;
 9. the default config deploy/docker/proxy.yaml is baked in and PGSIDECAR_CONFIG points
    at it; it listens on 0.0.0.0 and reads the admin token from the environment;
10. HEALTHCHECK absent, or exec-form against /livez or /readyz on the admin port (the
    distroless runtime has no shell for CMD-SHELL);
11. no credentials in ENV/ARG;
12. the expected image size is stated in a comment;
13. .dockerignore keeps target/ and .git out and lets every COPY source in.

Usage: dockerfile_check.py [Dockerfile] [.dockerignore]
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import yaml


def instructions(text: str) -> list[tuple[str, str]]:
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        op, _, rest = buf.strip().partition(" ")
        out.append((op.upper(), rest.strip()))
        buf = ""
    return out


def ignore_regex(pattern: str) -> re.Pattern:
    p = pattern.strip().lstrip("/").rstrip("/")
    rx, i = "", 0
    while i < len(p):
        if p.startswith("**", i):
            rx += ".*"
            i += 2
            if p.startswith("/", i):
                rx += "/?"
                i += 1
        elif p[i] == "*":
            rx += "[^/]*"
            i += 1
        elif p[i] == "?":
            rx += "[^/]"
            i += 1
        else:
            rx += re.escape(p[i])
            i += 1
    return re.compile(rx + r"\Z")


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pat in patterns:
        neg = pat.startswith("!")
        rx = ignore_regex(pat[1:] if neg else pat)
        if any(rx.match(p) for p in prefixes):
            result = not neg
    return result


def main() -> int:
    dockerfile = Path(sys.argv[1] if len(sys.argv) > 1 else "Dockerfile")
    ignore_file = Path(sys.argv[2] if len(sys.argv) > 2 else ".dockerignore")
    root = dockerfile.parent
    text = dockerfile.read_text()
    ins = instructions(text)
    ok, bad = [], []

    def check(cond, msg):
        (ok if cond else bad).append(msg)
        return cond

    args = {}
    stages: list[dict] = []
    for op, rest in ins:
        if op == "ARG" and not stages:
            k, _, v = rest.partition("=")
            args[k.strip()] = v.strip().strip('"')
        elif op == "FROM":
            words = rest.split()
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append({"image": image, "name": name, "ins": []})
        elif stages:
            stages[-1]["ins"].append((op, rest))

    # 1. multi-stage
    check(len(stages) >= 2, f"multi-stage build ({len(stages)} stages)")
    builder = next((s for s in stages[:-1] if s["name"]), None)
    final = stages[-1] if stages else {"ins": [], "image": ""}
    check(builder is not None, "a named builder stage")
    copies_from = [r for o, r in final["ins"] if o == "COPY" and "--from=" in r]
    check(builder is not None and any(f"--from={builder['name']}" in r for r in copies_from),
          "the final stage copies the binary from the builder stage")

    # 2. pinned bases
    for s in stages:
        img = s["image"]
        tag = img.split("@")[0].rsplit("/", 1)[-1]
        pinned = "@sha256:" in img or (":" in tag and not tag.endswith(":latest"))
        check(pinned and "$" not in img, f"base image {img} has an explicit tag or digest, not latest")

    # 3./4. dependency caching and cargo flags
    b = builder["ins"] if builder else []
    idx_manifest = next((i for i, (o, r) in enumerate(b) if o == "COPY" and "Cargo.toml" in r
                         and "Cargo.lock" in r), None)
    idx_src = next((i for i, (o, r) in enumerate(b) if o == "COPY" and re.search(r"(^|\s)src\b", r)), None)
    builds = [i for i, (o, r) in enumerate(b) if o == "RUN" and "cargo build" in r]
    check(idx_manifest is not None and idx_src is not None and idx_manifest < idx_src,
          "Cargo.toml and Cargo.lock are copied before src/")
    check(any(idx_manifest is not None and idx_src is not None and idx_manifest < i < idx_src
              for i in builds),
          "dependencies are built (dummy sources) before src/ is copied")
    check(bool(builds) and all("--release" in b[i][1] and "--locked" in b[i][1] for i in builds),
          "every cargo build uses --release --locked")

    # 5. non-root numeric user in the final stage
    users = [r for o, r in final["ins"] if o == "USER"]
    uid = users[-1].split(":")[0] if users else ""
    nonroot_base = final["image"].split("@")[0].endswith(":nonroot")
    check(bool(users) and uid not in ("root", "0"), f"final stage runs as a non-root USER ({users[-1] if users else 'none'})")
    check(uid.isdigit() or (not users and nonroot_base), "the USER is numeric (runAsNonRoot can verify it)")

    # 6. STOPSIGNAL
    sig = [r for o, r in final["ins"] if o == "STOPSIGNAL"]
    check(sig[-1:] == ["SIGTERM"], f"STOPSIGNAL SIGTERM ({sig[-1] if sig else 'none'})")

    # 9. default config (read first: 7 compares against it)
    cfg_copy = [r for o, r in final["ins"] if o == "COPY" and "deploy/docker/proxy.yaml" in r]
    envs = " ".join(r for o, r in final["ins"] if o == "ENV")
    m = re.search(r"PGSIDECAR_CONFIG[= ](\S+)", envs)
    dest = cfg_copy[0].split()[-1] if cfg_copy else None
    check(bool(cfg_copy), "deploy/docker/proxy.yaml is baked into the image")
    check(m is not None and dest is not None and m.group(1) == dest,
          f"PGSIDECAR_CONFIG points at the baked config ({m.group(1) if m else 'unset'})")
    cfg_path = root / "deploy/docker/proxy.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.exists() else {}
    default = lambda v: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v))  # noqa: E731
    listen, admin = default(cfg.get("listen", "")), default(cfg.get("admin_listen", ""))
    check(listen.startswith("0.0.0.0:") and admin.startswith("0.0.0.0:"),
          f"baked config listens on 0.0.0.0 ({listen}, admin {admin})")
    check("${" in str(cfg.get("admin", {}).get("token", "")),
          "baked config reads admin.token from the environment")
    check(all("${" in str(cfg.get("upstream", {}).get(k, "")) for k in ("host", "user", "password")),
          "baked config reads the upstream host, user and password from the environment")

    # 7. EXPOSE
    exposed = set()
    for o, r in final["ins"]:
        if o == "EXPOSE":
            exposed |= {p.split("/")[0] for p in r.split()}
    want = {listen.rsplit(":", 1)[-1], admin.rsplit(":", 1)[-1]} - {""}
    check(want and want <= exposed, f"EXPOSE {sorted(exposed)} covers the client and admin ports {sorted(want)}")

    # 8. exec-form ENTRYPOINT
    ep = [r for o, r in final["ins"] if o == "ENTRYPOINT"]
    try:
        ep_ok = bool(ep) and isinstance(json.loads(ep[-1]), list) and "pgsidecar" in ep[-1]
    except json.JSONDecodeError:
        ep_ok = False
    check(ep_ok, "exec-form ENTRYPOINT runs pgsidecar as PID 1")

    # 10. HEALTHCHECK
    hc = [r for o, r in final["ins"] if o == "HEALTHCHECK"]
    if not hc or hc[-1].strip().upper() == "NONE":
        check(True, "no HEALTHCHECK (probes come from the orchestrator)")
    else:
        h = hc[-1]
        cmd = h[h.upper().index("CMD") + 3:].strip() if "CMD" in h.upper() else ""
        distroless = "distroless" in final["image"]
        check(cmd.startswith("[") and ("/livez" in h or "/readyz" in h) and admin.rsplit(":", 1)[-1] in h,
              "HEALTHCHECK is exec-form against /livez or /readyz on the admin port")
        check(not (distroless and not cmd.startswith("[")), "HEALTHCHECK does not need a shell")

    # 11. no credentials
    secret_like = re.compile(r"(PASSWORD|TOKEN|SECRET)\w*[= ]\S+", re.I)
    leaks = [f"{o} {r}" for s in stages for o, r in s["ins"] if o in ("ENV", "ARG") and secret_like.search(r)]
    check(not leaks, f"no credentials in ENV/ARG {leaks if leaks else ''}".rstrip())

    # 12. size statement
    check(re.search(r"(?i)expected size.*\d+\s*MB", text) is not None, "the expected image size is stated")

    # 13. .dockerignore
    if check(ignore_file.exists(), f"{ignore_file} exists"):
        pats = [p.strip() for p in ignore_file.read_text().splitlines()
                if p.strip() and not p.strip().startswith("#")]
        for p in ("target/release/pgsidecar", ".git/HEAD", "tests/deploy/validate.sh",
                  "deploy/kubernetes/kustomization.yaml"):
            check(ignored(p, pats), f".dockerignore keeps {p} out of the build context")
        sources = []
        for s in stages:
            for o, r in s["ins"]:
                if o in ("COPY", "ADD") and "--from=" not in r:
                    words = [w for w in shlex.split(r) if not w.startswith("--")]
                    sources += words[:-1]
        for src in sources:
            probe = src.rstrip("/")
            if (root / probe).is_dir():
                files = [str(p.relative_to(root)) for p in (root / probe).rglob("*") if p.is_file()]
            else:
                files = [probe]
            missing = [p for p in files if ignored(p, pats) or not (root / p).exists()]
            check(files and not missing,
                  f"COPY source {src} is in the build context ({len(files)} files)"
                  + (f"; missing or ignored: {missing[:3]}" if missing else ""))

    for m_ in ok:
        print(f"  ok: {m_}")
    for m_ in bad:
        print(f"  FAILED: {m_}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
