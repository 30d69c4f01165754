//! The server side of a SCRAM-SHA-256 exchange: client-first then client-final, split
//! from the input at the first 0xff byte; plus verifier parsing.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pgsidecar::fuzzing::scram(data);
});
