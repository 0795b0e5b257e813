//! Which cgroups a scope selects: a path or glob below the cgroup2 root, a systemd unit wherever
//! it sits, or a container by id prefix under any common runtime and cgroup driver.

use std::fmt;

use globset::{Glob, GlobBuilder, GlobMatcher};

/// Unit types that get a cgroup of their own.
const UNIT_SUFFIXES: [&str; 6] = [".service", ".scope", ".slice", ".socket", ".mount", ".swap"];
/// Shortest container id prefix accepted: shorter ones select containers by accident.
const MIN_CONTAINER_PREFIX: usize = 6;
/// How runtimes name a container's cgroup under the systemd driver (prefix, suffix). Under the
/// cgroupfs driver the cgroup is the bare 64-digit id (`docker/<id>`, `kubepods/…/<id>`).
const CONTAINER_SCOPES: [(&str, &str); 4] = [
    ("docker-", ".scope"),
    ("cri-containerd-", ".scope"),
    ("crio-", ".scope"),
    ("libpod-", ".scope"),
];

#[derive(Clone, Debug)]
pub enum Selector {
    /// An exact path relative to the cgroup2 root.
    Path(String),
    /// A glob relative to the cgroup2 root: `*` stays within one level, `**` crosses levels.
    Glob(String, GlobMatcher),
    /// A systemd unit or slice, wherever it sits in the tree.
    Unit(String),
    /// A container whose id starts with this (lower-case hex).
    Container(String),
}

impl PartialEq for Selector {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}

impl Eq for Selector {}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Path(path) | Selector::Glob(path, _) => write!(f, "cgroup {path}"),
            Selector::Unit(unit) => write!(f, "unit {unit}"),
            Selector::Container(id) => write!(f, "container {id}"),
        }
    }
}

impl Selector {
    /// `cgroup = "…"`: a relative path or glob.
    pub fn cgroup(text: &str) -> Result<Self, String> {
        let trimmed = text.trim_matches('/');
        if trimmed.is_empty() {
            return Err(format!(
                "cgroup `{text}` names the cgroup2 root; a scope must name a cgroup below it"
            ));
        }
        if let Some(bad) = trimmed
            .split('/')
            .find(|part| part.is_empty() || *part == "." || *part == ".." || part.contains('\0'))
        {
            return Err(format!(
                "cgroup `{text}` has an invalid component `{bad}` (paths are relative to the cgroup2 root, without '.', '..' or '//')"
            ));
        }
        if !trimmed.contains(['*', '?', '[', '{']) {
            return Ok(Selector::Path(trimmed.to_owned()));
        }
        let glob: Glob = GlobBuilder::new(trimmed)
            .literal_separator(true)
            .build()
            .map_err(|error| format!("cgroup glob `{text}`: {}", error.kind()))?;
        Ok(Selector::Glob(trimmed.to_owned(), glob.compile_matcher()))
    }

    /// `unit = "…"`: a unit name with its type suffix.
    pub fn unit(text: &str) -> Result<Self, String> {
        let valid = !text.is_empty()
            && !text.contains('/')
            && UNIT_SUFFIXES
                .iter()
                .any(|suffix| text.len() > suffix.len() && text.ends_with(suffix));
        if !valid {
            return Err(format!(
                "unit `{text}` must be a unit name with its type, e.g. nginx.service or batch.slice"
            ));
        }
        Ok(Selector::Unit(text.to_owned()))
    }

    /// `container = "…"`: an id or id prefix.
    pub fn container(text: &str) -> Result<Self, String> {
        let id = text.to_ascii_lowercase();
        if id.len() < MIN_CONTAINER_PREFIX
            || id.len() > 64
            || !id.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(format!(
                "container `{text}` must be a container id or a prefix of at least {MIN_CONTAINER_PREFIX} hex digits"
            ));
        }
        Ok(Selector::Container(id))
    }

    /// What `status` shows: the path itself for a path, else the kind and value.
    pub fn label(&self) -> String {
        match self {
            Selector::Path(path) => path.clone(),
            other => other.to_string(),
        }
    }

    /// Whether the cgroup at `relative` (to the cgroup2 root) is selected.
    pub fn matches(&self, relative: &str) -> bool {
        let leaf = relative.rsplit('/').next().unwrap_or(relative);
        match self {
            Selector::Path(path) => path == relative,
            Selector::Glob(_, matcher) => matcher.is_match(relative),
            Selector::Unit(unit) => leaf == unit,
            Selector::Container(prefix) => {
                container_id(leaf).is_some_and(|id| id.starts_with(prefix.as_str()))
            }
        }
    }
}

