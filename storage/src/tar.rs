//! Minimal tar (ustar/pax/GNU) reading and writing for OVAs: an index of regular file
//! members by name (nothing is extracted by the index), and a ustar writer.
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use crate::error::{Result, StorageError, io_err};

const BLOCK: u64 = 512;

/// A regular file member: its name as stored, where its data starts, its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub offset: u64,
    pub size: u64,
}

fn ova_err(path: &Path, reason: impl Into<String>) -> StorageError {
    StorageError::Ova {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Octal (or GNU base-256) numeric field.
pub fn parse_numeric(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let text: String = field
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| b as char)
        .collect();
    let text = text.trim();
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

fn header_checksum_ok(h: &[u8]) -> bool {
    let stored = parse_numeric(&h[148..156]);
    let sum: u64 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u64::from(b)
            }
        })
        .sum();
    stored == Some(sum)
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Lists the regular file members. Names are normalised only by dropping a leading
/// "./"; callers match them against plain names, so a member called "../x" or "/etc/x"
/// can never be selected.
pub fn index<R: Read + Seek>(r: &mut R, path: &Path) -> Result<Vec<Member>> {
    let len = r.seek(SeekFrom::End(0)).map_err(io_err(path))?;
    let mut pos = 0u64;
    let mut members = Vec::new();
    let mut long_name: Option<String> = None;
    let mut header = [0u8; 512];
    while pos + BLOCK <= len {
        r.seek(SeekFrom::Start(pos)).map_err(io_err(path))?;
        r.read_exact(&mut header).map_err(io_err(path))?;
        if header.iter().all(|&b| b == 0) {
            break;
        }
        if !header_checksum_ok(&header) {
            return Err(ova_err(path, format!("corrupt tar header at offset {pos}")));
        }
        let size = parse_numeric(&header[124..136])
            .ok_or_else(|| ova_err(path, format!("bad size field at offset {pos}")))?;
        let data = pos + BLOCK;
        // A base-256 size field can hold nearly u64::MAX: every sum is checked.
        let next = size
            .checked_next_multiple_of(BLOCK)
            .and_then(|padded| data.checked_add(padded))
            .ok_or_else(|| ova_err(path, "member size overflows"))?;
        if data + size > len {
            return Err(ova_err(
                path,
                format!("member at offset {pos} is truncated"),
            ));
        }
        let typeflag = header[156];
        let mut name = cstr(&header[0..100]);
        if &header[257..262] == b"ustar" {
            let prefix = cstr(&header[345..500]);
            if !prefix.is_empty() {
                name = format!("{prefix}/{name}");
            }
        }
        match typeflag {
            b'x' | b'L' => {
                if size > 64 << 10 {
                    return Err(ova_err(path, "oversized extended header"));
                }
                let mut buf = vec![0u8; usize::try_from(size).unwrap_or(0)];
                r.seek(SeekFrom::Start(data)).map_err(io_err(path))?;
                r.read_exact(&mut buf).map_err(io_err(path))?;
                long_name = if typeflag == b'L' {
                    Some(cstr(&buf))
                } else {
                    pax_path(&buf)
                };
                pos = next;
                continue;
            }
            b'0' | 0 => {
                let name = long_name.take().unwrap_or(name);
                let name = name.strip_prefix("./").unwrap_or(&name).to_string();
                members.push(Member {
                    name,
                    offset: data,
                    size,
                });
            }
            _ => {
                long_name = None;
            }
        }
        pos = next;
    }
    Ok(members)
}

fn pax_path(buf: &[u8]) -> Option<String> {
    // Records: "<len> key=value\n".
    let text = String::from_utf8_lossy(buf);
    text.lines().find_map(|line| {
        let (_, kv) = line.split_once(' ')?;
        kv.strip_prefix("path=").map(str::to_string)
    })
}

