"""Sends one 100 MB query through the proxy (a simple-protocol Query message holding a
100,000,000-character literal) and checks PostgreSQL's answer; validate.sh then compares
the proxy's peak RSS with the manifests' memory limit.

    python tests/deploy/big_query.py postgresql://app:app@127.0.0.1:6432/app
"""
import sys
import time

import psycopg

SIZE = 100_000_000


def main() -> int:
    payload = "x" * SIZE
    with psycopg.connect(sys.argv[1], cursor_factory=psycopg.ClientCursor) as conn:
        start = time.monotonic()
        (n,) = conn.execute("SELECT length(%s)", [payload]).fetchone()
        took = time.monotonic() - start
    print(f"100 MB query answered: length = {n} in {took:.1f}s")
    return 0 if n == SIZE else 1


if __name__ == "__main__":
    sys.exit(main())
