//! The gdb connection: a TCP stream with buffered reads and writes. gdbstub
//! writes a reply byte by byte and reads a request byte by byte; on a socket
//! with TCP_NODELAY (which gdb's request/response rhythm needs) that would be one
//! syscall and one segment per byte. Writes collect until gdbstub flushes at the
//! end of a packet; reads take whatever the socket has.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;

use gdbstub::conn::{Connection, ConnectionExt};

pub struct GdbConn {
    stream: TcpStream,
    out: Vec<u8>,
    input: Vec<u8>,
    /// Next unread byte of `input`.
    at: usize,
    nonblocking: bool,
}

impl GdbConn {
    pub fn new(stream: TcpStream) -> Self {
        GdbConn {
            stream,
            out: Vec::with_capacity(8192),
            input: Vec::with_capacity(4096),
            at: 0,
            nonblocking: false,
        }
    }

    fn set_nonblocking(&mut self, on: bool) -> std::io::Result<()> {
        if self.nonblocking != on {
            self.stream.set_nonblocking(on)?;
            self.nonblocking = on;
        }
        Ok(())
    }

    /// Reads what the socket has (at least one byte unless non-blocking).
    /// Returns false when a non-blocking read found nothing.
    fn fill(&mut self, block: bool) -> std::io::Result<bool> {
        self.set_nonblocking(!block)?;
        let mut buf = [0u8; 4096];
        match Read::read(&mut self.stream, &mut buf) {
            Ok(0) => Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                self.input.clear();
                self.input.extend_from_slice(&buf[..n]);
                self.at = 0;
                Ok(true)
            }
            Err(e) if !block && e.kind() == ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
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
        self.set_nonblocking(false)?;
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
        if self.at == self.input.len() {
            self.fill(true)?;
        }
        self.at += 1;
        Ok(self.input[self.at - 1])
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
    use std::net::TcpListener;

    #[test]
    fn bytes_arrive_in_order_and_writes_wait_for_flush() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let mut c = GdbConn::new(l.accept().unwrap().0);
        assert_eq!(c.peek().unwrap(), None, "nothing sent yet");
        Write::write_all(&mut client, b"$g#67").unwrap();
        let got: Vec<u8> = (0..5).map(|_| c.read().unwrap()).collect();
        assert_eq!(got, b"$g#67");
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
