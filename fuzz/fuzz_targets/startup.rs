//! The opening packets: length prefix check, then StartupMessage / SSLRequest /
//! GSSENCRequest / CancelRequest parsing, on arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pgsidecar::fuzzing::startup(data);
});
