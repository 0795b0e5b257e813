//! The deployment files: the systemd unit passes `systemd-analyze verify`, and the Kubernetes
//! DaemonSet is well-formed, mounts what the daemon needs and carries a valid policy.

use std::{path::Path, process::Command};

use portguard_tests::portguard_bin;
use yaml_rust2::{Yaml, YamlLoader};

fn repo_file(path: &str) -> String {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()))
}

#[test]
fn systemd_unit_verifies_and_notifies() {
    let unit = repo_file("deploy/systemd/portguard.service");
    for line in [
        "Type=notify",
        "ExecReload=/usr/local/bin/portguard reload",
        "Restart=on-failure",
        "CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_SYS_ADMIN",
    ] {
        assert!(unit.lines().any(|l| l == line), "unit lacks `{line}`");
    }
    // verify checks that the commands exist: point them at the binary under test.
    let dir = std::env::temp_dir().join(format!("portguard-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("portguard.service");
    let binary = portguard_bin();
    std::fs::write(
        &path,
        unit.replace(
            "/usr/local/bin/portguard",
            binary.to_str().expect("utf-8 path"),
        ),
    )
    .expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze is installed by `cargo xtask test`");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn systemd_unit_hardening_rates_ok_or_better() {
    let unit = repo_file("deploy/systemd/portguard.service");
    // What the daemon needs under the hardening: bpffs and the sysctl writable, Unix sockets,
    // and the host's network namespace (the reserved-ports sysctl is per namespace).
    for line in [
        "ReadWritePaths=/sys/fs/bpf /proc/sys/net/ipv4/ip_local_reserved_ports",
        "RestrictAddressFamilies=AF_UNIX",
        "NoNewPrivileges=yes",
        "RuntimeDirectory=portguard",
    ] {
        assert!(unit.lines().any(|l| l == line), "unit lacks `{line}`");
    }
    assert!(!unit.contains("PrivateNetwork=yes"));
    let dir = std::env::temp_dir().join(format!("portguard-security-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("portguard.service");
    std::fs::write(&path, &unit).expect("write unit");
    // PID 1 need not be systemd: judge the unit file alone.
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&path)
        .output()
        .expect("systemd-analyze is installed by `cargo xtask test`");
    let _ = std::fs::remove_dir_all(&dir);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "systemd-analyze security: {}{report}",
        String::from_utf8_lossy(&out.stderr)
    );
    // "→ Overall exposure level for portguard.service: 1.8 OK 🙂"
    let overall = report
        .lines()
        .find_map(|line| line.split_once("Overall exposure level for portguard.service: "))
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{report}"));
    let mut words = overall.split_whitespace();
    let exposure: f64 = words
        .next()
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no exposure number in `{overall}`"));
    let level = words.next().unwrap_or_default();
    assert!(
        ["OK", "SAFE", "PERFECT"].contains(&level) && exposure < 5.0,
        "the unit's exposure is {exposure} {level}; it must be OK or better:\n{report}"
    );
    portguard_tests::reliability::record(
        "security-systemd-unit",
        &[format!(
            "systemd unit: `systemd-analyze security --offline=yes` rates \
             deploy/systemd/portguard.service {exposure} {level} (OK or better is required)"
        )],
    );
}

#[test]
fn daemonset_is_well_formed_and_its_policy_is_valid() {
    let documents =
        YamlLoader::load_from_str(&repo_file("deploy/kubernetes/portguard-daemonset.yaml"))
            .expect("the manifest is YAML");
    let kinds: Vec<(&str, &str)> = documents
        .iter()
        .map(|d| {
            (
                d["apiVersion"].as_str().expect("apiVersion"),
                d["kind"].as_str().expect("kind"),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("v1", "Namespace"),
            ("v1", "ConfigMap"),
            ("apps/v1", "DaemonSet")
        ]
    );
    let config_map = &documents[1];
    let daemon_set = &documents[2];
    for document in &documents[1..] {
        assert_eq!(
            document["metadata"]["namespace"].as_str(),
            Some("portguard")
        );
    }

    let spec = &daemon_set["spec"];
    let labels = &spec["template"]["metadata"]["labels"];
    assert_eq!(
        spec["selector"]["matchLabels"], *labels,
        "selector matches the pod labels"
    );
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true));
    let container = &pod["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_vec()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("arg"))
        .collect();
    assert_eq!(args[0], "daemon");
    let added: Vec<&str> = container["securityContext"]["capabilities"]["add"]
        .as_vec()
        .expect("capabilities")
        .iter()
        .map(|c| c.as_str().expect("capability"))
        .collect();
    assert_eq!(added, ["BPF", "NET_ADMIN", "SYS_ADMIN"]);

    // Every mount has its volume, and the daemon gets cgroups, bpffs and its policy.
    let volumes: Vec<&str> = pod["volumes"]
        .as_vec()
        .expect("volumes")
        .iter()
        .map(|v| v["name"].as_str().expect("name"))
        .collect();
    let mounts: Vec<(&str, &str)> = container["volumeMounts"]
        .as_vec()
        .expect("mounts")
        .iter()
        .map(|m| {
            (
                m["name"].as_str().expect("name"),
                m["mountPath"].as_str().expect("path"),
            )
        })
        .collect();
    for (name, _) in &mounts {
        assert!(volumes.contains(name), "mount {name} has no volume");
    }
    for path in [
        "/etc/portguard",
        "/sys/fs/cgroup",
        "/sys/fs/bpf",
        "/run/portguard",
    ] {
        assert!(
            mounts.iter().any(|(_, p)| *p == path),
            "nothing mounted at {path}"
        );
    }
    let policy_volume = pod["volumes"]
        .as_vec()
        .expect("volumes")
        .iter()
        .find(|v| v["name"].as_str() == Some("policy"))
        .expect("policy volume");
    assert_eq!(
        policy_volume["configMap"]["name"].as_str(),
        config_map["metadata"]["name"].as_str()
    );
    assert!(args.contains(&"--policy=/etc/portguard/policy.toml"));

    // The policy it ships passes `portguard check`.
    let Yaml::String(policy) = &config_map["data"]["policy.toml"] else {
        panic!("the ConfigMap has no policy.toml");
    };
    let file = std::env::temp_dir().join(format!("portguard-k8s-{}.toml", std::process::id()));
    std::fs::write(&file, policy).expect("write policy");
    let out = Command::new(portguard_bin())
        .arg("check")
        .arg(&file)
        .output()
        .expect("run check");
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
