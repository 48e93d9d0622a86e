//! Privileged: the launcher binary boots the VMware-like test guest (streamOptimized
//! VMDK under a qcow2 overlay) under TCG, and the guest sees VMware hardware: vmxnet3
//! and pvscsi bound to their drivers, the declared MAC, the VMware DMI strings and the
//! disk at its declared SCSI address. SIGTERM shuts it down cleanly, leaving nothing.

mod common;

use common::{guest_dir, is_root};
use hvx_vmm::console::{SerialConsole, SerialLog};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const LAUNCHER: &str = env!("CARGO_BIN_EXE_hvx-launcher");

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

/// The live processes whose command line has `needle` (pid, ppid).
fn procs_with(needle: &str) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmd).contains(needle) {
            continue;
        }
        if let Ok(stat) = std::fs::read_to_string(e.path().join("stat"))
            && let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..])
        {
            let f: Vec<&str> = rest.split_whitespace().collect();
            if f.first() != Some(&"Z") {
                out.push((pid, f.get(1).and_then(|p| p.parse().ok()).unwrap_or(0)));
            }
        }
    }
    out
}

/// Starts the launcher on `spec_file` and waits until status.json says Running.
async fn start_running(spec_file: &Path, run_dir: &Path) -> (LauncherGuard, hvx_child::ProcId) {
    let child = Command::new(LAUNCHER)
        .args(["run", "--spec"])
        .arg(spec_file)
        .stdin(Stdio::null())
        .spawn()
        .expect("start launcher");
    let guard = LauncherGuard {
        child,
        run_dir: run_dir.to_path_buf(),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status: Option<serde_json::Value> = std::fs::read(run_dir.join("status.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(s) = status.filter(|s| s["phase"] == "Running")
            && let Some(pid) = s["qemu_pid"].as_u64()
            // A killed launcher's last status names its dead QEMU.
            && let Some(qemu) = hvx_child::ProcId::of(pid as u32)
        {
            return (guard, qemu);
        }
        assert!(Instant::now() < deadline, "VM not running within 60s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "privileged: make test-integration"]
async fn launcher_killed_leaves_no_qemu_and_the_next_reaps_leftovers() {
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
        "name": "orphan-1", "memory_mib": 128, "accelerator": "tcg",
        "disks": [{"name": "boot", "path": disk, "format": "qcow2", "controller": "ide",
                   "bus": 0, "unit": 0, "boot_order": 1}],
        "run_dir": run_dir, "restart_policy": {"policy": "never"}, "shutdown_timeout_s": 5
    });
    let spec_file = tmp.path().join("spec.json");
    std::fs::write(&spec_file, spec.to_string()).expect("write spec");
    let needle = run_dir.display().to_string();

    // SIGKILL: no clean-up code of the launcher runs, its QEMU dies all the same.
    let (mut guard, qemu) = start_running(&spec_file, &run_dir).await;
    let records = run_dir.join(".children");
    assert!(
        records.join(format!("{}.json", qemu.pid)).exists(),
        "QEMU not recorded"
    );
    guard.child.kill().expect("SIGKILL the launcher");
    let _ = guard.child.wait();
    let deadline = Instant::now() + Duration::from_secs(3);
    while qemu.is_alive() {
        assert!(
            Instant::now() < deadline,
            "QEMU {} outlived its launcher",
            qemu.pid
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A QEMU recorded by an earlier launcher that escaped (here: a stand-in in its
    // own process group, recorded with a dead owner) is killed by the next launcher
    // before it starts its own.
    let mut cmd = Command::new("sleep");
    cmd.arg("300");
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut leftover = cmd.spawn().expect("sleep");
    let leftover_id = hvx_child::ProcId::of(leftover.id()).expect("alive");
    let rec = hvx_child::ProcRecord {
        process: leftover_id.clone(),
        what: "qemu".into(),
        owner: hvx_child::Owner {
            kind: "hvx-launcher".into(),
            process: hvx_child::ProcId {
                start_time: 1,
                ..leftover_id.clone()
            },
        },
    };
    std::fs::write(
        records.join(format!("{}.json", leftover.id())),
        serde_json::to_vec(&rec).expect("json"),
    )
    .expect("record");
    let (mut guard, qemu) = start_running(&spec_file, &run_dir).await;
    assert!(!leftover_id.is_alive(), "the recorded leftover still runs");
    let _ = leftover.wait();
    let running = procs_with(&needle);
    let qemus: Vec<_> = running
        .iter()
        .filter(|(_, ppid)| *ppid == guard.child.id())
        .collect();
    assert_eq!(qemus.len(), 1, "one QEMU for the VM: {running:?}");
    assert_eq!(qemus[0].0, qemu.pid);
    let mut names: Vec<String> = std::fs::read_dir(&records)
        .expect("records")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, [format!("{}.json", qemu.pid)], "records");

    // SIGTERM: a clean stop leaves no process and no record.
    assert!(
        Command::new("kill")
            .args(["-TERM", &guard.child.id().to_string()])
            .status()
            .expect("kill")
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while guard.child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "launcher did not stop");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!qemu.is_alive(), "QEMU outlived a clean stop");
    assert!(!records.exists(), "records left after a clean stop");
    assert!(procs_with(&needle).is_empty(), "{:?}", procs_with(&needle));
}
