//! Well-formed server frames scanned whole and split into chunks: same frames, same output.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pgsidecar::fuzzing::chunked(data);
});
