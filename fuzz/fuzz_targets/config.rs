//! The YAML config loader with `${VAR}` expansion, then validation.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pgsidecar::fuzzing::config(data);
});
