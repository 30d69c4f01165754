#!/usr/bin/env python3
"""Open N PostgreSQL client connections that log in and then sit idle.

Speaks just enough of the v3 protocol for trust authentication: StartupMessage, then
reads messages until ReadyForQuery. Once every connection is ready it prints
"ready N" on stdout (flushed) and holds them until it gets SIGTERM/SIGINT, --hold
seconds pass, or (with --watch-stdin) stdin reaches EOF; then it closes them all.

Used by bench/run.sh to measure a pooler's RSS per idle client:

    python3 bench/idle_clients.py --port 6432 -n 5000 --user postgres --database postgres

Exit status: 0 when all N logged in, 1 otherwise (the first error is on stderr).
"""

import argparse
import asyncio
import resource
import signal
import struct
import sys

PROTOCOL_V3 = 196608


def raise_fd_limit(want):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    for new_hard in (max(hard, want), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, new_hard), new_hard))
            return min(want, new_hard)
        except (ValueError, OSError):
            continue
    return soft


def startup_packet(user, database):
    params = b""
    for k, v in (("user", user), ("database", database), ("application_name", "idle_clients")):
        params += k.encode() + b"\0" + v.encode() + b"\0"
    params += b"\0"
    body = struct.pack("!i", PROTOCOL_V3) + params
    return struct.pack("!i", len(body) + 4) + body


def error_text(body):
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode(errors="replace")
    return "%s %s: %s" % (fields.get("S", "ERROR"), fields.get("C", "?"), fields.get("M", "?"))


async def login(host, port, user, database, timeout):
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(startup_packet(user, database))
        await writer.drain()
        while True:
            header = await asyncio.wait_for(reader.readexactly(5), timeout)
            tag = header[0:1]
            (length,) = struct.unpack("!i", header[1:5])
            body = await asyncio.wait_for(reader.readexactly(length - 4), timeout)
            if tag == b"R":
                (code,) = struct.unpack("!i", body[:4])
                if code != 0:
                    raise RuntimeError("server asked for authentication (code %d); trust expected" % code)
            elif tag == b"E":
                raise RuntimeError(error_text(body))
            elif tag == b"Z":
                return reader, writer
            # ParameterStatus, BackendKeyData, NoticeResponse: ignored.
    except BaseException:
        writer.close()
        raise


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("-n", "--clients", type=int, required=True)
    ap.add_argument("--user", default="postgres")
    ap.add_argument("--database", default="postgres")
    ap.add_argument("--concurrency", type=int, default=100,
                    help="logins in flight at once (keeps under the listen backlog)")
    ap.add_argument("--timeout", type=float, default=30.0, help="per-login timeout, seconds")
    ap.add_argument("--hold", type=float, default=600.0, help="give up holding after this many seconds")
    ap.add_argument("--watch-stdin", action="store_true", help="also release when stdin reaches EOF")
    args = ap.parse_args()

    limit = raise_fd_limit(args.clients + 1024)
    if limit < args.clients + 16:
        print("idle_clients: fd limit %d is too low for %d clients" % (limit, args.clients), file=sys.stderr)
        return 1

    sem = asyncio.Semaphore(args.concurrency)
    conns = []

    async def one():
        async with sem:
            conns.append(await login(args.host, args.port, args.user, args.database, args.timeout))

    results = await asyncio.gather(*(one() for _ in range(args.clients)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    status = 0
    if errors:
        print("idle_clients: %d of %d logins failed; first: %r" % (len(errors), args.clients, errors[0]),
              file=sys.stderr)
        status = 1
    else:
        print("ready %d" % len(conns), flush=True)
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: done.done() or done.set_result(None))

        def on_stdin():
            if not sys.stdin.buffer.raw.read(4096):
                loop.remove_reader(sys.stdin.fileno())
                if not done.done():
                    done.set_result(None)

        if args.watch_stdin:
            loop.add_reader(sys.stdin.fileno(), on_stdin)
        try:
            await asyncio.wait_for(done, args.hold)
        except asyncio.TimeoutError:
            pass

    for _, writer in conns:
        try:
            writer.write(b"X\0\0\0\4")
            writer.close()
        except Exception:
            pass
    await asyncio.sleep(0.2)
    return status


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
