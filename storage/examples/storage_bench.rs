//! Storage figures measured through hvx-storage itself (run by bench/storage/run.sh):
//! import throughput vs plain `qemu-img convert`, snapshot time of 1 GiB and 16 GiB disks,
//! and a cold disk move between two stores vs `cp`.
use std::path::Path;
use std::time::Instant;

use hvx_storage::{DiskStore, ImportSource, StoreConfig};

fn bench_line(metric: &str, unit: &str, value: f64, baseline: &str, baseline_value: f64) {
    let ratio = if baseline_value == 0.0 {
        0.0
    } else {
        value / baseline_value
    };
    println!(
        "BENCH {{\"group\":\"disk\",\"metric\":\"{metric}\",\"unit\":\"{unit}\",\"value\":{value:.3},\"baseline\":\"{baseline}\",\"baseline_value\":{baseline_value:.3},\"ratio\":{ratio:.3}}}"
    );
}

fn sh(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new(program).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap_or_default()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let work = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("storage-bench")
        .tempdir_in(&work)?;
    let store = DiskStore::open(StoreConfig::new(dir.path().join("store")))?;
    let src = dir.path().join("src");
    std::fs::create_dir(&src)?;

    // Import: a 1 GiB streamOptimized VMDK holding 256 MiB of incompressible data.
    let raw = dir.path().join("data.raw");
    sh("qemu-img", &["create", "-q", "-f", "raw", p(&raw), "1G"])?;
    sh(
        "sh",
        &[
            "-c",
            &format!(
                "head -c 268435456 /dev/urandom | dd of={} conv=notrunc status=none",
                p(&raw)
            ),
        ],
    )?;
    let vmdk = src.join("disk.vmdk");
    sh(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            p(&raw),
            p(&vmdk),
        ],
    )?;
    std::fs::remove_file(&raw)?;
    let src_bytes = std::fs::metadata(&vmdk)?.len() as f64 / (1 << 20) as f64;
    let t = Instant::now();
    let plain = dir.path().join("plain.qcow2");
    sh(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-f",
            "vmdk",
            "-O",
            "qcow2",
            p(&vmdk),
            p(&plain),
        ],
    )?;
    let plain_s = t.elapsed().as_secs_f64();
    // The same conversion made durable (what the store must do before it renames a
    // base in): qemu-img convert itself never syncs its output.
    sh("sync", &[p(&plain)])?;
    let plain_synced_s = t.elapsed().as_secs_f64();
    std::fs::remove_file(&plain)?;
    let t = Instant::now();
    let base = store
        .import(
            &ImportSource::Local {
                dir: src.clone(),
                entry: "disk.vmdk".into(),
            },
            None,
            None,
        )
        .await?;
    let store_s = t.elapsed().as_secs_f64();
    bench_line(
        "import_stream_vmdk_throughput",
        "MiB/s",
        src_bytes / store_s,
        "qemu-img convert",
        src_bytes / plain_s,
    );
    bench_line(
        "import_stream_vmdk_throughput_vs_durable",
        "MiB/s",
        src_bytes / store_s,
        "qemu-img convert + sync of its output",
        src_bytes / plain_synced_s,
    );

    // Snapshot time (offline: new qcow2 layer + metadata), 1 GiB and 16 GiB disks.
    let mut times = Vec::new();
    for (name, size) in [("d1g", 1u64 << 30), ("d16g", 16 << 30)] {
        store
            .create_disk("bench", name, &base.digest, Some(size))
            .await?;
        let runs = 5;
        let t = Instant::now();
        for i in 0..runs {
            store
                .snapshot_offline("bench", name, &format!("s{i}"))
                .await?;
        }
        times.push(t.elapsed().as_secs_f64() * 1000.0 / f64::from(runs));
    }
    bench_line(
        "snapshot_time_1GiB",
        "ms",
        times[0],
        "plain qemu-img create overlay",
        qemu_img_create_ms(dir.path(), &base.path, "1G")?,
    );
    bench_line(
        "snapshot_time_16GiB",
        "ms",
        times[1],
        "snapshot of a 1 GiB disk",
        times[0],
    );
    cold_move(dir.path(), &store, &src, &base.digest).await
}

