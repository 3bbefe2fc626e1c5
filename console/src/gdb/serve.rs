//! Serving gdb connections, and `run --gdb`.

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use gdbstub::stub::DisconnectReason;
use vmiscope_vmm::StopReason;

use super::*;
use crate::gdb::conn::GdbConn;
use crate::session::Session;

/// The stub's packet size (gdb's PacketSize): 64 KiB of hex is 32 KiB of memory
/// per `m`/`M` packet.
const PACKET_SIZE: usize = 64 * 1024;

/// `HOST:PORT`, or a bare port on 127.0.0.1.
pub fn bind_addr(a: &str) -> String {
    if a.contains(':') {
        a.to_string()
    } else {
        format!("127.0.0.1:{a}")
    }
}

/// Serves gdb connections one after another until the guest ends or gdb kills it.
/// A detach leaves the guest running.
pub fn serve(listener: TcpListener, s: Session, exec_file: Option<String>, active: &AtomicBool) {
    let mut target = GdbTarget::new(s, exec_file);
    while !target.s.ended() {
        let conn = match listener.accept() {
            Ok((c, peer)) => {
                crate::errln!("[vmiscope] gdb connected from {peer}");
                c
            }
            Err(e) => {
                crate::errln!("[vmiscope] gdb: {e}");
                return;
            }
        };
        let _ = conn.set_nodelay(true);
        let mut killed_reply = conn.try_clone().ok();
        // gdb expects the target stopped when it attaches.
        if !target.s.run_state().is_held() {
            target.all_stop();
        }
        target.seen = target.s.control().stop_count();
        // A large packet buffer: gdb reads and writes memory in PacketSize chunks,
        // and each chunk is a round trip.
        let stub =
            match gdbstub::stub::GdbStubBuilder::new(GdbConn::new(conn, target.legacy.clone()))
                .packet_buffer_size(PACKET_SIZE)
                .build()
            {
                Ok(s) => s,
                Err(e) => {
                    crate::errln!("[vmiscope] gdb: {e}");
                    return;
                }
            };
        active.store(true, Ordering::SeqCst);
        let ended = super::event_loop::run(stub, &mut target);
        active.store(false, Ordering::SeqCst);
        match ended {
            Ok(DisconnectReason::Kill) => {
                // gdbstub closes without a reply; LLDB waits for one (lldb-server
                // answers `X09`: ended by SIGKILL), gdb does not care.
                if let Some(c) = killed_reply.as_mut() {
                    use std::io::Write as _;
                    let _ = c.write_all(b"$X09#ea");
                }
                target.s.shared().stop(StopReason::User);
                let _ = target.s.control().resume(None);
                return;
            }
            Ok(DisconnectReason::Disconnect) => {
                crate::errln!("[vmiscope] gdb detached; the guest runs on");
                target.s.go();
            }
            Ok(_) => return,
            // A broken connection or a malformed conversation ends this session
            // only: the guest stays stopped for the next gdb (as with QEMU).
            Err(e) => crate::errln!("[vmiscope] gdb session ended: {e}; waiting for gdb again"),
        }
    }
}

/// The file gdb reads the image's symbols from: the user's own file, or a
/// built-in image written to a private temporary file (a fresh name created
/// exclusively, so no planted file or link is followed; mode 0600), which is
/// removed when this value goes (the end of the run).
pub struct ImageFile {
    path: String,
    temporary: bool,
}

impl ImageFile {
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl Drop for ImageFile {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The file gdb should read symbols from: the image itself when it is an ELF
/// file on disk; a copy of a built-in image; for a Linux kernel, an ELF made
/// of the symbols the run uses (kallsyms or a System.map).
pub fn exec_file_for(
    image: &str,
    bytes: &[u8],
    symbols: &vmiscope_monitor::Symbols,
) -> Option<ImageFile> {
    if vmiscope_vmm::loader::is_linux(bytes) {
        return temp_file(image, &super::symbol_file::elf(symbols));
    }
    if vmiscope_images::find(image).is_none() {
        let path = std::fs::canonicalize(image).ok()?.display().to_string();
        return Some(ImageFile {
            path,
            temporary: false,
        });
    }
    temp_file(image, bytes)
}

/// `bytes` in a new private file in the temporary directory, removed with the
/// returned handle.
fn temp_file(image: &str, bytes: &[u8]) -> Option<ImageFile> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let image = std::path::Path::new(image)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for attempt in 0..16u32 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "vmiscope-{}-{:08x}{attempt:x}-{image}.elf",
            std::process::id(),
            nanos
        );
        let p = std::env::temp_dir().join(name);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p);
        match file {
            Ok(mut f) => {
                let exec = ImageFile {
                    path: p.display().to_string(),
                    temporary: true,
                };
                f.write_all(bytes).ok()?;
                return Some(exec);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(_) => return None,
        }
    }
    None
}

