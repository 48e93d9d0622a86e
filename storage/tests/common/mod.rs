//! Helpers shared by the privileged storage tests: temp stores, images made with
//! qemu-img, a QEMU process with a QMP client (killed on drop).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use hvx_storage::qmp::QmpExecutor;
use hvx_storage::{DiskStore, StorageError, StoreConfig};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::Mutex;

pub struct TestStore {
    pub dir: tempfile::TempDir,
    pub store: DiskStore,
}

pub fn store() -> TestStore {
    let dir = tempfile::Builder::new()
        .prefix("hvx-storage-test")
        .tempdir()
        .unwrap();
    let store = DiskStore::open(StoreConfig::new(dir.path().join("store"))).unwrap();
    TestStore { dir, store }
}

pub fn store_with(cfg: impl FnOnce(&mut StoreConfig)) -> TestStore {
    let dir = tempfile::Builder::new()
        .prefix("hvx-storage-test")
        .tempdir()
        .unwrap();
    let mut c = StoreConfig::new(dir.path().join("store"));
    cfg(&mut c);
    let store = DiskStore::open(c).unwrap();
    TestStore { dir, store }
}

/// Runs a command, panicking with its stderr on failure; returns stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

/// A raw disk with recognisable data at a few offsets (and holes between).
pub fn pattern_raw(path: &Path, size_mib: u64) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "raw",
        path.to_str().unwrap(),
        &format!("{size_mib}M"),
    ]);
    let p = path.to_str().unwrap();
    for (i, off) in [0u64, 1, size_mib / 2, size_mib - 1].iter().enumerate() {
        run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                &format!("write -P {} {}M 64k", 0x41 + i, off),
                p,
            ],
        );
    }
}

/// True when the two images hold the same data.
pub fn same_content(a: &Path, a_fmt: &str, b: &Path, b_fmt: &str) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-q", "-f", a_fmt, "-F", b_fmt])
        .arg(a)
        .arg(b)
        .status()
        .unwrap()
        .success()
}

/// Reads `len` bytes at `off` through qemu-io and checks they all equal `byte`.
pub fn expect_pattern(image: &Path, fmt: &str, off: &str, len: &str, byte: u8) -> bool {
    Command::new("qemu-io")
        .args([
            "-f",
            fmt,
            "-r",
            "-c",
            &format!("read -P {byte} {off} {len}"),
        ])
        .arg(image)
        .output()
        .map(|o| {
            o.status.success()
                && !String::from_utf8_lossy(&o.stdout).contains("Pattern verification failed")
        })
        .unwrap_or(false)
}

pub fn write_pattern(image: &Path, off: &str, len: &str, byte: u8) {
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("write -P {byte} {off} {len}"),
            image.to_str().unwrap(),
        ],
    );
}

pub fn is_root() -> bool {
    run("id", &["-u"]).trim() == "0"
}

/// A QEMU process (TCG, no display) killed on drop.
pub struct Qemu {
    pub child: std::process::Child,
    pub dir: tempfile::TempDir,
    pub qmp: QmpClient,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Qemu {
    /// Starts QEMU with `args` and connects QMP.
    pub async fn start(args: &[String]) -> Qemu {
        let dir = tempfile::Builder::new()
            .prefix("hvx-qemu")
            .tempdir()
            .unwrap();
        let sock = dir.path().join("qmp.sock");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "256",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("qemu-system-x86_64");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !sock.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                use std::io::Read;
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("qemu exited {status}: {err}");
            }
            assert!(std::time::Instant::now() < deadline, "no QMP socket");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let qmp = QmpClient::connect(&sock).await;
        Qemu { child, dir, qmp }
    }
}

/// A minimal QMP client: one command at a time; events are skipped.
pub struct QmpClient {
    inner: Mutex<(
        BufReader<tokio::net::unix::OwnedReadHalf>,
        tokio::net::unix::OwnedWriteHalf,
    )>,
}

impl QmpClient {
    pub async fn connect(sock: &Path) -> QmpClient {
        let stream = UnixStream::connect(sock).await.unwrap();
        let (r, w) = stream.into_split();
        let client = QmpClient {
            inner: Mutex::new((BufReader::new(r), w)),
        };
        {
            let mut g = client.inner.lock().await;
            let mut greeting = String::new();
            g.0.read_line(&mut greeting).await.unwrap();
            assert!(greeting.contains("QMP"), "{greeting}");
        }
        client.execute("qmp_capabilities", json!({})).await.unwrap();
        client
    }

    /// Runs an HMP command; panics when it prints an error.
    pub async fn hmp(&self, line: &str) -> String {
        let out = self
            .execute("human-monitor-command", json!({"command-line": line}))
            .await
            .unwrap()
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            !out.contains("Error") && !out.contains("failed"),
            "{line}: {out}"
        );
        out
    }
}

#[async_trait::async_trait]
impl QmpExecutor for QmpClient {
    async fn execute(&self, command: &str, args: Value) -> hvx_storage::Result<Value> {
        let mut g = self.inner.lock().await;
        let mut msg = json!({"execute": command});
        if args.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = args;
        }
        let line = format!("{msg}\n");
        g.1.write_all(line.as_bytes())
            .await
            .map_err(|e| StorageError::Qmp {
                command: command.into(),
                reason: e.to_string(),
            })?;
        loop {
            let mut resp = String::new();
            let n =
                g.0.read_line(&mut resp)
                    .await
                    .map_err(|e| StorageError::Qmp {
                        command: command.into(),
                        reason: e.to_string(),
                    })?;
            if n == 0 {
                return Err(StorageError::Qmp {
                    command: command.into(),
                    reason: "QMP connection closed".into(),
                });
            }
            let v: Value = serde_json::from_str(&resp).map_err(|e| StorageError::Qmp {
                command: command.into(),
                reason: e.to_string(),
            })?;
            if let Some(ret) = v.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = v.get("error") {
                return Err(StorageError::Qmp {
                    command: command.into(),
                    reason: err["desc"].as_str().unwrap_or_default().to_string(),
                });
            }
            // An event: keep reading.
        }
    }
}

pub fn file_list(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}
