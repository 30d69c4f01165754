//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz / libFuzzer) and for the
//! unit tests that replay the inputs they found. Each runs one parser or state machine
//! of the proxy over arbitrary bytes; the only expected outcome is "no panic, no hang,
//! bounded memory". Not part of the proxy's API.

use bytes::BytesMut;

use crate::auth::{ScramServer, ScramVerifier, Secret};
use crate::protocol::framing::{backend_header, be, fe, frontend_header, AUTH_MESSAGE_LIMIT};
use crate::protocol::messages;
use crate::protocol::startup::{parse_startup, startup_len};
use crate::session::tracker::{Effects, Req, Tracker};

/// Opening packets: what `handshake::read_opening` does with each packet.
pub fn startup(data: &[u8]) {
    let mut rest = data;
    while rest.len() >= 4 {
        let prefix = [rest[0], rest[1], rest[2], rest[3]];
        let Ok(len) = startup_len(prefix) else {
            // The handshake stops here too; also try the parser on the raw bytes.
            let _ = parse_startup(rest);
            return;
        };
        let Some(packet) = rest.get(..len) else {
            return;
        };
        let _ = parse_startup(packet);
        rest = &rest[len..];
    }
}

/// Client frames after login, with the body inspection transaction mode does.
pub fn frontend(data: &[u8]) {
    let mut rest = data;
    // A small cap so that large declared lengths are exercised as "too long".
    while let Ok(Some(h)) = frontend_header(rest, 1 << 16) {
        let Some(frame) = rest.get(..h.frame_len()) else {
            return;
        };
        let body = &frame[5..];
        let mut out = BytesMut::new();
        match h.tag {
            fe::PARSE => {
                if let Some(p) = messages::parse_parse(body) {
                    messages::fe_parse(&mut out, p.name, p.query, p.param_types);
                    let _ = messages::parse_parse(&out[5..]).map(|q| assert_eq!(q.query, p.query));
                }
            }
            fe::BIND => {
                if let Some((portal, _stmt, rest)) = messages::parse_bind(body) {
                    messages::rebuild_bind(&mut out, body, portal, b"pgsidecar_s1", rest);
                    let again = messages::parse_bind(&out[5..]);
                    assert!(matches!(again, Some((_, b"pgsidecar_s1", _))));
                }
            }
            fe::DESCRIBE | fe::CLOSE => {
                if let Some((_, name)) = messages::parse_target(body) {
                    messages::rebuild_describe_statement(&mut out, name);
                }
            }
            fe::PASSWORD if h.len <= AUTH_MESSAGE_LIMIT => {
                let _ = crate::session::handshake::parse_sasl_initial(body);
            }
            _ => {}
        }
        rest = &rest[h.frame_len()..];
    }
}

/// Server frames through the response tracker, as `Session::scan_server` feeds them.
/// The first byte chooses the requests in flight.
pub fn backend(data: &[u8]) {
    let Some((&plan, mut rest)) = data.split_first() else {
        return;
    };
    let mut t = Tracker::default();
    let (mut emit, mut fx) = (BytesMut::new(), Effects::default());
    let push_plan = |t: &mut Tracker, emit: &mut BytesMut, fx: &mut Effects, plan: u8| {
        for bit in 0..8 {
            if plan & (1 << bit) == 0 {
                continue;
            }
            let req = match bit {
                0 => Req::Query,
                1 => Req::Injected,
                2 => Req::Parse {
                    stmt: Some(u128::from(plan)),
                    client_name: Some(b"s".to_vec().into()),
                    injected: plan & 0x80 != 0,
                },
                3 => Req::Bind,
                4 => Req::DescribeStatement,
                5 => Req::Execute,
                6 => crate::session::tracker::synthetic_parse_complete(),
                _ => Req::Sync,
            };
            t.push(req, emit, fx);
        }
    };
    push_plan(&mut t, &mut emit, &mut fx, plan);
    while let Ok(Some(h)) = backend_header(rest, 1 << 16) {
        let Some(frame) = rest.get(..h.frame_len()) else {
            return;
        };
        let body = &frame[5..];
        match h.tag {
            be::ERROR_RESPONSE | be::NOTICE_RESPONSE => {
                let _ = messages::error_fields(body);
            }
            be::PARAMETER_STATUS => {
                let _ = messages::parse_parameter_status(body);
            }
            _ => {}
        }
        t.on_server(h.tag, body, &mut emit, &mut fx);
        if t.is_empty() {
            push_plan(&mut t, &mut emit, &mut fx, h.tag);
        }
        // The session forwards synthetic answers; keep memory bounded here too.
        emit.clear();
        fx.take();
        rest = &rest[h.frame_len()..];
    }
}

