//! Server message framing and the session's response tracker, on an arbitrary byte
//! stream (as if from a hostile or broken server).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pgsidecar::fuzzing::backend(data);
});
