//! End-to-end: pool scopes give every cgroup they select a block of its own, recycled as
//! cgroups come and go, against the real kernel.

use portguard_tests::{Daemon, TestCgroup, port, privileged, probe, wait_until};
use serde_json::Value;

fn pool(daemon: &Daemon) -> Value {
    let status = daemon.status();
    status["scopes"][0].clone()
}

/// Each cgroup's block, checked to lie in the pool and never to overlap another.
fn blocks(daemon: &Daemon) -> Vec<(String, u16, u16)> {
    let scope = pool(daemon);
    let mut blocks: Vec<(String, u16, u16)> = scope["blocks"]
        .as_array()
        .map(|b| {
            b.iter()
                .map(|b| {
                    let lo = b["range"][0].as_u64().expect("lo") as u16;
                    let hi = b["range"][1].as_u64().expect("hi") as u16;
                    (b["cgroup"].as_str().expect("cgroup").to_owned(), lo, hi)
                })
                .collect()
        })
        .unwrap_or_default();
    blocks.sort_by_key(|b| b.1);
    for pair in blocks.windows(2) {
        assert!(pair[0].2 < pair[1].1, "overlapping blocks: {blocks:?}");
    }
    for (_, lo, hi) in &blocks {
        assert!(25300 <= *lo && *hi <= 25399 && hi - lo == 9, "{blocks:?}");
    }
    blocks
}

#[test]
fn pools_give_disjoint_blocks_recycle_them_and_leave_nothing_behind() {
    if !privileged("pools_give_disjoint_blocks_recycle_them_and_leave_nothing_behind") {
        return;
    }
    let cgroup = TestCgroup::new("pools");
    cgroup.child("pods");
    let policy = format!(
        "[[scope]]\nname = \"pods\"\ncgroup = \"{}/pods/*\"\npool = \"25300-25399\"\nblock = 10\n",
        cgroup.relative
    );
    let daemon = Daemon::start(&cgroup, &policy);

    // Three pods, three disjoint blocks, each pod steered into its own.
    let pods: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|p| cgroup.child(&format!("pods/{p}")))
        .collect();
    wait_until("three blocks", || blocks(&daemon).len() == 3);
    for (dir, name) in pods.iter().zip(["a", "b", "c"]) {
        let block = blocks(&daemon)
            .into_iter()
            .find(|b| b.0.ends_with(&format!("/pods/{name}")))
            .expect("a block for the pod");
        let r = probe(dir, &["bind", "udp", "0"]);
        assert!(
            (block.1..=block.2).contains(&port(&r[0])),
            "{name} in {block:?}: {}",
            r[0]
        );
    }

    // 200 create/delete cycles: every cgroup gets a block, and gives it back.
    for cycle in 0..200 {
        let dir = cgroup.child(&format!("pods/churn{cycle}"));
        wait_until("a block for the new pod", || blocks(&daemon).len() == 4);
        std::fs::remove_dir(&dir).expect("rmdir");
        wait_until("the block back", || blocks(&daemon).len() == 3);
    }

    // Ten blocks: the eleventh pod waits, unscoped, and is reported; it gets a freed block.
    let more: Vec<_> = (0..8)
        .map(|i| cgroup.child(&format!("pods/more{i}")))
        .collect();
    wait_until("a full pool", || {
        blocks(&daemon).len() == 10
            && pool(&daemon)["pool_exhausted"]
                .as_array()
                .is_some_and(|e| e.len() == 1)
    });
    let waiting = pool(&daemon)["pool_exhausted"][0]
        .as_str()
        .expect("path")
        .to_owned();
    let waiting_dir = cgroup.mount().join(&waiting);
    let events = daemon.events();
    let exhaustion = events
        .iter()
        .find(|e| e["op"] == "pool" && e["verdict"] == "exhausted")
        .unwrap_or_else(|| panic!("no pool exhaustion event in {events:?}"));
    assert_eq!(exhaustion["scope"], "pods");
    let r = probe(&waiting_dir, &["bind", "udp", "0"]);
    assert!(
        !(25300..=25399).contains(&port(&r[0])),
        "no block, no pool port: {}",
        r[0]
    );
    std::fs::remove_dir(&more[0]).expect("rmdir");
    wait_until("the waiting pod gets the freed block", || {
        blocks(&daemon).iter().any(|b| b.0 == waiting) && pool(&daemon)["pool_exhausted"].is_null()
    });

    // A restarted daemon adopts the pins and every live pod keeps its block.
    let before = blocks(&daemon);
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log}");
    let daemon = Daemon::start(&cgroup, &policy);
    assert_eq!(blocks(&daemon), before, "blocks kept across the restart");

    // All gone: no block, no cgroup, and no kernel map entry either (a daemon adopting the
    // pins finds nothing of the old cgroups to clean up).
    for dir in pods.iter().chain(&more[1..]) {
        let _ = std::fs::remove_dir(dir);
    }
    let _ = std::fs::remove_dir(&waiting_dir);
    wait_until("every block back", || blocks(&daemon).is_empty());
    assert_eq!(pool(&daemon)["cgroups"], serde_json::json!([]));
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log}");
    let next = Daemon::start(&cgroup, &policy);
    let (_, log) = next.stop();
    assert!(log.contains("adopting the pinned state"), "{log}");
    assert!(
        !log.contains("left by an earlier daemon"),
        "stale map entries: {log}"
    );
}

#[test]
fn a_reload_reaches_the_blocks_of_live_cgroups() {
    if !privileged("a_reload_reaches_the_blocks_of_live_cgroups") {
        return;
    }
    let cgroup = TestCgroup::new("poolreload");
    let pod = cgroup.child("pods/a");
    let policy = |mode: &str| {
        format!(
            "[[scope]]\nname = \"pods\"\ncgroup = \"{}/pods/*\"\npool = \"25300-25399\"\nblock = 10\nmode = \"{mode}\"\n",
            cgroup.relative
        )
    };
    let daemon = Daemon::start(&cgroup, &policy("audit"));
    wait_until("a block", || blocks(&daemon).len() == 1);
    // Audit: a bind outside the block is allowed.
    assert_eq!(probe(&pod, &["bind", "tcp", "25395"])[0]["errno"], 0);
    daemon.write_policy(&policy("enforce"));
    assert_eq!(daemon.cli(&["reload"]).status.code(), Some(0));
    let block = blocks(&daemon)[0].clone();
    // The block's rule follows the pool's new mode...
    let outside = if block.1 == 25300 { 25395 } else { 25300 };
    assert_eq!(
        probe(&pod, &["bind", "tcp", &outside.to_string()])[0]["errno"],
        portguard_tests::EPERM,
        "enforced after the reload"
    );
    // ...and its sockets are still counted in the block.
    let release = std::env::temp_dir().join(format!("{}-release", cgroup.relative));
    let mut child = portguard_tests::RunningProbe::spawn(
        &pod,
        &[
            "bind",
            "udp",
            "0",
            "hold",
            release.to_str().expect("utf-8 path"),
        ],
    );
    let held = child.next_result();
    child.next_result();
    assert!((block.1..=block.2).contains(&port(&held)), "{held}");
    let status = pool(&daemon);
    assert_eq!(status["blocks"][0]["in_use"], 1, "{status}");
    std::fs::write(&release, b"").expect("release");
    child.finish();
    let _ = std::fs::remove_file(release);
}
