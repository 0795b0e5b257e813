//! Every bad policy of the corpus (tests/bad-policies/ and the generated cases) gives one clear
//! error, naming the file (and line and column when the problem is in the text), from all three
//! places a policy is read: `portguard check`, a daemon's start (which then exits non-zero with
//! nothing loaded, pinned or attached) and a running daemon's reload (refused, shown by
//! `status`, with the running policy still enforced). Nothing hangs, a FIFO included.

use std::{fs, path::PathBuf, process::Command, time::Duration};

use portguard_tests::{
    Daemon, Peers, TestCgroup,
    bad_policy::{BadPolicy, corpus, run_bounded},
    bpf_query::portguard_programs,
    port, portguard_bin, privileged, probe, reliability,
};

const TIMEOUT: Duration = Duration::from_secs(20);

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("portguard-bad-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

#[test]
fn check_gives_one_located_error_for_each_bad_policy() {
    let dir = scratch("check");
    let cases = corpus();
    for case in &cases {
        let path = dir.join(&case.name);
        case.install(&path);
        let out = run_bounded(
            Command::new(portguard_bin()).arg("check").arg(&path),
            TIMEOUT,
        );
        assert_eq!(
            out.status.code(),
            Some(1),
            "check of bad policy `{}` did not fail",
            case.name
        );
        assert!(out.stdout.is_empty(), "no summary for a bad policy");
        case.assert_one_error(&path, &String::from_utf8_lossy(&out.stderr), "check");
        BadPolicy::cleanup(&path);
    }
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn daemon_refuses_to_start_on_each_bad_policy_and_leaves_nothing() {
    if !privileged("daemon_refuses_to_start_on_each_bad_policy_and_leaves_nothing") {
        return;
    }
    let cgroup = TestCgroup::new("badstart");
    let dir = scratch("start");
    let socket = dir.join("control.sock");
    let cases = corpus();
    for case in &cases {
        let path = dir.join(&case.name);
        case.install(&path);
        let out = run_bounded(
            Command::new(portguard_bin())
                .arg("daemon")
                .arg("--policy")
                .arg(&path)
                .arg("--cgroup")
                .arg(&cgroup.root)
                .arg("--pin-path")
                .arg(cgroup.pin_path())
                .arg("--socket")
                .arg(&socket),
            TIMEOUT,
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "daemon on bad policy `{}` did not refuse to start:\n{stderr}",
            case.name
        );
        case.assert_one_error(&path, &stderr, "daemon start");
        assert!(
            !cgroup.pin_path().exists(),
            "daemon refusing `{}` created its pin directory",
            case.name
        );
        assert!(
            !socket.exists(),
            "daemon refusing `{}` bound its socket",
            case.name
        );
        assert_eq!(
            portguard_programs(&cgroup.root),
            portguard_tests::bpf_query::NONE_ATTACHED,
            "daemon refusing `{}` attached programs",
            case.name
        );
        BadPolicy::cleanup(&path);
    }
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn reload_refuses_each_bad_policy_and_keeps_enforcing() {
    if !privileged("reload_refuses_each_bad_policy_and_keeps_enforcing") {
        return;
    }
    let cgroup = TestCgroup::new("badreload");
    let web = cgroup.child("web");
    // reserve = false: the sysctl stays as it is; this test is about the policy file.
    let good = format!(
        "reserve = false\n[[scope]]\nname = \"web\"\ncgroup = \"{}\"\nephemeral = \"10100-10199\"\n",
        cgroup.rel("web")
    );
    let daemon = Daemon::start(&cgroup, &good);
    let peers = Peers::new();
    let in_range = |what: &str| {
        let result = &probe(&web, &["connect", "tcp", &peers.tcp_port()])[0];
        assert!(
            (10100..=10199).contains(&port(result)),
            "{what}: connect got port {} outside the running policy's range",
            port(result)
        );
    };
    in_range("before any reload");
    let path = daemon.policy_path().to_owned();
    let cases = corpus();
    let mut probes = 1;
    for case in &cases {
        case.install(&path);
        let out = run_bounded(
            Command::new(portguard_bin())
                .arg("reload")
                .arg("--socket")
                .arg(daemon.socket()),
            TIMEOUT,
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "reload of bad policy `{}` was not refused:\n{stderr}",
            case.name
        );
        case.assert_one_error(&path, &stderr, "reload");
        let status = daemon.status();
        let last = &status["last_reload"];
        assert_eq!(last["ok"], false, "status after refusing `{}`", case.name);
        let error = last["error"].as_str().expect("the refusal's error");
        assert!(
            error.contains(&case.expect),
            "status shows `{error}` for bad policy `{}`",
            case.name
        );
        assert_eq!(
            status["scopes"][0]["range"],
            serde_json::json!([10100, 10199]),
            "the running policy changed after refusing `{}`",
            case.name
        );
        in_range(&format!("after refusing `{}`", case.name));
        probes += 1;
    }
    BadPolicy::cleanup(&path);
    // Still alive and still reloading good policies.
    daemon.write_policy(&good.replace("10100-10199", "10200-10299"));
    let out = daemon.cli(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result = &probe(&web, &["connect", "tcp", &peers.tcp_port()])[0];
    assert!((10200..=10299).contains(&port(result)), "{result}");
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(
        log.matches("reload refused; the running policy stays in force")
            .count(),
        cases.len(),
        "one refusal logged per bad policy:\n{log}"
    );

    let committed = cases.iter().filter(|case| !is_generated(case)).count();
    reliability::record(
        "bad-policies",
        &[format!(
            "bad policies: {} cases ({committed} committed files in tests/bad-policies/, {} made by the test: \
             a {} MiB file, non-UTF-8 bytes, a symlink loop, a directory, a FIFO, a dangling symlink, \
             1,025 scopes), each refused with one located error by `check`, by `daemon` start \
             (nothing pinned or attached) and by reload of a running daemon; {probes} connects \
             after the refused reloads, all in the running policy's range",
            cases.len(),
            cases.len() - committed,
            portguard_tests::bad_policy::HUGE_BYTES / (1024 * 1024),
        )],
    );
}

fn is_generated(case: &BadPolicy) -> bool {
    !case.name.ends_with(".toml")
}
