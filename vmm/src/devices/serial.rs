//! COM1 on vm-superio's 16550A model. Output goes to a shared log (so tests and
//! the console can read it) and optionally to a live sink.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// A consumer of serial output as it arrives.
pub type LiveSink = Box<dyn FnMut(&[u8]) + Send>;

/// Everything the guest printed, plus an optional live consumer.
#[derive(Default)]
pub struct SerialLog {
    bytes: Mutex<Vec<u8>>,
    live: Mutex<Option<LiveSink>>,
}

impl SerialLog {
    /// Calls `f` with every chunk the guest prints from now on.
    pub fn set_live(&self, f: LiveSink) {
        *self.live.lock().unwrap() = Some(f);
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes.lock().unwrap()).into_owned()
    }

    fn push(&self, data: &[u8]) {
        self.bytes.lock().unwrap().extend_from_slice(data);
        if let Some(f) = self.live.lock().unwrap().as_mut() {
            f(data);
        }
    }
}

/// The writer vm-superio's model prints into.
pub struct LogWriter(Arc<SerialLog>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Raises IRQ 4 through an irqfd when the VM has an in-kernel irqchip.
pub struct IrqTrigger(Option<EventFd>);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        match &self.0 {
            Some(fd) => fd.write(1),
            None => Ok(()),
        }
    }
}

pub struct SerialPort(Serial<IrqTrigger, vm_superio::serial::NoEvents, LogWriter>);

impl SerialPort {
    pub fn new(log: Arc<SerialLog>, irq: Option<EventFd>) -> Self {
        SerialPort(Serial::new(IrqTrigger(irq), LogWriter(log)))
    }

    pub fn write(&mut self, offset: u8, value: u8) {
        // A failed interrupt trigger must not end the guest's output.
        let _ = self.0.write(offset, value);
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        self.0.read(offset)
    }
}
