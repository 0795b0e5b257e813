//! The command line as an operator meets it: `check` output and exit codes, refusals, help.

use std::{
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Command, Output},
};

use portguard_tests::portguard_bin;

fn temp_file(name: &str, contents: &[u8]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("portguard-cli-{}-{name}", std::process::id()));
    std::fs::write(&path, contents).expect("write temp file");
    path
}

fn portguard(args: &[&str]) -> Output {
    Command::new(portguard_bin())
        .args(args)
        .output()
        .expect("run portguard")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn check_accepts_a_valid_policy_and_summarises_it() {
    let file = temp_file(
        "valid.toml",
        b"mode = \"enforce\"\n[[scope]]\nname = \"web\"\ncgroup = \"system.slice/web.service\"\nephemeral = \"20000-20999\"\nbind = [\"8080\"]\n",
    );
    let out = portguard(&["check", file.to_str().expect("utf-8 path")]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("valid; mode enforce; 1 scope"), "{stdout}");
    assert!(
        stdout.contains("web: cgroup system.slice/web.service, ephemeral 20000-20999 (1000 ports), explicit binds: 8080, enforce"),
        "{stdout}"
    );
}

#[test]
fn check_reports_every_error_with_line_and_column() {
    let file = temp_file(
        "errors.toml",
        b"mode = \"fast\"\n[[scope]]\nname = \"a\"\ncgroup = \"a\"\nephemeral = \"0-10\"\n[[scope]]\nname = \"a\"\ncgroup = \"b\"\nephemeral = \"100-50\"\nextra = true\n",
    );
    let name = file.to_str().expect("utf-8 path");
    let out = portguard(&["check", name]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    for expected in [
        format!("{name}:1:8: mode `fast` is not one of: enforce, audit, observe"),
        format!("{name}:5:13: `ephemeral`: port 0 is outside 1-65535"),
        format!("{name}:9:13: `ephemeral`: range 100-50 is inverted (first port above last)"),
        format!("{name}:10:1: unknown key `extra` in scope"),
        format!("{name}: 4 errors"),
    ] {
        assert!(
            stderr.contains(&expected),
            "missing `{expected}` in:\n{stderr}"
        );
    }
    assert!(out.stdout.is_empty(), "no summary for a bad policy");
}

#[test]
fn check_refuses_unreadable_input_clearly() {
    let out = portguard(&["check", "/nonexistent/policy.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr)
            .contains("/nonexistent/policy.toml: cannot open the policy: No such file"),
        "{}",
        text(&out.stderr)
    );
    let file = temp_file("latin1.toml", b"mode = \"enforce\"\n# caf\xe9\n");
    let out = portguard(&["check", file.to_str().expect("utf-8 path")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains(":2:6: the policy is not UTF-8 text"),
        "{}",
        text(&out.stderr)
    );
    let out = portguard(&["check", "/"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("/: the policy is a directory; a policy must be a regular file"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn daemon_refuses_to_run_without_root() {
    let mut command = Command::new(portguard_bin());
    command.args(["daemon", "--policy", "/dev/null"]);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        command.uid(65534).gid(65534);
    }
    let out = command.output().expect("run portguard");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("portguard daemon must run as root"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn help_explains_commands_and_options() {
    let out = portguard(&["daemon", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    for option in [
        "--policy <FILE>",
        "--cgroup <PATH>",
        "/etc/portguard/policy.toml",
        "SIGTERM",
    ] {
        assert!(
            help.contains(option),
            "daemon --help lacks {option}:\n{help}"
        );
    }
    let out = portguard(&["--help"]);
    let help = text(&out.stdout);
    assert!(help.contains("daemon") && help.contains("check"), "{help}");
}

#[test]
fn doctor_names_a_listener_inside_the_ephemeral_range() {
    // The kernel picks port 0 from its ephemeral range: exactly what doctor should flag.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let out = portguard(&["doctor", "--json", "--nodeport-range", "30000-32767"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("doctor JSON");
    assert_eq!(report["version"], 1);
    let findings = report["findings"].as_array().expect("findings");
    let port_text = port.to_string();
    let ours = findings
        .iter()
        .find(|f| f["check"] == "listener_in_ephemeral_range" && f["ports"][0] == *port_text)
        .unwrap_or_else(|| panic!("no finding for port {port}: {report}"));
    assert_eq!(ours["severity"], "warning");
    let message = ours["message"].as_str().expect("message");
    assert!(
        message.contains(&format!("(pid {})", std::process::id())),
        "names this process: {message}"
    );
    assert_eq!(
        ours["fix"],
        format!("add {port} to net.ipv4.ip_local_reserved_ports")
    );
    assert!(
        findings.iter().any(|f| f["check"] == "nodeport_range"),
        "checks the NodePort range: {report}"
    );
}
