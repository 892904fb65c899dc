//! Not a fuzz target: reads a corpus directory of the `server` or `client`
//! target and prints how many of its inputs got past framing into body
//! decoding (the share the proptest targets print for theirs).
//!
//! ```sh
//! cargo +nightly run --release --bin plan_stats -- corpus/server
//! ```

#[path = "../../rpc-core/tests/common/hostile.rs"]
mod hostile;

fn main() {
    let dir = std::env::args().nth(1).expect("usage: plan_stats CORPUS_DIR");
    let (mut inputs, mut past, mut bodies, mut frames) = (0usize, 0usize, 0usize, 0usize);
    for entry in std::fs::read_dir(&dir).expect("a corpus directory") {
        let data = std::fs::read(entry.expect("a directory entry").path()).expect("a file");
        let seen = hostile::classify(&hostile::Plan::from_bytes(&data));
        inputs += 1;
        past += usize::from(seen.bodies_decoded > 0);
        bodies += seen.bodies_decoded;
        frames += seen.frames_valid;
    }
    println!(
        "{dir}: {inputs} inputs, {past} ({:.0} %) past framing into body decoding; {bodies} bodies decoded, {frames} valid frames",
        100.0 * past as f64 / inputs.max(1) as f64
    );
}
