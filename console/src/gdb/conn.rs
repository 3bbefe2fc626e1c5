//! The gdb connection: a TCP stream with buffered reads and writes. gdbstub
//! writes a reply byte by byte and reads a request byte by byte; on a socket
//! with TCP_NODELAY (which gdb's request/response rhythm needs) that would be one
//! syscall and one segment per byte. Writes collect until gdbstub flushes at the
//! end of a packet; reads take whatever the socket has.
//!
//! It also notes whether the packet being read is a legacy resume (`c`, `C`, `s`,
//! `S`): gdbstub turns those into a resume of the current thread alone, but in
//! all-stop mode they resume every thread (only the selected one steps), as
//! QEMU's stub does and as LLDB, which sends a plain `c` to continue all
//! threads, relies on. The resume reads the mark (`LegacyResume`).

use std::io::{ErrorKind, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use gdbstub::conn::{Connection, ConnectionExt};

/// Set while the packet being handled is a legacy `c`/`C`/`s`/`S`.
#[derive(Debug, Clone, Default)]
pub struct LegacyResume(Arc<AtomicBool>);

impl LegacyResume {
    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    fn set(&self, on: bool) {
        self.0.store(on, Ordering::SeqCst)
    }
}

pub struct GdbConn {
    stream: TcpStream,
    legacy: LegacyResume,
    /// The last byte read was a packet's `$`.
    after_dollar: bool,
    out: Vec<u8>,
    input: Vec<u8>,
    /// Next unread byte of `input`.
    at: usize,
}

impl GdbConn {
    pub fn new(stream: TcpStream, legacy: LegacyResume) -> Self {
        GdbConn {
            stream,
            legacy,
            after_dollar: false,
            out: Vec::with_capacity(8192),
            input: Vec::with_capacity(4096),
            at: 0,
        }
    }

    /// The socket, for waiting on it together with other sources (`poll`).
    pub fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.stream.as_raw_fd()
    }

    /// Whether a read would not block: bytes are buffered here or waiting in the
    /// socket.
    pub fn has_input(&mut self) -> std::io::Result<bool> {
        Ok(self.at < self.input.len() || self.fill(false)?)
    }

    /// Reads what the socket has (at least one byte unless `block` is false).
    /// Returns false when a non-blocking read found nothing. The socket stays
    /// blocking: a non-blocking read is one `recv` with MSG_DONTWAIT (no fcntl
    /// or ioctl to switch modes around it).
    fn fill(&mut self, block: bool) -> std::io::Result<bool> {
        use nix::sys::socket::{MsgFlags, recv};
        use std::os::fd::AsRawFd;
        let mut buf = [0u8; 4096];
        let flags = match block {
            true => MsgFlags::empty(),
            false => MsgFlags::MSG_DONTWAIT,
        };
        match recv(self.stream.as_raw_fd(), &mut buf, flags) {
            Ok(0) => Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                self.input.clear();
                self.input.extend_from_slice(&buf[..n]);
                self.at = 0;
                Ok(true)
            }
            Err(errno) => {
                let e = std::io::Error::from(errno);
                match e.kind() {
                    ErrorKind::WouldBlock if !block => Ok(false),
                    ErrorKind::Interrupted => Ok(false),
                    _ => Err(e),
                }
            }
        }
    }
}

impl Connection for GdbConn {
    type Error = std::io::Error;

    fn write(&mut self, byte: u8) -> Result<(), Self::Error> {
        self.out.push(byte);
        Ok(())
    }

    fn write_all(&mut self, buf: &[u8]) -> Result<(), Self::Error> {
        self.out.extend_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Self::Error> {
        Write::write_all(&mut self.stream, &self.out)?;
        self.out.clear();
        Write::flush(&mut self.stream)
    }

    fn on_session_start(&mut self) -> Result<(), Self::Error> {
        self.stream.set_nodelay(true)
    }
}

impl ConnectionExt for GdbConn {
    fn read(&mut self) -> Result<u8, Self::Error> {
        while self.at == self.input.len() {
            self.fill(true)?;
        }
        self.at += 1;
        let b = self.input[self.at - 1];
        // A raw `$` always starts a packet (inside one it is escaped), so the
        // byte after it is the packet's command letter.
        if self.after_dollar {
            self.legacy.set(matches!(b, b'c' | b'C' | b's' | b'S'));
        }
        self.after_dollar = b == b'$';
        Ok(b)
    }

    fn peek(&mut self) -> Result<Option<u8>, Self::Error> {
        if self.at == self.input.len() && !self.fill(false)? {
            return Ok(None);
        }
        Ok(Some(self.input[self.at]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;

    #[test]
    fn bytes_arrive_in_order_and_writes_wait_for_flush() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let legacy = LegacyResume::default();
        let mut c = GdbConn::new(l.accept().unwrap().0, legacy.clone());
        assert_eq!(c.peek().unwrap(), None, "nothing sent yet");
        Write::write_all(&mut client, b"$g#67").unwrap();
        let got: Vec<u8> = (0..5).map(|_| c.read().unwrap()).collect();
        assert_eq!(got, b"$g#67");
        assert!(!legacy.get());
        Write::write_all(&mut client, b"$c#63").unwrap();
        let _: Vec<u8> = (0..5).map(|_| c.read().unwrap()).collect();
        assert!(legacy.get(), "a plain `c` is a legacy resume");
        Write::write_all(&mut client, b"$vCont;c:1#00").unwrap();
        let _: Vec<u8> = (0..2).map(|_| c.read().unwrap()).collect();
        assert!(!legacy.get(), "vCont is not");
        let _: Vec<u8> = (0..11).map(|_| c.read().unwrap()).collect();
        c.write_all(b"+$OK").unwrap();
        c.write(b'#').unwrap();
        c.write_all(b"9a").unwrap();
        client.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 16];
        assert!(
            Read::read(&mut client, &mut buf).is_err(),
            "unflushed bytes stay here"
        );
        c.flush().unwrap();
        client.set_nonblocking(false).unwrap();
        let n = Read::read(&mut client, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"+$OK#9a");
        drop(client);
        assert!(c.read().is_err(), "a closed peer is an error, not a hang");
    }
}
