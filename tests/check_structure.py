#!/usr/bin/env python3
"""The crate's shape, checked by the test command:

- no import cycle between the top-level modules of src/ (an arrow A -> B is any
  `crate::B` path written in A's files; comments count too, so say `the tls module`
  rather than a path in prose that points upward);
- no file in src/ longer than 500 lines;
- no function in src/ longer than 100 lines.

    python3 tests/check_structure.py [SRC_DIR]

Prints what it finds and exits 1 if anything is over, 0 otherwise.
"""
import os
import re
import sys

MAX_FILE = 500
MAX_FN = 100
FN = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+\"C\"\s+)?fn\s+(\w+)")


def rust_files(src):
    for root, _, files in os.walk(src):
        for f in sorted(files):
            if f.endswith(".rs"):
                yield os.path.join(root, f)


def top_module(src, path):
    rel = os.path.relpath(path, src).split(os.sep)
    return rel[0][:-3] if len(rel) == 1 else rel[0]


def arrows(src):
    deps = {}
    for path in rust_files(src):
        top = top_module(src, path)
        if top in ("lib", "main"):
            continue
        deps.setdefault(top, {})
        for n, line in enumerate(open(path, encoding="utf-8"), 1):
            for dep in re.findall(r"crate::([a-z_][a-z0-9_]*)", line):
                if dep != top:
                    deps[top].setdefault(dep, f"{path}:{n}")
    return deps


def cycles(deps):
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in deps.get(v, {}):
            if w not in deps:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(deps):
        if v not in index:
            visit(v)
    return out


def long_functions(path):
    """(name, first line, length) of every fn body longer than MAX_FN lines."""
    lines = open(path, encoding="utf-8").read().split("\n")
    found = []
    for i, line in enumerate(lines):
        m = FN.match(line)
        if not m:
            continue
        depth, opened = 0, False
        for j in range(i, len(lines)):
            code = re.sub(r"//.*", "", lines[j])
            code = re.sub(r"'(\\.|[^'\\])'", "", code)
            code = re.sub(r'"(\\.|[^"\\])*"', '""', code)
            if not opened and ";" in code and "{" not in code:
                break  # a declaration without a body
            depth += code.count("{") - code.count("}")
            opened = opened or "{" in code
            if opened and depth <= 0:
                if j - i + 1 > MAX_FN:
                    found.append((m.group(7), i + 1, j - i + 1))
                break
    return found


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "src"
    bad = False
    deps = arrows(src)
    for group in cycles(deps):
        bad = True
        print("import cycle: " + " <-> ".join(group))
        for a in group:
            for b in group:
                if b in deps.get(a, {}):
                    print(f"  {a} -> {b}  first at {deps[a][b]}")
    for path in rust_files(src):
        n = sum(1 for _ in open(path, encoding="utf-8"))
        if n > MAX_FILE:
            bad = True
            print(f"file over {MAX_FILE} lines: {path} ({n})")
        for name, at, length in long_functions(path):
            bad = True
            print(f"function over {MAX_FN} lines: {path}:{at} {name} ({length})")
    if not bad:
        print(f"structure ok: no import cycle, no file over {MAX_FILE} lines, no function over {MAX_FN}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
