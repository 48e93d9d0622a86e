//! Privileged: boots the test guest under TCG through hvx-vmm and drives its lifecycle
//! over QMP: pause/resume, console, suspend to a file and resume, ACPI shutdown, crash.

mod common;

use common::*;
use hvx_vmm::Accel;
use hvx_vmm::console::{SerialConsole, SerialLog};
use hvx_vmm::qmp::wait_event;
use hvx_vmm::vm::{ExitKind, ShutdownOutcome, StartOptions, Vm};
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(180);
const CMD: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "privileged: make test-integration"]
async fn pause_resume_suspend_resume_shutdown() {
    if !require_root() {
        return;
    }
    let guest = guest_dir();
    let tmp = tempfile::tempdir().expect("tempdir");
    let disk = overlay_on_qcow2_base(&guest, tmp.path());
    let run_dir = tmp.path().join("run");
    let spec = vm_spec("life", &disk, &run_dir);

    let mut vm = Vm::start(&spec, Accel::Tcg, &StartOptions::default())
        .await
        .expect("start");
    vm.wait_running(Duration::from_secs(10))
        .await
        .expect("running");
    let mut log = SerialLog::new(&vm.paths().serial_log);
    log.wait_for("HVX-GUEST ready", BOOT)
        .await
        .expect("guest ready");

    let mut con = SerialConsole::connect(&vm.paths().serial)
        .await
        .expect("console");
    let boot_id = con
        .run("cat /proc/sys/kernel/random/boot_id", CMD)
        .await
        .expect("boot id");
    let boot_id = boot_id.trim().to_string();
    assert_eq!(boot_id.len(), 36, "boot id {boot_id:?}");
    let out = con
        .run("echo kept > /data/f; sync; cat /data/f", CMD)
        .await
        .expect("write /data");
    assert!(out.contains("kept"), "{out:?}");

    // Pause / resume, with their QMP events.
    let mut ev = vm.qmp().subscribe();
    vm.pause().await.expect("pause");
    wait_event(&mut ev, "STOP", CMD).await.expect("STOP event");
    assert_eq!(vm.run_state().await.expect("state"), "paused");
    vm.resume().await.expect("resume");
    wait_event(&mut ev, "RESUME", CMD)
        .await
        .expect("RESUME event");
    assert_eq!(vm.run_state().await.expect("state"), "running");
    assert!(
        con.run("echo alive", CMD)
            .await
            .expect("after resume")
            .contains("alive")
    );

    // Balloon responds (virtio-balloon is in the spec).
    vm.set_balloon(200 * 1024 * 1024).await.expect("balloon");

    // Bad QMP input is an error reply, not a hang.
    let err = vm
        .qmp()
        .execute("no-such-command", None)
        .await
        .expect_err("unknown command");
    assert!(err.to_string().contains("CommandNotFound"), "{err}");

    // Suspend to a file, then resume from it: same boot id, /data intact.
    drop(con);
    let state = tmp.path().join("state/vm.state");
    vm.suspend(&state).await.expect("suspend");
    assert!(state.metadata().expect("state file").len() > 1024 * 1024);
    assert_eq!(vm.wait_exit().await, ExitKind::HostRequested);
    drop(vm);
    let opts = StartOptions {
        resume_from: Some(state.clone()),
        ..StartOptions::default()
    };
    let mut vm = Vm::start(&spec, Accel::Tcg, &opts)
        .await
        .expect("resume from file");
    vm.wait_running(Duration::from_secs(30))
        .await
        .expect("running after resume");
    let mut con = SerialConsole::connect(&vm.paths().serial)
        .await
        .expect("console");
    con.send_line("").await.expect("poke");
    let again = con
        .run("cat /proc/sys/kernel/random/boot_id; cat /data/f", CMD)
        .await
        .expect("after resume");
    assert!(
        again.contains(&boot_id),
        "guest rebooted instead of resuming: {again:?}"
    );
    assert!(again.contains("kept"), "{again:?}");
    drop(con);

    // ACPI shutdown: the guest unmounts /data and powers off within the grace.
    let mut tail = SerialLog::from_end(&vm.paths().serial_log);
    let outcome = vm
        .shutdown(Duration::from_secs(120))
        .await
        .expect("shutdown");
    assert_eq!(outcome, ShutdownOutcome::Graceful);
    tail.wait_for("HVX-GUEST halted", Duration::from_secs(5))
        .await
        .expect("guest halted cleanly");
    assert_eq!(vm.wait_exit().await, ExitKind::GuestPoweroff);
    vm.stop_and_cleanup().await.expect("cleanup");
    assert!(
        !run_dir.exists(),
        "run dir left behind: {:?}",
        std::fs::read_dir(&run_dir).map(|d| d.count())
    );
    assert!(
        no_process_mentions(&run_dir.to_string_lossy()),
        "QEMU left running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "privileged: make test-integration"]
async fn crash_is_reported_and_timeouts_power_off() {
    if !require_root() {
        return;
    }
    let guest = guest_dir();
    let tmp = tempfile::tempdir().expect("tempdir");
    let disk = overlay_on_vmdk(&guest, tmp.path());
    let run_dir = tmp.path().join("run");
    let spec = vm_spec("crash", &disk, &run_dir);

    // Paused guests ignore the power button: shutdown must fall back to power-off.
    let mut vm = Vm::start(&spec, Accel::Tcg, &StartOptions::default())
        .await
        .expect("start");
    vm.pause().await.expect("pause");
    let outcome = vm.shutdown(Duration::from_secs(2)).await.expect("shutdown");
    assert_eq!(outcome, ShutdownOutcome::PoweredOff);
    assert_eq!(vm.wait_exit().await, ExitKind::HostRequested);
    drop(vm);

    // A QEMU killed from outside is a crash with its status.
    let mut vm = Vm::start(&spec, Accel::Tcg, &StartOptions::default())
        .await
        .expect("start");
    vm.wait_running(Duration::from_secs(10))
        .await
        .expect("running");
    let pid = vm.pid().expect("pid");
    let st = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    match vm.wait_exit().await {
        ExitKind::Crashed { status, .. } => assert!(status.contains("signal: 9"), "{status}"),
        other => panic!("expected a crash, got {other:?}"),
    }
    vm.stop_and_cleanup().await.expect("cleanup");
    assert!(!run_dir.exists());

    // Start errors are clear: a missing disk image.
    let mut bad = spec.clone();
    bad.disks[0].path = tmp.path().join("missing.qcow2");
    let err = Vm::start(&bad, Accel::Tcg, &StartOptions::default())
        .await
        .expect_err("missing disk");
    let msg = err.to_string();
    assert!(
        msg.contains("QEMU exited during start-up") && msg.contains("missing.qcow2"),
        "{msg}"
    );
    assert!(!run_dir.join("qmp.sock").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "privileged: make test-integration"]
async fn a_shutdown_requested_while_the_guest_boots_still_ends_cleanly() {
    if !require_root() {
        return;
    }
    let guest = guest_dir();
    let tmp = tempfile::tempdir().expect("tempdir");
    let disk = overlay_on_qcow2_base(&guest, tmp.path());
    let run_dir = tmp.path().join("run");
    let spec = vm_spec("early", &disk, &run_dir);
    let mut vm = Vm::start(&spec, Accel::Tcg, &StartOptions::default())
        .await
        .expect("start");
    vm.wait_running(Duration::from_secs(10))
        .await
        .expect("running");
    // The boot scripts run but the guest's ACPI handler (acpid, started after them)
    // does not yet: a single power-button press now is dropped by the guest.
    let mut log = SerialLog::new(&vm.paths().serial_log);
    log.wait_for("HVX-GUEST dmi", BOOT)
        .await
        .expect("boot scripts started");
    let outcome = vm
        .shutdown(Duration::from_secs(60))
        .await
        .expect("shutdown");
    assert_eq!(
        outcome,
        ShutdownOutcome::Graceful,
        "the guest was powered off instead of shutting down"
    );
    log.wait_for("HVX-GUEST halted", Duration::from_secs(5))
        .await
        .expect("guest halted cleanly");
    vm.stop_and_cleanup().await.expect("cleanup");
}
