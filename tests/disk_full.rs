//! A full disk under the embedded store: the data directory is a small
//! tmpfs of its own (mounted by the test, so it needs root, as `.ci/run`
//! has), filled up with a file while the server runs, then given its space
//! back by deleting that file.
//!
//! Promised (README, "When the disk fills up"): while writes fail, ingest
//! answers 503 and `/healthz` says the store is failing; no attempt is
//! started again and again whose record cannot be written; once space is
//! back the store reopens by itself, and every event that got a 202 is
//! delivered with its attempts recorded.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::http::request;
use crate::support::receiver::{Answer, Receiver};
use crate::support::server::{Server, setup};
use crate::support::wait_for;

const T: Duration = Duration::from_secs(30);

/// A tmpfs of `size` mounted at `at`, unmounted on drop.
struct SmallDisk {
    at: PathBuf,
}

impl SmallDisk {
    fn mount(at: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(at).expect("create the mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs as the data directory and needs root \
             (CAP_SYS_ADMIN) for it: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk {
            at: at.to_path_buf(),
        }
    }

    /// Writes a file until the disk is full; returns its path.
    fn fill(&self) -> PathBuf {
        let path = self.at.join("filler");
        let mut f = std::fs::File::create(&path).expect("create the filler");
        let block = vec![0xa5u8; 64 * 1024];
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
        // The last partial pages too.
        while f.write(&[0u8; 1]).map(|n| n > 0).unwrap_or(false) {}
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

fn event(id: &str) -> serde_json::Value {
    // A few KiB each, so a full disk is met after a few hundred events.
    json!({"id": id, "event_type": "create", "entity_type": "story",
        "scope": {"workspace_id": 1002},
        "entity": {"id": id, "name": "Story", "description": "x".repeat(4000)}})
}

fn healthz(server: &Server) -> (u16, serde_json::Value) {
    let r = request(server.addr, "GET", "/healthz", &[], b"");
    (r.status, r.json())
}

#[test]
fn a_full_disk_is_reported_holds_back_attempts_and_heals_by_itself() {
    let rx = Receiver::start(vec![Answer::status(200)]);
    let rules = format!(
        "rules:\n  - {{name: a, events: [create], webhook: {{url: \"{}\", retry: {{policy: fixed, interval: 200ms, retries: 50}}}}}}\n",
        rx.url("/a")
    );
    // `store: redb` so the postgres run of the suite keeps this one on the
    // small disk; the cache is small so writes reach the file.
    let (dir, config) = setup(
        "disk-full",
        &rules,
        &format!(
            "store: redb\ncache_size: 1MiB\nhttp_ports: [{}]\n",
            rx.addr.port()
        ),
    );
    let disk = SmallDisk::mount(&dir.path().join("data"), "4m");
    let server = Server::start(&dir, &config);
    assert_eq!(healthz(&server).0, 200);

    // Calm: events are accepted and delivered.
    let mut accepted = Vec::new();
    for i in 0..20 {
        let id = format!("calm-{i}");
        assert_eq!(server.post_event(&event(&id)).status, 202);
        accepted.push(id);
    }
    rx.wait_for(20, T);

    // The disk fills up. Posting goes on until the store refuses: every
    // answer is a 202 (stored) or a 503 (nothing stored), never anything
    // else, and a 503 comes before the file could have grown past 4 MiB.
    let filler = disk.fill();
    let mut refused = 0;
    for i in 0..2000 {
        let id = format!("full-{i}");
        let r = server.post_event(&event(&id));
        match r.status {
            202 => accepted.push(id),
            503 => {
                assert!(
                    r.header("retry-after").is_some(),
                    "a 503 without Retry-After"
                );
                refused += 1;
                if refused >= 5 {
                    break;
                }
            }
            other => panic!("ingest answered {other} on a full disk: {}", r.text()),
        }
    }
    assert!(
        refused >= 5,
        "the store never refused a write on a full disk"
    );

    // Reported as failing, by /healthz and /metrics.
    let (status, body) = healthz(&server);
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "store_failing", "{body}");
    assert!(
        body["store"]["error"]
            .as_str()
            .is_some_and(|e| e.to_lowercase().contains("no space left on device")),
        "{body}"
    );
    let metrics = server.admin("GET", "/metrics", None).text();
    assert!(
        metrics.lines().any(|l| l == "rulehook_store_writable 0"),
        "{metrics}"
    );

    // While writes fail, no delivery is sent again and again: each one the
    // receiver gets in this window arrives once (an attempt already under
    // way may be sent, its record fails, and the dispatcher then waits).
    let before = rx.received().len();
    std::thread::sleep(Duration::from_secs(3));
    let during = rx.received()[before..].to_vec();
    let mut times: HashMap<String, usize> = HashMap::new();
    for r in &during {
        *times
            .entry(r.header("webhook-id").unwrap_or_default().to_string())
            .or_default() += 1;
    }
    assert!(
        times.values().all(|&n| n == 1),
        "deliveries were re-sent while their records could not be written: {times:?}"
    );
    assert!(
        during.len() <= 64,
        "{} requests were sent in 3 s on a full disk",
        during.len()
    );
    // And the store stays failing: it does not claim to be well.
    assert_eq!(healthz(&server).0, 503);

    // Space comes back: the store reopens by itself.
    std::fs::remove_file(&filler).expect("free the disk");
    let started = Instant::now();
    wait_for(T, "/healthz to report the store writable again", || {
        (healthz(&server).0 == 200).then_some(())
    });
    let healed_in = started.elapsed();
    for i in 0..10 {
        let id = format!("after-{i}");
        let r = server.post_event(&event(&id));
        assert_eq!(r.status, 202, "after space came back: {}", r.text());
        accepted.push(id);
    }

    // Every 202'd event is delivered, and its delivery records a success.
    wait_for(T, "every accepted event to be delivered", || {
        let got: std::collections::HashSet<String> = rx
            .received()
            .iter()
            .map(|r| {
                r.json()["entity"]["id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect();
        accepted.iter().all(|id| got.contains(id)).then_some(())
    });
    assert!(accepted.len() < 1000, "one page must hold them all");
    wait_for(T, "every delivery to be recorded as succeeded", || {
        let list = server.deliveries("state=succeeded&limit=1000");
        (list.len() == accepted.len()).then_some(())
    });
    let metrics = server.admin("GET", "/metrics", None).text();
    assert!(
        metrics.lines().any(|l| l == "rulehook_store_writable 1"),
        "{metrics}"
    );
    eprintln!("the store was writable again {healed_in:?} after space came back");
    drop(server);
}
