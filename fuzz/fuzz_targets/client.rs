//! A client connection facing a hostile server while it makes calls: stray
//! and deeply nested replies, requests, floods, odd `Hello`s (the plan of
//! `rpc-core/tests/common/hostile.rs`).

#![no_main]

#[path = "../../rpc-core/tests/common/hostile.rs"]
mod hostile;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let plan = hostile::Plan::from_bytes(data);
    if let Err(e) = hostile::run_paused(hostile::run_client(&plan)) {
        panic!("{e}\n{plan:?}");
    }
});