/// `run --gdb`: the stub on its own thread (next to a console, or alone in batch
/// mode, where the run ends with the guest).
pub fn run(a: &crate::cli::RunArgs, addr: &str, ui: Option<crate::cli::Mode>) -> i32 {
    let mut s = match Session::start(a) {
        Ok(s) => s,
        Err(e) => {
            crate::errln!("vmiscope: error: {e}");
            return 2;
        }
    };
    if ui.is_none() {
        // No console shows them: alerts go to stderr, as in plain `--batch`.
        s.intro().set_alert_sink(crate::format::stderr_alert_sink());
    }
    let addr = bind_addr(addr);
    let listener = match TcpListener::bind(&addr) {
        Ok(l) if l.local_addr().is_ok_and(|a| !a.ip().is_loopback()) => {
            // The stub reads and writes guest memory and registers for anyone who
            // reaches it: say so where it cannot be missed.
            crate::errln!(
                "[vmiscope] WARNING: the gdb stub listens on {addr}, beyond this host: anyone who reaches it controls the guest"
            );
            l
        }
        Ok(l) => l,
        Err(e) => {
            crate::errln!("vmiscope: error: cannot listen on {addr}: {e}");
            s.finish();
            return 2;
        }
    };
    // Kept until the run ends: a temporary file is removed with it.
    let exec = crate::launch::load_image(&a.image, a.mem)
        .ok()
        .and_then(|(img, _)| exec_file_for(&a.image, &img, s.intro().symbols()));
    let exec_path = exec.as_ref().map(|e| e.path().to_string());
    crate::errln!(
        "[vmiscope] gdb: the guest waits at its entry; connect with `gdb -ex 'target remote {}'`",
        listener.local_addr().map(|a| a.to_string()).unwrap_or(addr)
    );
    let g = s.attach(a.gdb_host_writes);
    // Whether a gdb session is on: the guest's end is then reported to it
    // (`W`/`X`) before the process exits.
    let active = Arc::new(AtomicBool::new(false));
    // Told when the server thread is done (it has reported the end to gdb).
    let (served, server_done) = std::sync::mpsc::channel::<()>();
    let server = {
        let active = active.clone();
        std::thread::spawn(move || {
            serve(listener, g, exec_path, &active);
            let _ = served.send(());
        })
    };
    let code = match ui {
        Some(mode) => crate::ui::run_session(s, mode),
        None => {
            // The guest's lines as they come: woken by each notice (a serial
            // line, or the end, which is queued even if it came before the
            // first check).
            let notices = s.intro().subscribe();
            let mut printed = 0;
            while !s.ended() {
                print_new_serial(&s, &mut printed);
                if notices.recv().is_err() {
                    break;
                }
            }
            print_new_serial(&s, &mut printed);
            // A connected gdb gets the guest's end (bounded: a stuck peer does not
            // hold the exit).
            if active.load(Ordering::SeqCst) {
                let _ = server_done.recv_timeout(Duration::from_secs(5));
            }
            let o = s.finish();
            let code = o.map(|o| o.reason.exit_status()).unwrap_or(0);
            if let Some(o) = o {
                crate::errln!("[vmiscope] stop: {}", o.reason);
            }
            code
        }
    };
    // The listener thread ends with the guest (or is left blocked in accept).
    drop(server);
    drop(exec);
    code
}

fn print_new_serial(s: &Session, printed: &mut usize) {
    let lines = s.serial_lines();
    let complete = lines.len().saturating_sub(1);
    for l in &lines[(*printed).min(complete)..complete] {
        crate::outln!("{l}");
    }
    *printed = complete.max(*printed);
}