/// Server nonce used by [`scram`] so the fuzzer can reach the client-final checks.
pub const SCRAM_FUZZ_NONCE: &[u8] = b"FUZZNONCE";

/// A SCRAM exchange: client-first, then client-final (split at the first 0xff); plus
/// verifier and secret parsing of the whole input.
pub fn scram(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = ScramVerifier::parse(&text);
    let _ = Secret::parse(&text).kind();
    let (first, fin) = match data.iter().position(|&b| b == 0xff) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    // One iteration: the point is the message handling, not PBKDF2.
    let verifier = ScramVerifier::from_password("pencil", b"saltsalt", 1);
    let mut server = ScramServer::from_verifier(verifier);
    if server
        .handle_client_first_with_nonce(first, SCRAM_FUZZ_NONCE)
        .is_ok()
    {
        let _ = server.handle_client_final(fin);
    }
    // A second message after the end must be refused, never panic.
    let _ = server.handle_client_final(fin);
}

/// The YAML config loader: `${VAR}` / `${VAR:-default}` expansion, then parsing and
/// validation, with an environment in which names of even length are set.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let env = |name: &str| (name.len() % 2 == 0).then(|| format!("v{}", name.len()));
    if let Ok(expanded) = crate::config::expand_str(&text, &env) {
        // Text without `$` comes back unchanged.
        if !text.contains('$') {
            assert_eq!(expanded, text);
        }
    }
    if let Ok(config) = crate::config::Config::parse(&text, &env) {
        let _ = config.validate();
    }
}

/// One observation of the incremental server scan: a frame's type, length, whether it
/// was forwarded and (for frames read whole) its body.
type Seen = (u8, usize, bool, Vec<u8>);

/// Builds a stream of well-formed server frames from `data` (type byte, body length
/// byte, body), then scans it as `Session::scan_server` does (same `Inbound`, header
/// check, streamed/whole rule and response tracker), once whole and once fed in chunks
/// whose sizes come from the input: frames, decisions and forwarded bytes must match.
pub fn chunked(data: &[u8]) {
    let Some((&plan, rest)) = data.split_first() else {
        return;
    };
    let mut stream = Vec::new();
    let mut sizes = Vec::new();
    let mut it = rest.iter().copied();
    while let (Some(tag), Some(n)) = (it.next(), it.next()) {
        let body: Vec<u8> = it.by_ref().take(usize::from(n)).collect();
        stream.push(tag);
        stream.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        stream.extend_from_slice(&body);
        sizes.push(usize::from(tag % 7) + usize::from(n % 5));
    }
    let whole = scan_in_chunks(plan, &stream, &[stream.len().max(1)]);
    let split = scan_in_chunks(plan, &stream, &sizes);
    assert_eq!(whole, split, "the split changed what the scanner saw");
}

