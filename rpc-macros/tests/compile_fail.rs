//! Signatures `#[service]` cannot serve are refused at compile time, with an
//! error on the offending item that says what to write instead.

#[test]
fn bad_signatures_get_clear_compile_errors() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/*.rs");
}
