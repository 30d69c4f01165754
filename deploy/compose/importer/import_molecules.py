#!/usr/bin/env python3
"""Example batch importer: loads molecule-like records into PostgreSQL through pgsidecar.

It does what a real importer behind a transaction-pooling sidecar should do:

* connects to DATABASE_URL (pgsidecar on 127.0.0.1:6432 in a Kubernetes pod,
  pgsidecar:6432 in Docker Compose), retrying while the sidecar or database start;
* phase 1, bulk load: per batch, one transaction that COPYs rows into a temporary
  staging table (ON COMMIT DROP, so no session state outlives the transaction, as
  transaction pooling requires) and upserts them into `molecules`;
* phase 2, incremental updates: executemany() upserts in transactions of one batch
  each, merging new properties into existing rows;
* stops cleanly on SIGTERM after the batch in flight, and checks the row count.

Optional pgsidecar integration (used by the Kubernetes variant for older clusters,
where the sidecar is a regular container):

  PGSIDECAR_ADMIN_URL      e.g. http://127.0.0.1:9930: wait for GET /readyz == 200 first
  PGSIDECAR_QUIT_ON_EXIT   true: POST /quitquitquit when done (success or failure), so
                           the sidecar exits and the Job's pod can complete
  PGSIDECAR_ADMIN_TOKEN    bearer token for /quitquitquit

Other settings: IMPORT_ROWS (5000), IMPORT_BATCH (500), IMPORT_ROUNDS (1),
IMPORT_PAUSE seconds between rounds (0), IMPORT_SEED (42), IMPORT_WAIT_TIMEOUT (120).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import time
import urllib.error
import urllib.request

import psycopg

# Fragments that concatenate into valid-looking SMILES strings.
FRAGMENTS = [
    "C", "CC", "CCC", "C(C)C", "CO", "CN", "C(=O)O", "C(=O)N", "c1ccccc1", "c1ccncc1",
    "c1ccoc1", "c1ccsc1", "C1CCCCC1", "C1CCNCC1", "OC", "N(C)C", "S(=O)(=O)N", "F",
    "Cl", "Br", "C#N", "C=C", "OCCO", "C(F)(F)F",
]
# Average atomic masses (heavy atoms) and hydrogen.
MASS = {"C": 12.011, "N": 14.007, "O": 15.999, "S": 32.06, "F": 18.998,
        "Cl": 35.45, "Br": 79.904, "H": 1.008}
VALENCE = {"C": 4, "N": 3, "O": 2, "S": 2, "F": 1, "Cl": 1, "Br": 1}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

stop_requested = False


def log(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def atoms(smiles: str) -> list[str]:
    out, i = [], 0
    while i < len(smiles):
        two = smiles[i:i + 2]
        if two in ("Cl", "Br"):
            out.append(two)
            i += 2
            continue
        ch = smiles[i]
        if ch.upper() in ("C", "N", "O", "S", "F"):
            out.append(ch.upper())
        i += 1
    return out


def molecular_weight(smiles: str) -> float:
    """Heavy atoms plus an estimate of implicit hydrogens; good enough for demo data."""
    heavy = atoms(smiles)
    bonds = smiles.count("=") + 2 * smiles.count("#") + len(heavy) - 1
    free_valence = sum(VALENCE[a] for a in heavy) - 2 * max(bonds, 0)
    aromatic = sum(1 for ch in smiles if ch in "cnos")
    hydrogens = max(free_valence - aromatic, 0)
    return round(sum(MASS[a] for a in heavy) + hydrogens * MASS["H"], 4)


def inchikey(smiles: str) -> str:
    """An InChIKey-shaped key (14-10-1 uppercase letters) derived from the SMILES."""
    digest = hashlib.sha256(smiles.encode()).digest()
    letters = "".join(LETTERS[b % 26] for b in digest)
    return f"{letters[:14]}-{letters[14:22]}SA-N"


def molecules(n: int, seed: int) -> list[tuple[str, str, float, dict]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    while len(out) < n:
        smiles = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(2, 6)))
        key = inchikey(smiles)
        if key in seen:
            continue
        seen.add(key)
        heavy = atoms(smiles)
        props = {
            "logp": round(rng.uniform(-2.0, 6.0), 2),
            "hbd": smiles.count("O") + smiles.count("N"),
            "hba": sum(1 for a in heavy if a in ("N", "O")),
            "heavy_atoms": len(heavy),
            "rotatable_bonds": max(len(heavy) - smiles.count("1") - 2, 0),
            "source": "synthetic",
        }
        out.append((key, smiles, molecular_weight(smiles), props))
    return out


def connect(url: str, deadline: float) -> psycopg.Connection:
    delay = 0.5
    while True:
        try:
            return psycopg.connect(url, autocommit=True, connect_timeout=10,
                                   application_name="molecule-importer")
        except psycopg.OperationalError as e:
            if time.monotonic() > deadline:
                raise
            log("connect_retry", error=str(e).strip().splitlines()[0], wait=delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def wait_ready(admin_url: str, deadline: float) -> None:
    while True:
        try:
            with urllib.request.urlopen(f"{admin_url}/readyz", timeout=2) as r:
                if r.status == 200:
                    log("sidecar_ready", url=admin_url)
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{admin_url}/readyz did not answer 200 in time")
        time.sleep(1)


def quit_sidecar(admin_url: str, token: str) -> None:
    req = urllib.request.Request(f"{admin_url}/quitquitquit", method="POST", data=b"")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            log("sidecar_quit", status=r.status)
    except (urllib.error.URLError, OSError) as e:
        log("sidecar_quit_failed", error=str(e))


def bulk_load(conn: psycopg.Connection, rows, batch: int) -> int:
    """COPY into a per-transaction staging table, then upsert from it."""
    loaded = 0
    for start in range(0, len(rows), batch):
        if stop_requested:
            break
        chunk = rows[start:start + batch]
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(
                "CREATE TEMP TABLE molecules_stage "
                "(inchikey text, smiles text, mol_weight numeric(10,4), properties jsonb) "
                "ON COMMIT DROP"
            )
            with cur.copy("COPY molecules_stage (inchikey, smiles, mol_weight, properties) "
                          "FROM STDIN") as copy:
                for key, smiles, mw, props in chunk:
                    copy.write_row((key, smiles, mw, json.dumps(props)))
            cur.execute(
                "INSERT INTO molecules (inchikey, smiles, mol_weight, properties) "
                "SELECT inchikey, smiles, mol_weight, properties FROM molecules_stage "
                "ON CONFLICT (inchikey) DO UPDATE SET smiles = EXCLUDED.smiles, "
                "mol_weight = EXCLUDED.mol_weight, properties = EXCLUDED.properties, "
                "updated_at = now()"
            )
        loaded += len(chunk)
    return loaded


def upsert(conn: psycopg.Connection, rows, batch: int, round_no: int) -> int:
    """executemany() upserts, one transaction per batch."""
    done = 0
    sql = (
        "INSERT INTO molecules (inchikey, smiles, mol_weight, properties) "
        "VALUES (%s, %s, %s, %s::jsonb) "
        "ON CONFLICT (inchikey) DO UPDATE SET "
        "properties = molecules.properties || EXCLUDED.properties, updated_at = now()"
    )
    for start in range(0, len(rows), batch):
        if stop_requested:
            break
        chunk = rows[start:start + batch]
        params = [
            (key, smiles, mw, json.dumps({**props, "assay_round": round_no,
                                           "measured_logp": round(props["logp"] * 0.97, 2)}))
            for key, smiles, mw, props in chunk
        ]
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany(sql, params)
        done += len(chunk)
    return done


def run() -> int:
    url = os.environ.get("DATABASE_URL")
    if not url:
        log("error", message="DATABASE_URL is not set")
        return 2
    n = env_int("IMPORT_ROWS", 5000)
    batch = env_int("IMPORT_BATCH", 500)
    rounds = env_int("IMPORT_ROUNDS", 1)
    pause = float(os.environ.get("IMPORT_PAUSE", "0"))
    seed = env_int("IMPORT_SEED", 42)
    wait = env_int("IMPORT_WAIT_TIMEOUT", 120)
    admin_url = os.environ.get("PGSIDECAR_ADMIN_URL", "").rstrip("/")

    deadline = time.monotonic() + wait
    if admin_url:
        wait_ready(admin_url, deadline)
    rows = molecules(n, seed)
    # COPY the first two thirds; the upsert phase then updates those and inserts the rest.
    split = (2 * len(rows)) // 3
    started = time.monotonic()
    with connect(url, deadline) as conn:
        for round_no in range(1, rounds + 1):
            copied = bulk_load(conn, rows[:split], batch)
            upserted = upsert(conn, rows, batch, round_no)
            log("round_done", round=round_no, copied=copied, upserted=upserted)
            if stop_requested:
                break
            if round_no < rounds and pause > 0:
                time.sleep(pause)
        with conn.cursor() as cur:
            cur.execute("SELECT count(*), count(*) FILTER (WHERE properties ? 'assay_round') "
                        "FROM molecules WHERE inchikey = ANY(%s)", ([r[0] for r in rows],))
            total, updated = cur.fetchone()
    log("import_done", rows=total, updated=updated, expected=len(rows),
        seconds=round(time.monotonic() - started, 2), stopped_early=stop_requested)
    if not stop_requested and (total != len(rows) or updated != len(rows)):
        log("error", message="row count mismatch")
        return 1
    return 0


def main() -> int:
    def on_term(signum, _frame):
        global stop_requested
        stop_requested = True
        log("stop_requested", signal=signum)

    signal.signal(signal.SIGTERM, on_term)
    admin_url = os.environ.get("PGSIDECAR_ADMIN_URL", "").rstrip("/")
    quit_on_exit = os.environ.get("PGSIDECAR_QUIT_ON_EXIT", "").lower() in ("1", "true", "yes")
    code = 1
    try:
        code = run()
    except Exception as e:  # report, then still release the sidecar below
        log("error", message=f"{type(e).__name__}: {e}")
    finally:
        if quit_on_exit and admin_url:
            quit_sidecar(admin_url, os.environ.get("PGSIDECAR_ADMIN_TOKEN", ""))
    return code


if __name__ == "__main__":
    sys.exit(main())
