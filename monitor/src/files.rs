//! The host files a user names (`--initrd`, `--exceptions`, `--symbols`,
//! `--journal`, an image): opened so that none can hang the run before it
//! starts, and read with a bound.
//!
//! Opening a FIFO blocks until its other end comes, and a thread blocked in
//! `open` sees no signal handler and no `--timeout`: only SIGKILL ended such a
//! run. So every file is opened non-blocking first. An input that is a FIFO
//! or a socket is refused (it has no size to check and may never end); an
//! output FIFO is taken only when a reader is already there.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Opens `path` to read: a regular file or a device (`/dev/zero` is bounded
/// by the reader), never a FIFO or a socket.
pub fn open_input(path: &Path) -> io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let kind = f.metadata()?.file_type();
    if kind.is_fifo() || kind.is_socket() {
        let what = if kind.is_fifo() { "a FIFO" } else { "a socket" };
        return Err(io::Error::other(format!(
            "{what}, not a file (it has no size to check and may never end)"
        )));
    }
    blocking(&f)?;
    Ok(f)
}

/// Reads at most `limit` bytes of `path`; a longer (or endless) file is
/// refused after one byte more, with `what_limit` saying what the limit is.
pub fn read_bounded(path: &Path, limit: u64, what_limit: &str) -> io::Result<Vec<u8>> {
    let mut data = Vec::new();
    open_input(path)?.take(limit + 1).read_to_end(&mut data)?;
    if data.len() as u64 > limit {
        return Err(io::Error::other(format!("larger than {what_limit}")));
    }
    Ok(data)
}

/// Creates (or truncates) `path` to write. A FIFO with no reader yet is an
/// error at once, not a wait without end.
pub fn create_output(path: &Path) -> io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENXIO) => io::Error::other("a FIFO with no reader"),
            _ => e,
        })?;
    blocking(&f)?;
    Ok(f)
}

/// Clears O_NONBLOCK again: reads and writes wait as usual once open.
fn blocking(f: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    // SAFETY: F_GETFL on a descriptor this File owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on the same descriptor, with an integer argument.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fifo(name: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("vmiscope-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        p
    }

    /// A FIFO given as an input or an output is an error at once, not an
    /// `open` that waits for ever (the run then ignored every signal).
    #[test]
    fn a_fifo_never_blocks_the_open() {
        let p = fifo("in");
        let err = read_bounded(&p, 10, "10 bytes").unwrap_err();
        assert!(err.to_string().contains("a FIFO, not a file"), "{err}");
        let err = create_output(&p).unwrap_err();
        assert!(err.to_string().contains("a FIFO with no reader"), "{err}");
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn an_endless_input_is_refused_after_its_limit() {
        let err = read_bounded(Path::new("/dev/zero"), 4096, "4 KiB").unwrap_err();
        assert_eq!(err.to_string(), "larger than 4 KiB");
        let ok = read_bounded(Path::new("/dev/null"), 4096, "4 KiB").unwrap();
        assert!(ok.is_empty());
    }
}
