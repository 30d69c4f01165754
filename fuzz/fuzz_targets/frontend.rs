//! Client message framing and the bodies the proxy inspects (Parse, Bind, Describe,
//! Close, password messages), on an arbitrary byte stream.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pgsidecar::fuzzing::frontend(data);
});