/// The container id a cgroup's own name carries, if any.
fn container_id(leaf: &str) -> Option<&str> {
    let id = CONTAINER_SCOPES
        .iter()
        .find_map(|(prefix, suffix)| leaf.strip_prefix(prefix)?.strip_suffix(suffix))
        .unwrap_or(leaf);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("fixtures/cgroup-paths.txt");

    fn selected(selector: &Selector) -> Vec<&'static str> {
        FIXTURE
            .lines()
            .filter(|line| !line.starts_with('#') && !line.is_empty())
            .filter(|path| selector.matches(path))
            .collect()
    }

    #[test]
    fn paths_select_exactly_one_cgroup() {
        let selector = Selector::cgroup("/system.slice/nginx.service/").expect("valid");
        assert_eq!(selected(&selector), ["system.slice/nginx.service"]);
        assert_eq!(selector.label(), "system.slice/nginx.service");
    }

    #[test]
    fn globs_stay_in_one_level_unless_doubled() {
        let docker = Selector::cgroup("system.slice/docker-*.scope").expect("valid");
        assert_eq!(selected(&docker).len(), 2);
        let pods = Selector::cgroup("kubepods.slice/**").expect("valid");
        assert_eq!(selected(&pods).len(), 5, "{:?}", selected(&pods));
        let one_level = Selector::cgroup("kubepods.slice/*").expect("valid");
        assert_eq!(
            selected(&one_level),
            ["kubepods.slice/kubepods-besteffort.slice"]
        );
        assert!(Selector::cgroup("a/[").is_err());
    }

    #[test]
    fn units_match_wherever_they_sit() {
        let nginx = Selector::unit("nginx.service").expect("valid");
        assert_eq!(
            selected(&nginx),
            [
                "system.slice/nginx.service",
                "user.slice/user-1000.slice/user@1000.service/app.slice/nginx.service"
            ]
        );
        assert!(Selector::unit("nginx").is_err());
        assert!(Selector::unit("a/b.service").is_err());
    }

    #[test]
    fn containers_resolve_under_every_runtime_and_driver() {
        for (prefix, expected) in [
            (
                "4f1e2d3c4b5a",
                "system.slice/docker-4f1e2d3c4b5a69788796a5b4c3d2e1f001122334455667788990aabbccddeeff.scope",
            ),
            (
                "0123456789AB",
                "docker/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            ),
            (
                "b7e8f9a0",
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod9a3c1d2e_5f6b_4c7d_8e9f_0a1b2c3d4e5f.slice/cri-containerd-b7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8.scope",
            ),
            (
                "c0ffee",
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod11111111_2222_3333_4444_555555555555.slice/crio-c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00.scope",
            ),
            (
                "e1e2e3e4",
                "kubepods/besteffort/pod9a3c1d2e-5f6b-4c7d-8e9f-0a1b2c3d4e5f/e1e2e3e4e5e6e7e8e9eaebecedeeeff0e1e2e3e4e5e6e7e8e9eaebecedeeeff0",
            ),
            // podman: the scope, not its conmon sibling; the inner `container` cgroup inherits.
            (
                "5e5e5e5e",
                "machine.slice/libpod-5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e.scope",
            ),
        ] {
            let selector = Selector::container(prefix).expect("valid");
            assert_eq!(selected(&selector), [expected], "prefix {prefix}");
        }
        assert!(Selector::container("abc").is_err(), "too short");
        assert!(Selector::container("xyz123").is_err(), "not hex");
    }
}