/// Builds a ustar header for a regular file `name` (a plain name) of `size` bytes.
pub fn ustar_header(name: &str, size: u64, mtime: u64) -> Result<[u8; 512]> {
    if name.len() > 100 {
        return Err(StorageError::InvalidName {
            name: name.to_string(),
            reason: "OVA member names are limited to 100 bytes".into(),
        });
    }
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    if size < 0o77_777_777_777 {
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    } else {
        // GNU base-256 for members of 8 GiB and more.
        h[124] = 0x80;
        h[128..136].copy_from_slice(&size.to_be_bytes());
    }
    h[136..148].copy_from_slice(format!("{:011o}\0", mtime & 0o77_777_777_777).as_bytes());
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    Ok(h)
}

/// Appends one member with the contents of `src`.
pub fn append_file<W: Write>(
    out: &mut W,
    name: &str,
    src: &mut dyn Read,
    size: u64,
    out_path: &Path,
) -> Result<()> {
    let header = ustar_header(name, size, 0)?;
    out.write_all(&header).map_err(io_err(out_path))?;
    let copied = std::io::copy(&mut src.take(size), out).map_err(io_err(out_path))?;
    if copied != size {
        return Err(ova_err(
            out_path,
            format!("{name}: copied {copied} of {size} bytes"),
        ));
    }
    let pad = size.next_multiple_of(BLOCK) - size;
    out.write_all(&vec![0u8; usize::try_from(pad).unwrap_or(0)])
        .map_err(io_err(out_path))
}

/// Ends the archive with two zero blocks.
pub fn finish<W: Write>(out: &mut W, out_path: &Path) -> Result<()> {
    out.write_all(&[0u8; 1024]).map_err(io_err(out_path))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn round_trip_and_traversal_names() {
        let mut buf = Vec::new();
        let p = Path::new("t.ova");
        append_file(&mut buf, "a.ovf", &mut &b"hello"[..], 5, p).unwrap();
        append_file(&mut buf, "../evil", &mut &b"x"[..], 1, p).unwrap();
        append_file(&mut buf, "disk.vmdk", &mut &[7u8; 700][..], 700, p).unwrap();
        finish(&mut buf, p).unwrap();
        let idx = index(&mut Cursor::new(&buf), p).unwrap();
        let names: Vec<_> = idx.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["a.ovf", "../evil", "disk.vmdk"]);
        assert_eq!(&buf[idx[0].offset as usize..][..5], b"hello");
        assert_eq!(idx[2].size, 700);
    }

    #[test]
    fn corrupt_and_truncated() {
        let mut buf = Vec::new();
        let p = Path::new("t.ova");
        append_file(&mut buf, "a", &mut &[1u8; 2000][..], 2000, p).unwrap();
        let mut bad = buf.clone();
        bad[10] = b'z';
        assert!(index(&mut Cursor::new(&bad), p).is_err());
        assert!(index(&mut Cursor::new(&buf[..1000]), p).is_err());
    }

    #[test]
    fn base256_sizes() {
        let h = ustar_header("big", 10 << 30, 0).unwrap();
        assert_eq!(parse_numeric(&h[124..136]), Some(10 << 30));
        assert!(header_checksum_ok(&h));
    }

    /// A base-256 size of nearly u64::MAX with a valid checksum: an error, not an
    /// arithmetic overflow (a panic in debug builds, a wrapped bogus member in release).
    #[test]
    fn a_size_near_u64_max_is_refused() {
        let mut h = ustar_header("huge", 1, 0).unwrap();
        h[124] = 0x80;
        h[125..128].fill(0);
        h[128..136].fill(0xff);
        h[148..156].fill(b' ');
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        assert!(header_checksum_ok(&h));
        assert_eq!(parse_numeric(&h[124..136]), Some(u64::MAX));
        let err = index(&mut Cursor::new(&h[..]), Path::new("t.ova")).unwrap_err();
        assert!(err.to_string().contains("overflow"), "{err}");
    }
}
