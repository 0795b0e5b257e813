//! The policy parser and validator on arbitrary bytes, as `portguard check` and a daemon run it
//! (without host I/O): no panic, no hang, and every error located. A policy `check` accepts
//! must also pass what a daemon does with it before touching the kernel (scope ids and
//! compilation), or `check` would have promised a start that then fails.

#![no_main]

use libfuzzer_sys::fuzz_target;
use portguard::{
    check::summary,
    policy::{assign_ids, compile},
    policy_file::PolicySource,
};

const NAME: &str = "fuzz.toml";

fuzz_target!(|data: &[u8]| {
    let source = match PolicySource::from_bytes(NAME.into(), data.to_vec()) {
        Ok(source) => source,
        Err(error) => {
            // Not UTF-8: located at the first bad byte.
            assert_located(&error.to_string());
            return;
        }
    };
    match source.parse() {
        Ok(policy) => {
            let ids = assign_ids(&[], &policy)
                .unwrap_or_else(|error| panic!("check accepts, the daemon refuses: {error}"));
            compile(&policy, &ids)
                .unwrap_or_else(|error| panic!("check accepts, the daemon refuses: {error}"));
            let text = summary(NAME, &policy);
            assert!(text.starts_with(&format!("{NAME}: valid;")));
        }
        Err(error) => {
            let message = error.to_string();
            let mut lines: Vec<&str> = message.lines().collect();
            // A list of errors ends with a line that counts them; a file refused whole (an
            // empty one) has just its one located error.
            if lines.len() > 1 {
                let count = lines.pop().expect("a count line");
                assert!(count.starts_with(&format!("{NAME}: ")) && count.contains(" error"));
            }
            assert!(
                !lines.is_empty(),
                "an error list without errors: {message:?}"
            );
            for line in lines {
                assert_located(line);
            }
        }
    }
});

/// `fuzz.toml:LINE:COLUMN: message` with LINE and COLUMN from 1 and a non-empty message.
fn assert_located(line: &str) {
    let rest = line
        .strip_prefix(NAME)
        .and_then(|rest| rest.strip_prefix(':'))
        .unwrap_or_else(|| panic!("error not located in the file: {line:?}"));
    let mut parts = rest.splitn(3, ':');
    let (Some(row), Some(column), Some(message)) = (parts.next(), parts.next(), parts.next())
    else {
        panic!("error without line and column: {line:?}");
    };
    for number in [row, column] {
        let number: usize = number
            .parse()
            .unwrap_or_else(|_| panic!("not a line:column location: {line:?}"));
        assert!(number >= 1, "locations count from 1: {line:?}");
    }
    assert!(
        message.starts_with(' ') && message.trim().len() > 1,
        "empty message: {line:?}"
    );
}