fn scan_in_chunks(plan: u8, stream: &[u8], sizes: &[usize]) -> (Vec<Seen>, Vec<u8>) {
    use crate::protocol::framing::BACKEND_WHOLE_MESSAGE_LIMIT;
    use crate::session::relay::{BodyMode, Inbound};
    let mut t = Tracker::default();
    let (mut emit, mut fx) = (BytesMut::new(), Effects::default());
    t.push(Req::Query, &mut emit, &mut fx);
    if plan & 1 != 0 {
        t.push(Req::Bind, &mut emit, &mut fx);
        t.push(Req::Execute, &mut emit, &mut fx);
        t.push(Req::Sync, &mut emit, &mut fx);
    }
    let mut inb = Inbound::default();
    let (mut seen, mut out) = (Vec::new(), Vec::new());
    let mut fed = 0;
    let mut chunk = sizes.iter().cycle();
    let waker = noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    while fed < stream.len() {
        let n = chunk
            .next()
            .copied()
            .unwrap_or(1)
            .max(1)
            .min(stream.len() - fed);
        inb.buf.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
        loop {
            if inb.body_left > 0 {
                inb.continue_body();
                if inb.body_left > 0 {
                    break;
                }
                continue;
            }
            let avail = inb.unscanned().len();
            let h = match backend_header(inb.unscanned(), 1 << 30) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => panic!("well-formed stream refused: {e}"),
            };
            let streamed = matches!(
                h.tag,
                be::DATA_ROW
                    | be::COPY_DATA
                    | be::FUNCTION_CALL_RESPONSE
                    | be::PARAMETER_DESCRIPTION
            );
            assert!(streamed || h.len <= BACKEND_WHOLE_MESSAGE_LIMIT);
            if !streamed && avail < h.frame_len() {
                inb.need = h.frame_len() as u32;
                break;
            }
            inb.need = 0;
            let body = if streamed {
                Vec::new()
            } else {
                inb.buf[inb.scanned + 5..inb.scanned + h.frame_len()].to_vec()
            };
            let forward = t.on_server(h.tag, &body, &mut emit, &mut fx);
            if t.is_empty() {
                t.push(Req::Query, &mut emit, &mut fx);
            }
            // Synthetic answers are queued in order, as the session does.
            inb.push_own(&emit);
            emit.clear();
            fx.take();
            let mode = if forward {
                BodyMode::Forward
            } else {
                BodyMode::Skip
            };
            inb.take_frame(h.frame_len(), mode);
            seen.push((h.tag, h.len, forward, body));
        }
        let mut w = VecWriter(&mut out);
        let drained = inb.poll_drain(&mut cx, &mut w);
        assert!(matches!(drained, std::task::Poll::Ready(Ok(()))));
    }
    assert_eq!(inb.body_left, 0, "a whole stream leaves no body pending");
    assert!(inb.unscanned().is_empty());
    (seen, out)
}

struct VecWriter<'a>(&'a mut Vec<u8>);

impl tokio::io::AsyncWrite for VecWriter<'_> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.get_mut().0.extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

fn noop_waker() -> std::task::Waker {
    std::task::Waker::noop().clone()
}

/// Replays the committed corpora and every input a fuzzer ever crashed on
/// (`fuzz/regressions/<target>/`), then runs a short deterministic mutation loop: a
/// stable-Rust smoke test of the same entry points, part of the normal test suite.
#[cfg(test)]
mod tests {
    use std::path::Path;

    type Target = (&'static str, fn(&[u8]));
    const TARGETS: [Target; 6] = [
        ("startup", super::startup),
        ("config", super::config),
        ("chunked", super::chunked),
        ("frontend", super::frontend),
        ("backend", super::backend),
        ("scram", super::scram),
    ];

    fn inputs(target: &str) -> Vec<Vec<u8>> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        let mut out = Vec::new();
        for dir in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
                continue;
            };
            for e in entries.flatten() {
                if let Ok(bytes) = std::fs::read(e.path()) {
                    out.push(bytes);
                }
            }
        }
        out
    }

    #[test]
    fn corpora_and_regressions_replay_cleanly() {
        for (name, run) in TARGETS {
            let inputs = inputs(name);
            assert!(!inputs.is_empty(), "no seed corpus for {name}");
            for input in inputs {
                run(&input);
            }
        }
    }

    #[test]
    fn mutated_seeds_do_not_panic() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for (name, run) in TARGETS {
            let seeds = inputs(name);
            for _ in 0..3000 {
                let mut input = seeds[(next() as usize) % seeds.len()].clone();
                for _ in 0..(1 + next() % 8) {
                    let r = next();
                    let at = if input.is_empty() {
                        0
                    } else {
                        (r as usize >> 8) % input.len()
                    };
                    match r % 4 {
                        0 if !input.is_empty() => input[at] = (r >> 32) as u8,
                        1 => input.insert(at, (r >> 40) as u8),
                        2 if !input.is_empty() => {
                            input.remove(at);
                        }
                        _ => {
                            // Splice in a length-like value: the classic source of bugs.
                            let v = [0u8, 0xff, 0x7f, 0x80][(r >> 16) as usize % 4];
                            input.splice(at..at, [v, v, v, v ^ 0x04]);
                        }
                    }
                }
                run(&input);
            }
        }
    }
}
