//! Privileged: the accelerator probe really boots a guest kernel.

mod common;

use hvx_vmm::Accel;
use hvx_vmm::accel::{ProbeOptions, check_accelerator, probe_accelerator};

#[tokio::test]
#[ignore = "privileged: make test-integration"]
async fn probe_reports_accelerator_with_reason() {
    if !common::require_root() {
        return;
    }
    let guest = common::guest_dir();
    let opts = ProbeOptions {
        kernel: Some(guest.join("vmlinuz")),
        // Whether it boots is what is checked here, not how fast: a TCG boot on a
        // loaded 2-core machine took longer than the agent's 10 s default.
        timeout: std::time::Duration::from_secs(90),
        ..ProbeOptions::default()
    };
    let report = probe_accelerator(&opts).await;
    eprintln!("accelerator report: {report:?}");
    assert!(report.reason.starts_with("kvm:"), "{}", report.reason);
    match report.accel {
        // Here /dev/kvm exists but cannot boot a kernel: TCG with the reason why.
        Accel::Tcg => {
            assert!(report.reason.contains("using tcg"), "{}", report.reason);
            assert_eq!(report.cpu_model, "qemu64");
        }
        Accel::Kvm => {
            assert!(report.reason.contains("booted"), "{}", report.reason);
            assert_eq!(report.cpu_model, "host");
        }
    }
    // TCG always works: the same probe boots the kernel under binary translation.
    check_accelerator(&opts, Accel::Tcg)
        .await
        .expect("tcg boots the probe kernel");
    // Without /dev/kvm the reason says so.
    let none = ProbeOptions {
        kvm_device: "/nonexistent/kvm".into(),
        ..opts
    };
    let r = probe_accelerator(&none).await;
    assert_eq!(r.accel, Accel::Tcg);
    assert!(
        r.reason.contains("cannot open /nonexistent/kvm"),
        "{}",
        r.reason
    );
}
