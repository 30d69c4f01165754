#!/usr/bin/env python3
"""Issue #3 acceptance check, run by hand: two clients that SET different TimeZone and
search_path interleave 1,000 transactions each through a proxy on pool size 1; every
transaction must see its own values. Usage: interleave_settings.py PROXY_PORT (the upstream
is expected on 127.0.0.1:5432, user postgres, trust)."""
import psycopg, sys
port = int(sys.argv[1])
psycopg.connect(f"host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True).execute("create schema if not exists sa; create schema if not exists sb; create table if not exists sa.t(v text); create table if not exists sb.t(v text); truncate sa.t; truncate sb.t; insert into sa.t values ('A'); insert into sb.t values ('B')")
a = psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True)
b = psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True)
a.execute("SET TimeZone = 'Asia/Tokyo'"); a.execute("SET search_path TO sa, public")
b.execute("SET TimeZone = 'America/Lima'"); b.execute("SET search_path = sb, public")
bad = 0
for i in range(1000):
    for c, tz, v in ((a, 'Asia/Tokyo', 'A'), (b, 'America/Lima', 'B')):
        if i % 2:
            with c.transaction():
                r = c.execute("select current_setting('TimeZone'), (select v from t)").fetchone()
        else:
            r = c.execute("select current_setting('TimeZone'), (select v from t)").fetchone()
        if r != (tz, v):
            bad += 1
            if bad < 5: print("mismatch", i, r, tz, v)
print("mismatches", bad)
sys.exit(1 if bad else 0)
