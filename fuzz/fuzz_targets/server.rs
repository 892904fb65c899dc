//! A server connection facing a hostile client: the input is a plan (see
//! `rpc-core/tests/common/hostile.rs`, shared with the stable proptest
//! targets) of frames, mutated bodies, raw bytes and time passing.

#![no_main]

#[path = "../../rpc-core/tests/common/hostile.rs"]
mod hostile;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let plan = hostile::Plan::from_bytes(data);
    if let Err(e) = hostile::run_paused(hostile::run_server(&plan)) {
        panic!("{e}\n{plan:?}");
    }
});
