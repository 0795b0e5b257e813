//! Puts the figures the reliability tests recorded into the README's RELIABILITY section.

use std::{fs, path::Path};

use anyhow::Context as _;

const BEGIN: &str = "<!-- reliability:begin (written by cargo xtask test) -->";
const END: &str = "<!-- reliability:end -->";

/// Replaces the text between the README's markers with the fragments under
/// `target/reliability/`, sorted by name. Does nothing when no test recorded a figure (an
/// unprivileged run), so a skipped run never blanks the section.
pub fn update_readme(root: &Path) -> anyhow::Result<()> {
    let dir = root.join("target/reliability");
    let Ok(entries) = fs::read_dir(&dir) else {
        return Ok(());
    };
    let mut fragments: Vec<_> = entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    if fragments.is_empty() {
        return Ok(());
    }
    fragments.sort();
    let mut body = String::new();
    for path in &fragments {
        body += &fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    }
    let readme_path = root.join("README.md");
    let readme = fs::read_to_string(&readme_path).context("reading README.md")?;
    let (Some(start), Some(end)) = (readme.find(BEGIN), readme.find(END)) else {
        anyhow::bail!("README.md lacks the RELIABILITY markers `{BEGIN}` … `{END}`");
    };
    let updated = format!("{}{BEGIN}\n{body}{}", &readme[..start], &readme[end..]);
    if updated != readme {
        fs::write(&readme_path, updated).context("writing README.md")?;
        println!(
            "README.md: RELIABILITY section updated from {} figures",
            fragments.len()
        );
    }
    Ok(())
}
