//! Live migration benchmark (bench/migration/run.sh): for an idle 512 MiB guest, an
//! idle 1 GiB guest and a 512 MiB guest dirtying memory (pre-copy with auto-converge,
//! then again with post-copy allowed), one boot each, then
//!   1. raw QEMU-to-QEMU migration on loopback: plain TCP, shared disk, QEMU defaults
//!      apart from the same downtime limit, no bandwidth cap and, for the dirtying
//!      guest, auto-converge (without it that migration never ends);
//!   2. hvx migration of the same running guest onward: TLS-PSK, the top overlay
//!      mirrored over NBD to a fresh overlay, pause-before-switchover.
//!
//! Prints `BENCH {json}` lines: downtime and total time, hvx beside raw.
//!
//! Usage: GUEST=<dir of hack/build-guest.sh> cargo run --release --example migration_bench

use hvx_vmm::console::{SerialConsole, SerialLog};
use hvx_vmm::migration::{self, TargetEndpoint, Tuning};
use hvx_vmm::vm::{StartOptions, Vm};
use hvx_vmm::{Accel, VmSpec};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(600);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn endpoint() -> TargetEndpoint {
    TargetEndpoint {
        host: "127.0.0.1".into(),
        migration_port: free_port(),
        nbd_port: free_port(),
    }
}

fn qemu_img(args: &[&str]) -> Result<(), String> {
    let st = Command::new("qemu-img")
        .args(args)
        .status()
        .map_err(|e| format!("qemu-img: {e}"))?;
    st.success()
        .then_some(())
        .ok_or_else(|| format!("qemu-img {args:?} failed"))
}

fn spec(name: &str, mem: u32, disk: &Path, run_dir: &Path) -> Result<VmSpec, String> {
    serde_json::from_value(json!({
        "name": name, "cpu": {"sockets": 1, "cores": 1}, "memory_mib": mem,
        "accelerator": "tcg",
        "disks": [{"name": "boot", "path": disk, "format": "qcow2", "controller": "pvscsi",
                   "unit": 0, "boot_order": 1}],
        "nics": [{"name": "ethernet0", "model": "vmxnet3", "mac": "00:50:56:00:be:02",
                  "backend": {"user": {}}}],
        "run_dir": run_dir, "restart_policy": {"policy": "never"}, "shutdown_timeout_s": 1
    }))
    .map_err(|e| e.to_string())
}

fn incoming() -> StartOptions {
    StartOptions {
        incoming: true,
        ..StartOptions::default()
    }
}

