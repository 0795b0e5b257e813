use super::*;

fn errors_of(text: &str) -> Vec<String> {
    match parse(text) {
        Ok(policy) => panic!("expected errors, got {policy:?}"),
        Err(errors) => errors.0.iter().map(ToString::to_string).collect(),
    }
}

const WEB: &str = r#"
mode = "enforce"
[[scope]]
name = "web"
cgroup = "/system.slice/web.service/"
ephemeral = "40000-40999"
bind = ["8080", "9000-9010", 443]
mode = "audit"
"#;

#[test]
fn parses_a_full_scope() {
    let policy = parse(WEB).expect("valid policy");
    assert_eq!(policy.mode, Mode::Enforce);
    let scope = &policy.scopes[0];
    assert_eq!(scope.name, "web");
    assert_eq!(scope.selector.label(), "system.slice/web.service");
    assert_eq!(scope.ephemeral, PortRange::new(40000, 40999));
    assert_eq!(
        scope.bind,
        Some(vec![
            PortRange::new(8080, 8080),
            PortRange::new(9000, 9010),
            PortRange::new(443, 443)
        ])
    );
    assert_eq!(scope.mode, Some(Mode::Audit));
    assert_eq!(scope.effective_mode(policy.mode), Mode::Audit);
    assert_eq!(scope.at, Location { line: 3, column: 1 });
}

#[test]
fn embedded_default_is_observe_without_scopes() {
    let policy = parse(crate::policy::EMBEDDED_DEFAULT).expect("embedded default parses");
    assert_eq!(policy.mode, Mode::Observe);
    assert!(policy.scopes.is_empty());
}

#[test]
fn syntax_error_is_located() {
    let errors = errors_of("mode = \"enforce\"\n[[scope]\n");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].starts_with("2:"), "{errors:?}");
}

#[test]
fn unknown_keys_at_both_levels() {
    let errors = errors_of(
        "colour = 1\n[[scope]]\nname = \"a\"\ncgroup = \"a\"\nephemeral = \"1000-1001\"\nport = 3\n",
    );
    assert_eq!(
        errors,
        [
            "1:1: unknown key `colour` in top level (expected one of: mode, reserve, scope)",
            "6:1: unknown key `port` in scope (expected one of: name, cgroup, unit, container, ephemeral, pool, block, bind, mode, strict, share)",
        ]
    );
}

#[test]
fn every_bad_value_is_reported_at_once() {
    let errors = errors_of(
        r#"mode = "loud"
[[scope]]
name = "Web!"
cgroup = "../etc"
ephemeral = "500-400"
bind = ["0", "70000", true]
mode = "observe"
strict = "yes"
"#,
    );
    assert_eq!(
        errors,
        [
            "1:8: mode `loud` is not one of: enforce, audit, observe",
            "3:8: scope name `Web!` must be 1-64 characters of a-z, 0-9, '_' and '-'",
            "4:10: cgroup `../etc` has an invalid component `..` (paths are relative to the cgroup2 root, without '.', '..' or '//')",
            "5:13: `ephemeral`: range 500-400 is inverted (first port above last)",
            "6:9: `bind`: port 0 is outside 1-65535",
            "6:14: `bind`: port 70000 is outside 1-65535",
            "6:23: `bind` entries must be \"port\" or \"lo-hi\" strings, found a boolean",
            "7:8: mode `observe` is not one of: enforce, audit",
            "8:10: `strict` must be true or false, found a string",
        ]
    );
}

#[test]
fn missing_keys_and_wrong_types() {
    let errors = errors_of("scope = 3\n");
    assert_eq!(
        errors,
        ["1:9: `scope` must be an array of tables ([[scope]]), found an integer"]
    );
    let errors = errors_of("[[scope]]\nname = \"a\"\nephemeral = 40000\n");
    assert_eq!(
        errors,
        [
            "1:1: scope needs one of `cgroup`, `unit` or `container`",
            "3:13: `ephemeral` must be a string, found an integer",
        ]
    );
}

#[test]
fn duplicates_and_overlaps_name_both_scopes() {
    let errors = errors_of(
        r#"
[[scope]]
name = "a"
cgroup = "x.slice"
ephemeral = "40000-40999"
[[scope]]
name = "a"
cgroup = "x.slice/"
ephemeral = "40500-41000"
[[scope]]
name = "c"
cgroup = "c.slice"
ephemeral = "50000-50009"
bind = ["40990-41010"]
"#,
    );
    assert_eq!(
        errors,
        [
            "6:1: scope name `a` is used twice (first at line 2)",
            "6:1: scopes `a` and `a` both select cgroup x.slice",
            "6:1: ephemeral ranges of scopes `a` (40000-40999) and `a` (40500-41000) overlap on ports 40500-40999",
            "10:1: bind entry 40990-41010 of scope `c` lies in the ephemeral range of scope `a` (40000-40999) on ports 40990-40999",
            "10:1: bind entry 40990-41010 of scope `c` lies in the ephemeral range of scope `a` (40500-41000) on ports 40990-41000",
        ]
    );
}

