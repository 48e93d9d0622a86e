//! Background writeback of a file that is still being written (a conversion's output,
//! a moved layer), so its final `fsync` finds little left to write: the disk writes
//! while the data is still being produced instead of after it.
//!
//! A thread runs `fdatasync` on its own handle every `every`. An error a background
//! sync sees is kept and returned by [`Writeback::finish`]: the kernel reports a
//! writeback error to each open file once, so the caller's own final `fsync` alone
//! might not see it.
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{Result, StorageError};

/// How often the background thread syncs: often enough that a few hundred MiB never
/// pile up, rarely enough that the cache flush each sync costs stays small.
pub const INTERVAL: Duration = Duration::from_millis(100);

/// A running background writeback; stopped by [`Writeback::finish`] or on drop.
#[derive(Debug)]
pub struct Writeback {
    path: PathBuf,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

/// What the thread syncs: a file someone else creates (opened once it exists), or an
/// open handle.
enum Target {
    Path(PathBuf),
    File(std::fs::File),
}

impl Writeback {
    /// Writes back `path` once it exists (a file another process creates, e.g.
    /// `qemu-img convert`'s output).
    pub fn of_path(path: &Path, every: Duration) -> Result<Self> {
        Self::start(path, Target::Path(path.to_path_buf()), every)
    }

    /// Writes back the file `file` (a second handle is used: the caller keeps writing).
    pub fn of_file(file: &std::fs::File, path: &Path, every: Duration) -> Result<Self> {
        let handle = file.try_clone().map_err(|source| StorageError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::start(path, Target::File(handle), every)
    }

    fn start(path: &Path, target: Target, every: Duration) -> Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("hvx-writeback".into())
            .spawn(move || run(target, &stopped, every))
            .map_err(|source| StorageError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stops the thread; the first error a background sync saw, if any.
    pub fn finish(mut self) -> Result<()> {
        self.stop_thread()
    }

    fn stop_thread(&mut self) -> Result<()> {
        // Dropping the sender wakes the thread at once.
        self.stop.take();
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let result = thread
            .join()
            .map_err(|_| StorageError::Join("the writeback thread panicked".into()))?;
        result.map_err(|source| StorageError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

impl Drop for Writeback {
    fn drop(&mut self) {
        // Abandoned (an error path): the file is being thrown away, errors do not matter.
        let _ = self.stop_thread();
    }
}

fn run(target: Target, stopped: &mpsc::Receiver<()>, every: Duration) -> std::io::Result<()> {
    let (mut file, path) = match target {
        Target::File(f) => (Some(f), None),
        Target::Path(p) => (None, Some(p)),
    };
    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
        if file.is_none()
            && let Some(p) = &path
        {
            // Not created yet is normal at the start; anything else shows in the
            // caller's own final sync.
            file = std::fs::File::open(p).ok();
        }
        if let Some(f) = &file {
            f.sync_data()?;
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn syncs_a_file_created_after_it_started_and_stops_on_finish() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let wb = Writeback::of_path(&path, Duration::from_millis(5)).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let mut f = std::fs::File::create(&path).unwrap();
        for _ in 0..4 {
            f.write_all(&[7u8; 4096]).unwrap();
            std::thread::sleep(Duration::from_millis(10));
        }
        wb.finish().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 * 4096);
    }

    #[test]
    fn a_path_that_never_appears_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let wb = Writeback::of_path(&dir.path().join("never"), Duration::from_millis(1)).unwrap();
        std::thread::sleep(Duration::from_millis(10));
        wb.finish().unwrap();
    }

    #[test]
    fn a_sync_error_is_returned_by_finish() {
        // fdatasync of a handle that cannot be synced (a pipe: EINVAL) stands in for a
        // writeback error the kernel reports once.
        let (reader, _writer) = std::io::pipe().unwrap();
        let file = std::fs::File::from(std::os::fd::OwnedFd::from(reader));
        let wb = Writeback::of_file(&file, Path::new("pipe"), Duration::from_millis(1)).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let err = wb.finish().unwrap_err();
        assert!(matches!(err, StorageError::Io { .. }), "{err}");
    }
}
