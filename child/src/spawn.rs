//! Starting children that die with their starter.

use std::io;
use std::os::unix::process::CommandExt;
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

/// Makes `cmd`'s child die with this process: SIGKILL on parent death, set in the
/// child before exec (and a check that the parent did not die before that), and its
/// own process group so a reaper can kill it with whatever it forks.
///
/// Only effective when the spawn happens on a thread that outlives the child: use
/// [`spawn`] / [`spawn_tokio`], which do.
#[allow(unsafe_code)]
pub fn die_with_parent(cmd: &mut std::process::Command) {
    let parent = std::process::id();
    cmd.process_group(0);
    // SAFETY: the closure runs in the forked child before exec and only makes the
    // async-signal-safe syscalls prctl(2) and getppid(2); it allocates nothing (the
    // error is built from a raw errno).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The parent died between fork and prctl: no signal will come.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Lets `cmd`'s child inherit `fds` (NIC taps the node agent passed, for QEMU's
/// `fd=`): every fd hvx holds is close-on-exec, so only these cross the exec, and
/// only into this child (the flag is cleared after the fork, in the child). The
/// caller keeps the fds open until the spawn returned.
#[allow(unsafe_code)]
pub fn keep_fds(cmd: &mut std::process::Command, fds: Vec<std::os::fd::RawFd>) {
    if fds.is_empty() {
        return;
    }
    // SAFETY: the closure runs in the forked child before exec and only makes the
    // async-signal-safe syscall fcntl(2) on fds the parent holds open across the
    // spawn; it allocates nothing (the Vec was moved in before the fork).
    unsafe {
        cmd.pre_exec(move || {
            for fd in &fds {
                if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// The spawner thread's queue. The thread is started once and never ends, so the
/// parent-death signal of its children fires only when the whole process dies.
fn spawner() -> &'static Mutex<mpsc::Sender<Job>> {
    static TX: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    TX.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let started = std::thread::Builder::new()
            .name("hvx-spawner".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            });
        if let Err(e) = started {
            // Without the thread every spawn fails with a clear error (the receiver
            // is gone), rather than silently losing the parent-death guarantee.
            tracing::error!(error = %e, "cannot start the hvx-spawner thread");
        }
        Mutex::new(tx)
    })
}

fn run_on_spawner<T: Send + 'static>(
    job: impl FnOnce() -> T + Send + 'static,
) -> io::Result<mpsc::Receiver<T>> {
    let (tx, rx) = mpsc::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(job());
    });
    spawner()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .send(job)
        .map_err(|_| io::Error::other("the hvx-spawner thread is not running"))?;
    Ok(rx)
}

/// Spawns `cmd` so that its process dies with this one (see [`die_with_parent`]).
/// Blocks the caller for the fork/exec only.
pub fn spawn(mut cmd: std::process::Command) -> io::Result<std::process::Child> {
    die_with_parent(&mut cmd);
    run_on_spawner(move || cmd.spawn())?
        .recv()
        .map_err(|_| io::Error::other("the hvx-spawner thread dropped a spawn"))?
}

/// [`spawn`] for tokio commands: the child is registered with the caller's runtime
/// (so `wait`, pipes and `kill_on_drop` work as usual).
pub async fn spawn_tokio(mut cmd: tokio::process::Command) -> io::Result<tokio::process::Child> {
    die_with_parent(cmd.as_std_mut());
    let handle = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job = move || {
        let _guard = handle.enter();
        let _ = tx.send(cmd.spawn());
    };
    spawner()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .send(Box::new(job))
        .map_err(|_| io::Error::other("the hvx-spawner thread is not running"))?;
    rx.await
        .map_err(|_| io::Error::other("the hvx-spawner thread dropped a spawn"))?
}

/// `Command::output` for short helpers (`ip`, `df`, `qemu --version`) with the same
/// lifetime rule: stdin from /dev/null, stdout and stderr captured.
pub async fn output_tokio(mut cmd: tokio::process::Command) -> io::Result<std::process::Output> {
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    spawn_tokio(cmd).await?.wait_with_output().await
}

/// Blocking [`output_tokio`].
pub fn output(mut cmd: std::process::Command) -> io::Result<std::process::Output> {
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    spawn(cmd)?.wait_with_output()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ProcId;
    use std::time::Duration;

    #[test]
    fn only_kept_fds_cross_the_exec() {
        use std::os::fd::AsRawFd;
        let kept = std::fs::File::open("/dev/null").expect("open");
        let other = std::fs::File::open("/dev/null").expect("open");
        let (k, o) = (kept.as_raw_fd(), other.as_raw_fd());
        let mut c = std::process::Command::new("sh");
        c.arg("-c")
            .arg(format!(
                "test -e /proc/self/fd/{k} && echo kept; test -e /proc/self/fd/{o} && echo leaked; true"
            ))
            .stdout(std::process::Stdio::piped());
        keep_fds(&mut c, vec![k]);
        let out = spawn(c).expect("spawn").wait_with_output().expect("wait");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "kept");
        drop((kept, other));
    }

    #[test]
    fn child_of_a_thread_that_ended_lives_on() {
        // A short-lived thread (as a tokio blocking thread is) starts the child; the
        // child must not get the parent-death signal when that thread ends.
        let child = std::thread::spawn(|| {
            let mut c = std::process::Command::new("sleep");
            c.arg("30");
            spawn(c).expect("spawn")
        })
        .join()
        .expect("thread");
        std::thread::sleep(Duration::from_millis(300));
        let id = ProcId::of(child.id()).expect("still alive after its thread ended");
        assert_eq!(
            crate::pgid(child.id()),
            Some(child.id()),
            "own process group"
        );
        assert!(crate::kill_and_wait(&id, Duration::from_secs(5)));
        let mut child = child;
        let _ = child.wait();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tokio_children_work_as_usual() {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args(["-c", "echo hi; exit 3"])
            .stdout(std::process::Stdio::piped());
        let out = spawn_tokio(cmd)
            .await
            .expect("spawn")
            .wait_with_output()
            .await
            .expect("wait");
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    }

    #[test]
    fn spawn_errors_are_reported() {
        let err = spawn(std::process::Command::new("/nonexistent/tool")).expect_err("no such");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