#[test]
fn root_cgroup_is_refused() {
    let errors = errors_of("[[scope]]\nname = \"a\"\ncgroup = \"/\"\nephemeral = \"1-2\"\n");
    assert_eq!(
        errors,
        ["3:10: cgroup `/` names the cgroup2 root; a scope must name a cgroup below it"]
    );
}

#[test]
fn non_utf8_columns_count_characters() {
    assert_eq!(Location::of("é\nab€c", 7), Location { line: 2, column: 3 });
}

#[test]
fn selectors_are_exactly_one_of_three() {
    let policy = parse(
        "[[scope]]\nname = \"a\"\nunit = \"nginx.service\"\nephemeral = \"1000-1001\"\n\
         [[scope]]\nname = \"b\"\ncontainer = \"4F1E2D3C\"\nephemeral = \"1002-1003\"\n\
         [[scope]]\nname = \"c\"\ncgroup = \"kubepods.slice/**\"\nephemeral = \"1004-1005\"\n",
    )
    .expect("valid");
    let selectors: Vec<String> = policy
        .scopes
        .iter()
        .map(|s| s.selector.to_string())
        .collect();
    assert_eq!(
        selectors,
        [
            "unit nginx.service",
            "container 4f1e2d3c",
            "cgroup kubepods.slice/**"
        ]
    );
    let errors = errors_of(
        "[[scope]]\nname = \"a\"\nunit = \"nginx\"\ncgroup = \"x\"\nephemeral = \"1-2\"\n\
         [[scope]]\nname = \"b\"\ncontainer = \"abc\"\nephemeral = \"3-4\"\n",
    );
    assert_eq!(
        errors,
        [
            "4:10: scope has more than one of `cgroup`, `unit` and `container` (unit, cgroup); give exactly one",
            "8:13: container `abc` must be a container id or a prefix of at least 6 hex digits",
        ]
    );
}

#[test]
fn pools_give_blocks_and_are_checked() {
    let policy = parse(
        "[[scope]]\nname = \"pods\"\ncgroup = \"k/*\"\npool = \"40000-40999\"\nblock = 100\n",
    )
    .expect("valid");
    assert_eq!(policy.scopes[0].ephemeral, PortRange::new(40000, 40999));
    assert_eq!(policy.scopes[0].block, Some(100));
    let errors = errors_of(
        "[[scope]]\nname = \"a\"\ncgroup = \"a\"\npool = \"1000-1009\"\nblock = 11\n\
         [[scope]]\nname = \"b\"\ncgroup = \"b\"\npool = \"2000-2009\"\n\
         [[scope]]\nname = \"c\"\ncgroup = \"c\"\nephemeral = \"3000-3009\"\npool = \"4000-4009\"\nblock = 1\n",
    );
    assert_eq!(
        errors,
        [
            "5:9: `block` must be a whole number of ports from 1 to 10 (the pool's size)",
            "9:8: `pool` needs `block`, the ports each cgroup gets",
            "14:8: give either `ephemeral` or `pool`, not both",
        ]
    );
}

#[test]
fn more_scopes_than_the_maps_hold_is_a_located_error() {
    let scope = |i: usize| {
        format!(
            "[[scope]]\nname = \"s{i}\"\ncgroup = \"c{i}\"\nephemeral = \"{}\"\n",
            1000 + i
        )
    };
    let fits: String = (0..MAX_SCOPES as usize).map(scope).collect();
    let policy = parse(&fits).expect("MAX_SCOPES scopes fit");
    let ids = crate::policy::assign_ids(&[], &policy).expect("ids for every scope");
    crate::policy::compile(&policy, &ids).expect("compiles");
    let too_many: String = (0..=MAX_SCOPES as usize).map(scope).collect();
    assert_eq!(
        errors_of(&too_many),
        [format!(
            "{}:1: too many scopes: at most {MAX_SCOPES} are supported, this is scope {}",
            4 * MAX_SCOPES + 1,
            MAX_SCOPES + 1
        )]
    );
}
