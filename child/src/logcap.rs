//! Size caps for the log files of the processes hvx starts (QEMU's serial log,
//! dnsmasq's log), which live in tmpfs (`/run`) and would otherwise grow without
//! bound with a chatty guest or a busy DHCP range.
//!
//! Copy-and-truncate rather than rename: both writers hold the file open for their
//! whole life (QEMU cannot be told to reopen a chardev log), and both open it with
//! `O_APPEND`, so after the truncation their next write lands at the new end of the
//! file. Lines written between the copy and the truncation are lost; for these
//! diagnostics logs that is the accepted price.

use std::io;
use std::path::{Path, PathBuf};

/// `<path>.1`: the one rotated generation kept.
pub fn rotated_log(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// When `path` is larger than `max_bytes`, moves its content to `<path>.1`
/// (replacing the previous one) and empties it. Returns whether it rotated; a
/// missing file is not an error (the writer has not started yet).
pub fn cap_log(path: &Path, max_bytes: u64) -> io::Result<bool> {
    let len = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= max_bytes {
        return Ok(false);
    }
    std::fs::copy(path, rotated_log(path))?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .set_len(0)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn an_appending_writer_keeps_writing_into_the_capped_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("serial.log");
        let mut writer = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open");
        writer.write_all(&[b'a'; 100]).expect("write");
        assert!(!cap_log(&log, 100).expect("cap"), "at the cap: kept");
        writer.write_all(b"b").expect("write");
        assert!(cap_log(&log, 100).expect("cap"), "over the cap: rotated");
        assert_eq!(std::fs::metadata(&log).expect("log").len(), 0);
        assert_eq!(
            std::fs::metadata(rotated_log(&log)).expect("rotated").len(),
            101
        );
        writer.write_all(b"after").expect("write");
        assert_eq!(std::fs::read(&log).expect("log"), b"after");
        assert!(!cap_log(&dir.path().join("absent.log"), 1).expect("absent"));
    }
}