/// Raw QEMU migration; (downtime ms, total ms).
async fn raw_migrate(
    src: &Vm,
    dst: &Vm,
    ep: &TargetEndpoint,
    auto_converge: bool,
) -> Result<(u64, u64), String> {
    let e = |e: hvx_vmm::VmmError| e.to_string();
    src.qmp()
        .execute(
            "migrate-set-capabilities",
            Some(
                json!({"capabilities": [{"capability": "auto-converge", "state": auto_converge}]}),
            ),
        )
        .await
        .map_err(e)?;
    dst.qmp()
        .execute(
            "migrate-incoming",
            Some(json!({"uri": format!("tcp:127.0.0.1:{}", ep.migration_port)})),
        )
        .await
        .map_err(e)?;
    src.qmp()
        .execute(
            "migrate-set-parameters",
            Some(json!({"downtime-limit": 300, "max-bandwidth": u64::MAX >> 2})),
        )
        .await
        .map_err(e)?;
    src.qmp()
        .execute(
            "migrate",
            Some(json!({"uri": format!("tcp:127.0.0.1:{}", ep.migration_port)})),
        )
        .await
        .map_err(e)?;
    let started = Instant::now();
    loop {
        let v = src.qmp().execute("query-migrate", None).await.map_err(e)?;
        match v["status"].as_str().unwrap_or("") {
            "completed" => {
                migration::finish_incoming(dst.qmp(), LONG)
                    .await
                    .map_err(e)?;
                return Ok((
                    v["downtime"].as_u64().unwrap_or(0),
                    v["total-time"]
                        .as_u64()
                        .unwrap_or(started.elapsed().as_millis() as u64),
                ));
            }
            "failed" | "cancelled" => return Err(format!("raw migration failed: {v}")),
            _ => {}
        }
        if started.elapsed() > LONG {
            return Err("raw migration did not complete".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts a 20 ms ping from the guest to QEMU's user-network gateway: what the guest
/// loses while it is paused and moved.
async fn start_ping(vm: &Vm) -> Result<(), String> {
    let mut con = SerialConsole::connect(&vm.paths().serial)
        .await
        .map_err(|e| e.to_string())?;
    con.run(
        "rm -f /tmp/ping.out; ping -i 0.02 10.0.2.2 >/tmp/ping.out 2>&1 & sleep 1",
        LONG,
    )
    .await
    .map(drop)
    .map_err(|e| e.to_string())
}

/// Stops the ping; (sent, lost).
async fn stop_ping(vm: &Vm) -> Result<(u64, u64), String> {
    let mut con = SerialConsole::connect(&vm.paths().serial)
        .await
        .map_err(|e| e.to_string())?;
    con.send_line("").await.map_err(|e| e.to_string())?;
    let out = con
        .run("killall -INT ping; sleep 1; tail -n 3 /tmp/ping.out", LONG)
        .await
        .map_err(|e| e.to_string())?;
    let stats = out
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .ok_or_else(|| format!("no ping summary in {out:?}"))?;
    let nums: Vec<u64> = stats
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    match nums[..] {
        [sent, received, ..] => Ok((sent, sent.saturating_sub(received))),
        _ => Err(format!("cannot read {stats:?}")),
    }
}

fn line(metric: &str, unit: &str, value: f64, base: f64, case: &str) {
    let ratio = if base > 0.0 { value / base } else { 0.0 };
    println!(
        "BENCH {}",
        json!({"group": "migration", "metric": format!("{metric}, {case}"), "unit": unit,
               "value": value, "baseline": "raw QEMU-to-QEMU on the same link (plain TCP, shared disk)",
               "baseline_value": base, "ratio": (ratio * 100.0).round() / 100.0})
    );
}

/// Rewrites 64 MiB of random data in a tmpfs over and over: memory dirtied faster
/// than a pass sends it, so pre-copy needs auto-converge (or post-copy) to end.
const DIRTY_MEMORY: [&str; 2] = [
    "mkdir -p /mem && mount -t tmpfs -o size=160m tmpfs /mem && head -c 67108864 /dev/urandom >/mem/src && echo filled",
    "(while :; do cp /mem/src /mem/churn; done) >/dev/null 2>&1 & sleep 0",
];

/// How the guest behaves and how hvx may migrate it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Load {
    Idle,
    Dirty,
    DirtyPostCopy,
}

async fn case(guest: &Path, work: &Path, name: &str, mem: u32, load: Load) -> Result<(), String> {
    let dirty = load != Load::Idle;
    let dir = work.join(name);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let base = dir.join("base.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "vmdk",
        "-O",
        "qcow2",
        &guest.join("disk-stream.vmdk").to_string_lossy(),
        &base.to_string_lossy(),
    ])?;
    let top = dir.join("a.qcow2");
    let fresh = dir.join("b.qcow2");
    for o in [&top, &fresh] {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            &base.to_string_lossy(),
            &o.to_string_lossy(),
        ])?;
    }
    let e = |e: hvx_vmm::VmmError| e.to_string();
    let s1 = spec(name, mem, &top, &dir.join("run1"))?;
    let src = Vm::start(&s1, Accel::Tcg, &StartOptions::default())
        .await
        .map_err(e)?;
    SerialLog::new(&src.paths().serial_log)
        .wait_for("HVX-GUEST ready", LONG)
        .await
        .map_err(e)?;
    let mut con = SerialConsole::connect(&src.paths().serial)
        .await
        .map_err(e)?;
    con.run(
        "dd if=/dev/zero of=/data/blob bs=1M count=16 2>/dev/null; sync",
        LONG,
    )
    .await
    .map_err(e)?;
    if dirty {
        for cmd in DIRTY_MEMORY {
            con.run(cmd, LONG).await.map_err(e)?;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let out = con.run("ls -l /mem/churn", LONG).await.map_err(e)?;
        if !out.contains("/mem/churn") || out.contains("No such file") {
            return Err(format!("{name}: the memory dirtier did not start: {out:?}"));
        }
    }
    drop(con);

    // 1. Raw: same disk file, plain TCP.
    let ep = endpoint();
    let s2 = spec(name, mem, &top, &dir.join("run2"))?;
    let mid = Vm::start(&s2, Accel::Tcg, &incoming()).await.map_err(e)?;
    start_ping(&src).await?;
    let (raw_down, raw_total) = raw_migrate(&src, &mid, &ep, dirty).await?;
    let (raw_sent, raw_lost) = stop_ping(&mid).await?;
    src.stop_and_cleanup().await.map_err(e)?;

    // 2. hvx: TLS-PSK, top overlay mirrored to a fresh one.
    let tls = dir.join("tls");
    migration::write_psk(&tls, b"bench-bench-bench-bench-bench-32").map_err(e)?;
    let ep = endpoint();
    let s3 = spec(name, mem, &fresh, &dir.join("run3"))?;
    let dst = Vm::start(&s3, Accel::Tcg, &incoming()).await.map_err(e)?;
    let post_copy = load == Load::DirtyPostCopy;
    migration::listen_incoming(dst.qmp(), &ep, &["boot".to_string()], Some(&tls), post_copy)
        .await
        .map_err(e)?;
    let disks = ["boot".to_string()];
    // What the agent uses: post-copy after 6 passes where the migration allows it.
    let tuning = Tuning {
        post_copy_after_passes: post_copy.then_some(6),
        ..Tuning::default()
    };
    let mut progress = |_: &migration::Progress| {};
    start_ping(&mid).await?;
    let (report, resumed) = tokio::join!(
        migration::migrate_to(
            mid.qmp(),
            &ep,
            &disks,
            Some(&tls),
            &tuning,
            LONG,
            &mut progress
        ),
        migration::finish_incoming(dst.qmp(), LONG),
    );
    let report = report.map_err(e)?;
    let resume_ms = resumed.map_err(e)?;
    let (sent, lost) = stop_ping(&dst).await?;
    eprintln!("{name}: ping lost {lost}/{sent} (raw {raw_lost}/{raw_sent})");
    eprintln!("{name}: raw {raw_down}/{raw_total} ms, hvx {report:?} (+{resume_ms} ms resume)");
    let state = dst.run_state().await.map_err(e)?;
    if state != "running" {
        return Err(format!("{name}: target is {state} after migration"));
    }
    mid.stop_and_cleanup().await.map_err(e)?;
    dst.stop_and_cleanup().await.map_err(e)?;
    if post_copy && !report.post_copy {
        eprintln!("{name}: pre-copy converged before the switch to post-copy");
    }
    let what = format!(
        "{name} ({mem} MiB{})",
        match (load, report.post_copy) {
            (Load::Idle, _) => ", idle",
            (Load::Dirty, _) => ", dirtying memory, auto-converge",
            (Load::DirtyPostCopy, true) => ", dirtying memory, switched to post-copy",
            (Load::DirtyPostCopy, false) => ", dirtying memory, post-copy allowed (not needed)",
        }
    );
    line(
        "downtime",
        "ms",
        (report.downtime_ms + resume_ms) as f64,
        raw_down as f64,
        &what,
    );
    line(
        "total time",
        "ms",
        report.total_ms as f64,
        raw_total as f64,
        &what,
    );
    line(
        "pings lost (guest -> gateway every 20 ms, migration window)",
        "packets",
        lost as f64,
        raw_lost as f64,
        &what,
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), String> {
    let guest = PathBuf::from(std::env::var("GUEST").map_err(|_| "set GUEST")?);
    let work = tempfile::Builder::new()
        .prefix("hvx-bench-migration")
        .tempdir_in("/var/tmp")
        .map_err(|e| e.to_string())?;
    case(&guest, work.path(), "idle-512", 512, Load::Idle).await?;
    case(&guest, work.path(), "idle-1g", 1024, Load::Idle).await?;
    case(&guest, work.path(), "dirty-512", 512, Load::Dirty).await?;
    case(
        &guest,
        work.path(),
        "dirty-512-pc",
        512,
        Load::DirtyPostCopy,
    )
    .await?;
    Ok(())
}
