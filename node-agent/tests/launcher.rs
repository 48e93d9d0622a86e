//! Privileged: the launcher binary boots the VMware-like test guest (streamOptimized
//! VMDK under a qcow2 overlay) under TCG, and the guest sees VMware hardware: vmxnet3
//! and pvscsi bound to their drivers, the declared MAC, the VMware DMI strings and the
//! disk at its declared SCSI address. SIGTERM shuts it down cleanly, leaving nothing.

use hvx_vmm::console::{SerialConsole, SerialLog};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const LAUNCHER: &str = env!("CARGO_BIN_EXE_hvx-launcher");

fn guest_dir() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/build-guest.sh");
    let out = Command::new(&script)
        .output()
        .expect("run hack/build-guest.sh");
    assert!(
        out.status.success(),
        "build-guest failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("guest dir")
            .trim(),
    )
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Ends the launcher (and, through its pid file, QEMU) even when an assertion fails.
struct LauncherGuard {
    child: Child,
    run_dir: PathBuf,
}

impl Drop for LauncherGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-KILL", &self.child.id().to_string()])
                .status();
            let _ = self.child.wait();
        }
        if let Ok(pid) = std::fs::read_to_string(self.run_dir.join("qemu.pid")) {
            let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
        }
    }
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "privileged: make test-integration"]
async fn launcher_boots_vmware_guest_under_tcg() {
    if !is_root() {
        eprintln!("SKIP: privileged test needs root");
        return;
    }
    let guest = guest_dir();
    let tmp = tempfile::tempdir().expect("tempdir");
    let disk = tmp.path().join("boot.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "vmdk", "-b"])
        .arg(guest.join("disk-stream.vmdk"))
        .arg(&disk)
        .status()
        .expect("qemu-img");
    assert!(st.success());
    let run_dir = tmp.path().join("run");
    let spec = serde_json::json!({
        "name": "web-1",
        "uuid": "421a5b3c-0000-4000-8000-00000000abcd",
        "serial": "VMware-42 1a 5b 3c 00 00 40 00-80 00 00 00 00 00 ab cd",
        "cpu": {"sockets": 1, "cores": 2},
        "memory_mib": 256,
        "accelerator": "auto",
        "controllers": [{"type": "pvscsi", "bus": 0, "pci_slot": 16}],
        "disks": [{"name": "boot", "path": disk, "format": "qcow2", "controller": "pvscsi",
                   "bus": 0, "unit": 2, "boot_order": 1}],
        "nics": [{"name": "ethernet0", "model": "vmxnet3", "mac": "00:50:56:AB:CD:01",
                  "pci_slot": 17, "backend": {"user": {}}}],
        "run_dir": run_dir,
        "restart_policy": {"policy": "never"},
        "shutdown_timeout_s": 90
    });
    let spec_file = tmp.path().join("spec.json");
    std::fs::write(&spec_file, spec.to_string()).expect("write spec");

    let started = Instant::now();
    let child = Command::new(LAUNCHER)
        .args(["run", "--spec"])
        .arg(&spec_file)
        .stdin(Stdio::null())
        .spawn()
        .expect("start launcher");
    let mut guard = LauncherGuard {
        child,
        run_dir: run_dir.clone(),
    };

    let mut log = SerialLog::new(&run_dir.join("serial.log"));
    let boot = Duration::from_secs(240);
    let dmi = log.wait_for("HVX-GUEST dmi", boot).await.expect("dmi line");
    let disk_line = log
        .wait_for("HVX-GUEST disk", boot)
        .await
        .expect("disk line");
    let nic = log.wait_for("HVX-GUEST nic", boot).await.expect("nic line");
    log.wait_for("HVX-GUEST ready", boot).await.expect("ready");
    eprintln!("guest ready after {:.1}s", started.elapsed().as_secs_f64());

    assert!(dmi.contains(r#"sys_vendor="VMware, Inc.""#), "{dmi}");
    assert!(
        dmi.contains(r#"product_name="VMware Virtual Platform""#),
        "{dmi}"
    );
    assert!(
        dmi.contains(r#"product_serial="VMware-42 1a 5b 3c 00 00 40 00-80 00 00 00 00 00 ab cd""#),
        "{dmi}"
    );
    assert!(
        dmi.contains("product_uuid=421a5b3c-0000-4000-8000-00000000abcd"),
        "{dmi}"
    );
    assert_eq!(field(&nic, "driver"), "vmxnet3", "{nic}");
    assert_eq!(field(&nic, "mac"), "00:50:56:ab:cd:01", "{nic}");
    assert_eq!(field(&nic, "pci"), "0000:00:11.0", "{nic}");
    assert_eq!(field(&disk_line, "driver"), "vmw_pvscsi", "{disk_line}");
    assert_eq!(field(&disk_line, "pci"), "0000:00:10.0", "{disk_line}");
    // H:C:T:L - target 2 as declared, LUN 0.
    let hctl: Vec<&str> = field(&disk_line, "hctl").split(':').collect();
    assert_eq!(hctl.get(1..), Some(&["0", "2", "0"][..]), "{disk_line}");

    // Readiness probe and the recorded accelerator choice.
    let probe = Command::new(LAUNCHER)
        .args(["probe", "--run-dir"])
        .arg(&run_dir)
        .status()
        .expect("probe");
    assert!(probe.success(), "probe says not running");
    let status: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run_dir.join("status.json")).expect("status"),
    )
    .expect("json");
    assert_eq!(status["phase"], "Running");
    assert!(
        status["accel"]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("kvm:")),
        "{status}"
    );

    // SIGTERM: ACPI shutdown, the guest halts cleanly, the launcher exits 0. The serial
    // log goes with the run dir, so watch the console socket for the guest's last words.
    let mut con = SerialConsole::connect(&run_dir.join("serial.sock"))
        .await
        .expect("console");
    let pid = guard.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    con.read_until("HVX-GUEST halted", Duration::from_secs(120))
        .await
        .expect("guest halted cleanly");
    let deadline = Instant::now() + Duration::from_secs(150);
    let code = loop {
        if let Some(s) = guard.child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "launcher did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(code.success(), "launcher exit {code}");
    let left: Vec<String> = std::fs::read_dir(&run_dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(left, ["status.json"], "files left in the run dir");
    let ps = Command::new("ps")
        .args(["-eo", "args"])
        .output()
        .expect("ps");
    assert!(
        !String::from_utf8_lossy(&ps.stdout).contains(&*run_dir.to_string_lossy()),
        "QEMU still running"
    );
}

#[test]
fn launcher_rejects_bad_specs_clearly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let f = tmp.path().join("spec.json");
    std::fs::write(
        &f,
        r#"{"name":"x","memory_mib":64,"run_dir":"/tmp/x","nics":[
            {"name":"a","model":"vmxnet3","mac":"00:50:56:00:00:01","backend":{"user":{}}},
            {"name":"b","model":"e1000","mac":"00:50:56:00:00:01","backend":{"user":{}}}]}"#,
    )
    .expect("write");
    let out = Command::new(LAUNCHER)
        .args(["argv", "--spec"])
        .arg(&f)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("same MAC"), "{err}");
    std::fs::write(&f, "{\"hello\": 1}").expect("write");
    let out = Command::new(LAUNCHER)
        .args(["argv", "--spec"])
        .arg(&f)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("neither a VmSpec") && err.contains("LaunchSpec"),
        "{err}"
    );
}
