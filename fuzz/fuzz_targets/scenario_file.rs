//! The testbench's scenario-file parser (contributors write these by hand):
//! any text gives scenarios or problems with a line number, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let lines = text.lines().count().max(1);
    if let Err(problems) = testbench::scenario::parse(text) {
        assert!(!problems.is_empty());
        for p in problems {
            // Line 0 stands for the file as a whole.
            assert!(p.line <= lines + 1, "problem at line {} of {lines}: {}", p.line, p.message);
        }
    }
});
