//! The cargo-fuzz targets in `fuzz/`: installing cargo-fuzz, and a short bounded run of each
//! target in `cargo xtask test`.

use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::{cmd, reliability};

/// The targets under `fuzz/fuzz_targets/`, each with its seed corpus in `fuzz/corpus/<target>/`.
const TARGETS: [&str; 2] = ["policy", "request"];
/// How long `cargo xtask test` fuzzes each target.
pub const TEST_SECONDS: u32 = 20;
/// One input taking longer than this is a hang.
const INPUT_TIMEOUT_S: u32 = 10;

/// Installs cargo-fuzz from crates.io unless `cargo fuzz` already runs.
pub fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    if let Some(version) =
        cmd::output(Command::new("rustup").args(["run", "nightly", "cargo", "fuzz", "--version"]))
    {
        eprintln!("xtask: {} is installed", version.trim());
        return Ok(());
    }
    cmd::run(Command::new(cmd::cargo_bin()).args(["install", "cargo-fuzz", "--locked"]))
        .context("installing cargo-fuzz")
}

/// Runs every target for `seconds` on the committed seeds. New inputs go to
/// `target/fuzz-corpus/<target>/` (kept between runs, never into the committed corpus), crashes
/// to `target/fuzz-artifacts/<target>/`. Records the figures for the README.
pub fn run(seconds: u32) -> anyhow::Result<()> {
    let root = cmd::workspace_root();
    let target = root.join("target");
    for name in TARGETS {
        let scratch = target.join("fuzz-corpus").join(name);
        let artifacts = target.join("fuzz-artifacts").join(name);
        let logs = target.join("fuzz-logs");
        for dir in [&scratch, &artifacts, &logs] {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let seeds = root.join("fuzz/corpus").join(name);
        let log_path = logs.join(format!("{name}.log"));
        let log = fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let result = cmd::run(
            Command::new("rustup")
                .args(["run", "nightly", "cargo", "fuzz", "run", "--target-dir"])
                .arg(target.join("fuzz"))
                .arg(name)
                .arg(&scratch)
                .arg(&seeds)
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                .arg(format!("-timeout={INPUT_TIMEOUT_S}"))
                .arg(format!("-artifact_prefix={}/", artifacts.display()))
                .stderr(log),
        );
        let output = fs::read_to_string(&log_path).unwrap_or_default();
        if let Err(error) = result {
            let tail: Vec<&str> = output.lines().rev().take(40).collect();
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
            bail!(
                "fuzz target `{name}` failed: {error:#}; the input is in {}, the whole log in {}",
                artifacts.display(),
                log_path.display()
            );
        }
        let Some(figures) = Figures::read(&output) else {
            bail!(
                "fuzz target `{name}` ran, but its log ({}) has no `Done N runs` line",
                log_path.display()
            );
        };
        let seed_count = count_files(&seeds)?;
        let line = format!(
            "fuzz target `{name}`: {} inputs in {} s, no crash, hang or unlocated error; \
             corpus {} inputs ({seed_count} committed seeds), {} coverage points",
            figures.runs, figures.seconds, figures.corpus, figures.coverage
        );
        println!("xtask: {line}");
        reliability::record(&root, &format!("fuzz-{name}"), &[line])?;
    }
    Ok(())
}

/// What libFuzzer's closing lines say:
/// `#26011 DONE   cov: 5008 ft: 15581 corp: 1001/329Kb …` and `Done 26011 runs in 21 second(s)`.
#[derive(Debug, PartialEq, Eq)]
struct Figures {
    runs: u64,
    seconds: u64,
    corpus: u64,
    coverage: u64,
}

impl Figures {
    fn read(log: &str) -> Option<Self> {
        let done = log.lines().rev().find_map(|line| {
            let rest = line.strip_prefix("Done ")?;
            let (runs, rest) = rest.split_once(" runs in ")?;
            let seconds = rest.split_whitespace().next()?;
            Some((runs.parse().ok()?, seconds.parse().ok()?))
        })?;
        let last = log
            .lines()
            .rev()
            .find(|line| line.split_whitespace().nth(1) == Some("DONE"))?;
        let field = |key: &str| -> Option<u64> {
            let mut words = last.split_whitespace();
            words.find(|word| *word == key)?;
            words.next()?.split('/').next()?.parse().ok()
        };
        Some(Self {
            runs: done.0,
            seconds: done.1,
            corpus: field("corp:")?,
            coverage: field("cov:")?,
        })
    }
}

fn count_files(dir: &Path) -> anyhow::Result<usize> {
    Ok(fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .flatten()
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_file()))
        .count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_closing_lines() {
        let log = "#6\tINITED cov: 3617 ft: 5027 corp: 5/1771b exec/s: 0 rss: 56Mb\n\
                   #26011\tDONE   cov: 5008 ft: 15581 corp: 1001/329Kb lim: 686 exec/s: 1238 rss: 455Mb\n\
                   ###### End of recommended dictionary. ######\n\
                   Done 26011 runs in 21 second(s)\n";
        assert_eq!(
            Figures::read(log),
            Some(Figures {
                runs: 26011,
                seconds: 21,
                corpus: 1001,
                coverage: 5008
            })
        );
        assert_eq!(Figures::read("INFO: Seed: 1\n"), None);
    }
}
