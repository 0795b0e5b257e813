//! Figures the reliability tests measure (requests tried, faults injected, sockets checked, lost
//! events), written where `cargo xtask test` collects them into the README's RELIABILITY section,
//! so the section always states what the last full run actually did.

use std::{fs, path::PathBuf};

/// Where the fragments go: `<target>/reliability/`, next to the test binaries.
pub fn figures_dir() -> PathBuf {
    // Test binaries live in <target>/<profile>/deps/.
    let exe = std::env::current_exe().expect("test binary path");
    let target = exe
        .ancestors()
        .nth(3)
        .expect("test binary under <target>/<profile>/deps")
        .to_path_buf();
    target.join("reliability")
}

/// Records one test's figures as Markdown bullet lines under `name` (one file per name; a rerun
/// replaces it). Names sort into the section's order, e.g. `faults-kill-during-reload`.
pub fn record(name: &str, lines: &[String]) {
    let dir = figures_dir();
    fs::create_dir_all(&dir).expect("create reliability figures directory");
    let text: String = lines.iter().map(|line| format!("- {line}\n")).collect();
    fs::write(dir.join(format!("{name}.md")), text).expect("write reliability figures");
}
