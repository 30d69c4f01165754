"""Renders a kustomization the way `kubectl kustomize` does, for the features
deploy/kubernetes uses (resources, configMapGenerator with files and labels, images),
when kubectl is not installed: it is not in Debian's or Ubuntu's archive.

The generated ConfigMap gets a content-hash suffix as kustomize gives it, and references
to it in pod specs (volumes, envFrom, env valueFrom) are renamed to match; anything
else the real tool supports is refused with an error instead of being ignored.

    python3 tests/deploy/kustomize_lite.py deploy/kubernetes > rendered.yaml
"""
import hashlib
import json
import pathlib
import sys

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "configMapGenerator", "images"}


def build(d: pathlib.Path) -> tuple[list[dict], dict[str, str], list[dict]]:
    k = yaml.safe_load((d / "kustomization.yaml").read_text())
    extra = set(k) - SUPPORTED
    if extra:
        raise SystemExit(f"{d}: kustomize_lite does not support {sorted(extra)}; install kubectl")
    docs, names, images = [], {}, list(k.get("images", []))
    for r in k.get("resources", []):
        p = d / r
        if p.is_dir():
            sub_docs, sub_names, sub_images = build(p)
            docs += sub_docs
            names.update(sub_names)
            images += sub_images
        else:
            docs += [x for x in yaml.safe_load_all(p.read_text()) if x]
    for g in k.get("configMapGenerator", []):
        data = {pathlib.Path(f).name: (d / f).read_text() for f in g.get("files", [])}
        digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]
        name = f"{g['name']}-{digest}"
        names[g["name"]] = name
        meta = {"name": name}
        labels = g.get("options", {}).get("labels")
        if labels:
            meta["labels"] = labels
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    return docs, names, images


def pod_specs(doc: dict):
    spec = doc.get("spec", {})
    if doc.get("kind") == "Pod":
        yield spec
    tpl = spec.get("template", {})
    if doc.get("kind") == "CronJob":
        tpl = spec.get("jobTemplate", {}).get("spec", {}).get("template", {})
    if "spec" in tpl:
        yield tpl["spec"]


def rewrite(doc: dict, names: dict[str, str], images: list[dict]) -> None:
    for ps in pod_specs(doc):
        for v in ps.get("volumes", []):
            cm = v.get("configMap")
            if cm and cm.get("name") in names:
                cm["name"] = names[cm["name"]]
        for c in ps.get("initContainers", []) + ps.get("containers", []):
            for ef in c.get("envFrom", []):
                ref = ef.get("configMapRef")
                if ref and ref.get("name") in names:
                    ref["name"] = names[ref["name"]]
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("configMapKeyRef")
                if ref and ref.get("name") in names:
                    ref["name"] = names[ref["name"]]
            for im in images:
                base, _, _tag = c.get("image", "").partition(":")
                if base == im["name"]:
                    c["image"] = f"{im.get('newName', base)}:{im.get('newTag', _tag or 'latest')}"


def main() -> int:
    docs, names, images = build(pathlib.Path(sys.argv[1]))
    for doc in docs:
        rewrite(doc, names, images)
    yaml.safe_dump_all(docs, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
