//! Test support: replays a fuzz target's committed corpus (`fuzz/corpus/<target>`)
//! through its oracle, so that every input the fuzzer kept is checked on every CI run,
//! on the stable toolchain. Compiled only for tests.

/// Runs `oracle` on every file of `fuzz/corpus/<target>` (there must be some).
pub fn replay(target: &str, oracle: impl Fn(&[u8])) {
    let dir = format!("{}/fuzz/corpus/{target}", env!("CARGO_MANIFEST_DIR"));
    let inputs: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
    assert!(!inputs.is_empty(), "{dir} is empty");
    for input in inputs {
        oracle(&std::fs::read(input.path()).unwrap());
    }
}
