//! The few syscalls tap passing needs and std does not wrap: opening a persistent tap
//! by name (TUNSETIFF) and sending/receiving fds over a Unix socket (SCM_RIGHTS).
//! Every fd is an `OwnedFd` from the moment the kernel returns it, so error paths
//! close what was opened.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

/// Most fds one message carries (a VM has at most 10 NICs; room to spare).
pub const MAX_FDS: usize = 32;

/// Opens the existing tap `name` through `tun` (`/dev/net/tun`) as QEMU's
/// `ifname=` did: `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, single queue.
pub fn open_tap(tun: &Path, name: &str) -> io::Result<OwnedFd> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not an interface name"),
        ));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(tun)?;
    let fd = OwnedFd::from(file);
    // SAFETY: `ifreq` is plain old data for which all-zero bytes are valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one `ifreq`, which `req` is and outlives the
    // call; the fd is open (owned above).
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Sends `data` with `fds` attached (SCM_RIGHTS) in one `sendmsg`; returns how many
/// bytes went (the caller writes the rest plainly: the fds travel with the first).
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} fds in one message (at most {MAX_FDS})", fds.len()),
        ));
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let payload = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    // u64 words keep the buffer aligned for `cmsghdr`.
    let mut buf = vec![0u64; space.div_ceil(8)];
    // SAFETY: `msghdr` is plain old data; all-zero is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = buf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer is `space` bytes, aligned, and set in `msg`, so
        // CMSG_FIRSTHDR returns a header inside it; CMSG_DATA of that header has room
        // for `payload` bytes (CMSG_SPACE(payload) was allocated), which the copy
        // writes from `fds` (RawFd-sized, as BorrowedFd is repr(transparent)).
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
            std::ptr::copy_nonoverlapping(raw.as_ptr() as *const u8, libc::CMSG_DATA(c), payload);
        }
    }
    // SAFETY: `msg` points at `iov` (over `data`) and `buf`, all alive for the call;
    // the socket fd is borrowed, so open.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Receives into `data` with one `recvmsg`, taking any fds that came along (close
/// on exec, owned: dropped ones are closed). Returns the bytes read and the fds.
pub fn recv_with_fds(sock: BorrowedFd<'_>, data: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let payload = MAX_FDS * std::mem::size_of::<RawFd>();
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    let mut buf = vec![0u64; space.div_ceil(8)];
    // SAFETY: `msghdr` is plain old data; all-zero is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = buf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points at `iov` (over `data`) and `buf`, alive for the call;
    // MSG_CMSG_CLOEXEC: received fds are not inherited by unrelated children.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: after a successful recvmsg the kernel filled `msg.msg_control` with
    // `msg_controllen` bytes of well-formed cmsg headers inside `buf`; CMSG_NXTHDR
    // walks them and stops at the end. Each SCM_RIGHTS payload holds
    // (cmsg_len - CMSG_LEN(0)) / 4 fds now open in this process and owned by
    // nobody else: each is wrapped in an OwnedFd at once (read unaligned, as the
    // data need not be RawFd-aligned).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let first = libc::CMSG_DATA(c) as *const RawFd;
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    let raw = std::ptr::read_unaligned(first.add(i));
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        // Some fds were dropped by the kernel: the set is incomplete (the ones
        // received close with `fds`).
        return Err(io::Error::other("more fds than expected in one message"));
    }
    Ok((n as usize, fds))
}

/// The name of the tap `fd` is attached to (TUNGETIFF): tests and checks.
pub fn tap_name(fd: BorrowedFd<'_>) -> io::Result<String> {
    // SAFETY: `ifreq` is plain old data for which all-zero bytes are valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF writes one `ifreq`, which `req` is and outlives the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut req) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let name: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    Ok(String::from_utf8_lossy(&name).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn fds_cross_a_socket_pair_and_stay_usable() {
        let (a, b) = UnixStream::pair().expect("pair");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, b"hello").expect("write");
        let f = std::fs::File::open(&path).expect("open");
        let sent = send_with_fds(a.as_fd(), b"x\n", &[f.as_fd(), f.as_fd()]).expect("send");
        assert_eq!(sent, 2);
        drop(f);
        let mut buf = [0u8; 16];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).expect("recv");
        assert_eq!(&buf[..n], b"x\n");
        assert_eq!(fds.len(), 2);
        let mut text = String::new();
        std::fs::File::from(fds.into_iter().next().expect("fd"))
            .read_to_string(&mut text)
            .expect("read");
        assert_eq!(text, "hello");
        // No fds: plain data.
        send_with_fds(a.as_fd(), b"y", &[]).expect("send");
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).expect("recv");
        assert_eq!((n, fds.len()), (1, 0));
    }

    #[test]
    fn bad_tap_names_are_refused_before_any_syscall() {
        for bad in ["", "a-name-longer-than-15", "nul\0"] {
            assert!(open_tap(Path::new("/nonexistent"), bad).is_err(), "{bad:?}");
        }
    }
}