/// Cold move of a stopped VM's disk (the store's two ends, without the gRPC hop):
/// 256 MiB written in the overlay, read and hashed in 1 MiB chunks by a sending thread
/// (the source node's ExportOverlay) and handed over a bounded channel to the receiver
/// (the target node's ImportOverlay: write, hash, check, rebase, install in a second
/// store); the two ends run at once as they do on two nodes. Against `cp` and `sync`
/// of the same layer file.
async fn cold_move(dir: &Path, store: &DiskStore, src: &Path, digest: &str) -> anyhow::Result<()> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    store.create_disk("vm-bench", "root", digest, None).await?;
    let active = store
        .disk_view(&store.load_disk("vm-bench", "root")?)?
        .active_path;
    sh(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x5a 0 256M", p(&active)],
    )?;
    let other = DiskStore::open(StoreConfig::new(dir.join("store2")))?;
    other
        .import(
            &ImportSource::Local {
                dir: src.to_path_buf(),
                entry: "disk.vmdk".into(),
            },
            None,
            None,
        )
        .await?;
    let exported = store.exported_disk("vm-bench", "root")?;
    let bytes: u64 = exported.files.iter().map(|f| f.size).sum();
    let mib = bytes as f64 / f64::from(1 << 20);
    // The copies of the layer written a moment ago would be read from the page cache
    // by both; flush them so neither side pays for the other's writeback.
    sh("sync", &[])?;
    let t = Instant::now();
    let files: Vec<(String, u64)> = exported
        .files
        .iter()
        .map(|f| (f.name.clone(), f.size))
        .collect();
    let mut incoming = other
        .receive_disk("vm-bench", "root", &exported.chain_json, &files)
        .await?;
    // (file, offset, bytes) as ExportOverlay sends them; the digests last.
    let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, u64, Vec<u8>)>(8);
    let paths: Vec<std::path::PathBuf> = exported.files.iter().map(|f| f.path.clone()).collect();
    let sender = std::thread::spawn(move || -> anyhow::Result<Vec<String>> {
        let mut digests = Vec::new();
        for (i, path) in paths.iter().enumerate() {
            let mut file = std::fs::File::open(path)?;
            let (mut hash, mut offset) = (Sha256::new(), 0u64);
            loop {
                let mut buf = vec![0u8; 1 << 20];
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                buf.truncate(n);
                hash.update(&buf);
                tx.send((i, offset, buf))?;
                offset += n as u64;
            }
            digests.push(hvx_storage::names::hex(&hash.finalize()));
        }
        Ok(digests)
    });
    for (i, offset, buf) in rx {
        incoming.write(i, offset, &buf)?;
    }
    let digests = sender
        .join()
        .map_err(|_| anyhow::anyhow!("the sending thread panicked"))??;
    incoming.finish(&digests)?;
    other.install_received(incoming, "bench").await?;
    let move_s = t.elapsed().as_secs_f64();
    let copy = dir.join("copy.qcow2");
    let t = Instant::now();
    sh("cp", &[p(&active), p(&copy)])?;
    sh("sync", &[p(&copy)])?;
    let cp_s = t.elapsed().as_secs_f64();
    bench_line(
        "cold_move_256MiB_overlay_throughput",
        "MiB/s",
        mib / move_s,
        "cp + sync of the layer",
        mib / cp_s,
    );
    Ok(())
}

fn qemu_img_create_ms(dir: &Path, base: &Path, size: &str) -> anyhow::Result<f64> {
    let t = Instant::now();
    for i in 0..5 {
        let out = dir.join(format!("plain{i}.qcow2"));
        sh(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                p(base),
                "-F",
                "qcow2",
                p(&out),
                size,
            ],
        )?;
    }
    Ok(t.elapsed().as_secs_f64() * 1000.0 / 5.0)
}
