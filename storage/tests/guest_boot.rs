//! The acceptance path on a real guest: import the test guest's streamOptimized VMDK
//! (as VMware exports it), boot it under TCG on pvscsi, write data in the guest,
//! snapshot the running VM through QMP, write more, power off, revert, boot again and
//! find the snapshot's data.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use hvx_storage::ImportSource;
use hvx_storage::qmp::QmpExecutor;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// The guest built by hack/build-guest.sh (its last stdout line is the directory), or
/// HVX_GUEST_DIR when set.
fn guest_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("HVX_GUEST_DIR") {
        return Some(PathBuf::from(dir));
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../hack/build-guest.sh");
    if !script.exists() {
        return None;
    }
    let out = std::process::Command::new(&script).output().ok()?;
    assert!(
        out.status.success(),
        "build-guest.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(|l| PathBuf::from(l.trim()))
}

struct Serial {
    stream: UnixStream,
    seen: String,
}

impl Drop for Serial {
    fn drop(&mut self) {
        // The whole console of a failed run is the first thing to read.
        if std::thread::panicking() {
            eprintln!("---- guest serial ----\n{}\n---- end ----", self.seen);
        }
    }
}

impl Serial {
    async fn connect(path: &std::path::Path) -> Serial {
        for _ in 0..600 {
            if let Ok(stream) = UnixStream::connect(path).await {
                return Serial {
                    stream,
                    seen: String::new(),
                };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no serial socket");
    }

    /// Reads until `needle` appears after the current position; returns the text read.
    async fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let start = self.seen.len();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while !self.seen[start..].contains(needle) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let n = tokio::time::timeout(left, self.stream.read(&mut buf))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "timed out waiting for {needle:?}; serial tail: {}",
                        tail(&self.seen)
                    )
                })
                .unwrap();
            assert!(n > 0, "serial closed waiting for {needle:?}");
            self.seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        self.seen[start..].to_string()
    }

    /// Waits until the shell on the console really reads input: keystrokes typed
    /// before the shell starts are lost, so probe every 2 s until one is answered.
    async fn sync_shell(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            self.stream
                .write_all(b"echo HVXSYNC$((40+2))\n")
                .await
                .unwrap();
            let start = self.seen.len();
            let mut buf = [0u8; 4096];
            let probe_end = tokio::time::Instant::now() + Duration::from_secs(2);
            while tokio::time::Instant::now() < probe_end {
                let left = probe_end.saturating_duration_since(tokio::time::Instant::now());
                if let Ok(Ok(n)) = tokio::time::timeout(left, self.stream.read(&mut buf)).await {
                    assert!(n > 0, "serial closed");
                    self.seen.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
                if self.seen[start..].contains("HVXSYNC42") {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no shell on the console; serial tail: {}",
                tail(&self.seen)
            );
        }
    }

    /// Types a shell command and waits for its end marker (computed by the shell so the
    /// echoed input never matches it).
    async fn run(&mut self, cmd: &str, n: u32) -> String {
        let line = format!("{cmd}; echo HVXEND$(({n}+1000))\n");
        self.stream.write_all(line.as_bytes()).await.unwrap();
        self.wait_for(&format!("HVXEND{}", n + 1000), Duration::from_secs(120))
            .await
    }
}

fn tail(s: &str) -> &str {
    let mut i = s.len().saturating_sub(2000);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

async fn boot(view: &hvx_storage::disks::DiskView, top: &str) -> (Qemu, Serial, tempfile::TempDir) {
    let dir = tempfile::Builder::new()
        .prefix("hvx-serial")
        .tempdir()
        .unwrap();
    let sock = dir.path().join("serial.sock");
    let vm = Qemu::start(&[
        "-m".into(),
        "512".into(),
        "-chardev".into(),
        format!("socket,id=ser0,path={},server=on,wait=off", sock.display()),
        "-serial".into(),
        "chardev:ser0".into(),
        "-blockdev".into(),
        view.blockdev.to_string(),
        "-device".into(),
        "pvscsi,id=scsi0".into(),
        "-device".into(),
        format!("scsi-hd,drive={top},bus=scsi0.0,id=disk0,bootindex=0"),
    ])
    .await;
    let mut serial = Serial::connect(&sock).await;
    serial
        .wait_for("HVX-GUEST ready", Duration::from_secs(300))
        .await;
    serial.sync_shell().await;
    (vm, serial, dir)
}

#[tokio::test]
#[ignore = "privileged: make test-integration"]
async fn boot_write_snapshot_revert_verify_in_guest() {
    let Some(guest) = guest_dir() else {
        println!("SKIP: no test guest (hack/build-guest.sh missing and HVX_GUEST_DIR unset)");
        return;
    };
    let t = store();
    let base = t
        .store
        .import(
            &ImportSource::Local {
                dir: guest.clone(),
                entry: "disk-stream.vmdk".into(),
            },
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(base.source_subformat, "streamOptimized");
    let view = t
        .store
        .create_disk("ns", "guest", &base.digest, None)
        .await
        .unwrap();
    let meta = t.store.load_disk("ns", "guest").unwrap();
    let top = meta.node_name(Some(&meta.active));
    let (vm, mut serial, _serial_dir) = boot(&view, &top).await;
    serial
        .run("echo before-snapshot > /data/hvx-f; sync", 1)
        .await;
    t.store
        .snapshot_online(&vm.qmp, "ns", "guest", "s1")
        .await
        .unwrap();
    serial
        .run("echo after-snapshot > /data/hvx-f; sync", 2)
        .await;
    let out = serial.run("cat /data/hvx-f", 3).await;
    assert!(out.contains("after-snapshot"), "{out}");
    vm.qmp.execute("quit", json!({})).await.ok();
    drop(vm);
    // Revert offline and boot again.
    let view = t.store.revert("ns", "guest", "s1").await.unwrap();
    let meta = t.store.load_disk("ns", "guest").unwrap();
    let top = meta.node_name(Some(&meta.active));
    let (vm, mut serial, _serial_dir) = boot(&view, &top).await;
    let out = serial.run("cat /data/hvx-f", 4).await;
    assert!(
        out.contains("before-snapshot") && !out.contains("after-snapshot\r\n"),
        "{out}"
    );
    vm.qmp.execute("quit", json!({})).await.ok();
    drop(vm);
}
