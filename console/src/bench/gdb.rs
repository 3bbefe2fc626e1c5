//! `vmiscope bench`'s gdb figures: a `stepi` round trip through the stub (the
//! remote protocol over loopback TCP, as gdb speaks it) beside KVM's raw
//! single-step exit on the same instruction stream, and memory read throughput
//! for a large `x/`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::error::Error;

use kvm_bindings::{KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, kvm_guest_debug};
use kvm_ioctls::VcpuExit;

use super::common::{Figure, median};
use crate::session::Session;

/// The `spin` image in its CPL0 `out` loop: the same stream for both step loops.
const SPIN_CPL0_OUT: u64 = 2;
/// The `spin` image's CPL3 compute loop.
const SPIN_CPL3_LOOP: u64 = 4;
/// `spin` mode 7: CPL0 calls of `spin_kbp` (kernel text) in a loop.
const SPIN_KBP: u64 = 7;

/// Microseconds per KVM single-step exit in a bare KVM_RUN loop, over `n` steps
/// from the image's entry.
fn raw_steps(n: u64) -> Result<f64, Error> {
    // The VM's memory lives as long as its shared half: keep it.
    let (_shared, mut fds) = super::common::spin_vm(SPIN_CPL0_OUT, 1 << 30, 1)?.into_raw();
    let fd = &mut fds[0];
    let dbg = kvm_guest_debug {
        control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP,
        ..Default::default()
    };
    fd.set_guest_debug(&dbg).map_err(|e| e.to_string())?;
    let (mut steps, start) = (0u64, Instant::now());
    while steps < n {
        match fd.run().map_err(|e| format!("KVM_RUN: {e}"))? {
            VcpuExit::Debug(_) => steps += 1,
            VcpuExit::IoIn(_, data) => data.fill(0),
            VcpuExit::IoOut(..) => {}
            e => return Err(format!("unexpected exit after {steps} steps: {e:?}").into()),
        }
    }
    Ok(start.elapsed().as_secs_f64() * 1e6 / n as f64)
}

/// A minimal remote-protocol client (no-ack mode after the first exchange).
struct Rsp {
    conn: std::io::BufReader<TcpStream>,
    acks: bool,
}

impl Rsp {
    fn connect(port: u16) -> Result<Rsp, Error> {
        let conn = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        conn.set_nodelay(true).map_err(|e| e.to_string())?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let mut r = Rsp {
            conn: std::io::BufReader::new(conn),
            acks: true,
        };
        r.ask("QStartNoAckMode")?;
        r.acks = false;
        Ok(r)
    }

    fn send(&mut self, body: &str) -> Result<(), Error> {
        let sum = body.bytes().fold(0u8, |a, b| a.wrapping_add(b));
        // One write: `write!` on the socket would send `$`, the body, `#` and the
        // checksum as four segments (NODELAY), waking the stub up to four times.
        let packet = format!("${body}#{sum:02x}");
        self.conn
            .get_mut()
            .write_all(packet.as_bytes())
            .map_err(|e| e.to_string())
            .map_err(Into::into)
    }

    /// The next packet's body (acks and notifications skipped). Read in bulk,
    /// as gdb does: a byte at a time, a large reply (the old ~1 250-digit `g`,
    /// an `m` of 32 KiB) cost this client more than the stub took to make it.
    fn recv(&mut self) -> Result<String, Error> {
        use std::io::BufRead;
        let io = |e: std::io::Error| e.to_string();
        loop {
            let buf = self.conn.fill_buf().map_err(io)?;
            if buf.is_empty() {
                return Err("the stub closed the connection".into());
            }
            if let Some(i) = buf.iter().position(|&b| b == b'$') {
                self.conn.consume(i + 1);
                break;
            }
            let n = buf.len();
            self.conn.consume(n);
        }
        let mut raw = Vec::new();
        self.conn.read_until(b'#', &mut raw).map_err(io)?;
        if raw.pop() != Some(b'#') {
            return Err("a packet without its end".into());
        }
        let mut sum = [0u8; 2];
        self.conn.read_exact(&mut sum).map_err(io)?;
        if self.acks {
            self.conn.get_mut().write_all(b"+").map_err(io)?;
        }
        // Run-length encoding: `X*n` repeats X (n - 29) more times.
        let mut body = Vec::with_capacity(raw.len() * 2);
        let mut bytes = raw.into_iter();
        while let Some(b) = bytes.next() {
            if b != b'*' {
                body.push(b);
                continue;
            }
            let n = bytes.next().ok_or("RLE without a count")?;
            let last = *body.last().ok_or("RLE with nothing to repeat")?;
            body.extend(std::iter::repeat_n(last, n.saturating_sub(29) as usize));
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    fn ask(&mut self, body: &str) -> Result<String, Error> {
        self.send(body)?;
        self.recv()
    }
}

/// The stub on a loopback port over a `spin` session in `mode`, and a client
/// connected to it.
fn stub(mode: u64) -> Result<(Rsp, std::thread::JoinHandle<()>, Session), Error> {
    let s = super::common::spin_session(mode, 1 << 30)?;
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let g = s.attach(false);
    let server = std::thread::spawn(move || {
        crate::gdb::serve(
            listener,
            g,
            None,
            &std::sync::atomic::AtomicBool::new(false),
        )
    });
    let mut rsp = Rsp::connect(port)?;
    rsp.ask("?")?;
    Ok((rsp, server, s))
}

fn end(mut rsp: Rsp, server: std::thread::JoinHandle<()>, mut s: Session) {
    let _ = rsp.send("k");
    let _ = server.join();
    s.finish();
}

/// Microseconds per `stepi` as gdb does it: a step (vCont;s) to its stop reply,
/// which carries the registers gdb needs to show where the step ended (rbp, rsp,
/// rip, as gdbserver's does: gdb then reads no registers; `tests/gdb.rs` checks
/// that). Then, timed apart, a register read (g) as a debugger that wants them
/// all would follow it with (LLDB, or gdb before the expedited registers), whose
/// reply `check` inspects; and per step, one packet that touches no vCPU (qC:
/// which thread is current): the floor that TCP and the stub's loop set, in the
/// same conditions (where the scheduler has put the threads decides whether a
/// packet costs 5 or 50 us on this host, so a floor from another moment would
/// not compare); and a g with no step before it.
fn steps(rsp: &mut Rsp, n: u64, check: impl Fn(&str) -> Result<(), Error>) -> Result<Steps, Error> {
    let mut d = [Duration::ZERO; 4];
    let mut timed = |i: usize, rsp: &mut Rsp, body: &str| -> Result<String, Error> {
        let t = Instant::now();
        let r = rsp.ask(body);
        d[i] += t.elapsed();
        r
    };
    for _ in 0..n {
        let stop = timed(0, rsp, "vCont;s:1")?;
        let regs = timed(1, rsp, "g")?;
        if !stop.starts_with('T') || !stop.contains(";10:") || regs.starts_with('E') {
            return Err(format!("stepi answered {stop} / {regs:.8}").into());
        }
        check(&regs)?;
        timed(2, rsp, "qC")?;
        timed(3, rsp, "g")?;
    }
    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    Ok(Steps {
        step: per(d[0]),
        step_regs: per(d[1]),
        floor: per(d[2]),
        regs: per(d[3]),
    })
}

/// Microseconds per stepi, per register read right after it, per bare packet
/// (qC) and per register read with no step before it (g), in one loop.
struct Steps {
    step: f64,
    step_regs: f64,
    floor: f64,
    regs: f64,
}

/// `stepi` from the entry through the CPL0 `out` loop.
fn gdb_steps(n: u64) -> Result<Steps, Error> {
    let (mut rsp, server, s) = stub(SPIN_CPL0_OUT)?;
    let r = steps(&mut rsp, n, |_| Ok(()))?;
    end(rsp, server, s);
    Ok(r)
}

/// `stepi` in the CPL3 compute loop: on PVM each step is RFLAGS.TF caught at the
/// guest's #DB entry (see vmm's usertrap).
fn gdb_user_steps(n: u64) -> Result<f64, Error> {
    let (mut rsp, server, s) = stub(SPIN_CPL3_LOOP)?;
    let at = super::common::spin_sym("user_spin")?;
    for cmd in [
        format!("Z0,{at:x},1"),
        "vCont;c:1".into(),
        format!("z0,{at:x},1"),
    ] {
        let r = rsp.ask(&cmd)?;
        if r.starts_with('E') {
            return Err(format!("{cmd} answered {r}").into());
        }
    }
    // CS follows 16 GPRs, RIP and EFLAGS (140 bytes, 280 hex digits).
    let us = steps(&mut rsp, n, |regs| match regs.get(280..282) {
        Some("23") => Ok(()),
        _ => Err(format!("a user stepi left CPL3: cs {:?}", regs.get(280..288)).into()),
    })?
    .step;
    end(rsp, server, s);
    Ok(us)
}

/// Microseconds per `continue` to a breakpoint on `spin_kbp` (kernel text,
/// called in a loop), hit `n` times, as gdb drives it: the breakpoint is
/// re-inserted after the first stop (gdb removes and re-inserts its breakpoints
/// around every stop), then `vCont;c` to each hit. `visible`: gdb's `monitor
/// breakpoints visible` first (plain INT3s).
fn gdb_continue_hits(n: u64, visible: bool) -> Result<f64, Error> {
    let (mut rsp, server, s) = stub(SPIN_KBP)?;
    if visible {
        let cmd: String = "breakpoints visible"
            .bytes()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut r = rsp.ask(&format!("qRcmd,{cmd}"))?;
        while r.starts_with('O') && r != "OK" {
            r = rsp.recv()?;
        }
    }
    let at = super::common::spin_sym("spin_kbp")?;
    let (ins, del) = (format!("Z0,{at:x},1"), format!("z0,{at:x},1"));
    for cmd in [&ins, "vCont;c:1", &del, &ins] {
        let r = rsp.ask(cmd)?;
        if r.starts_with('E') {
            return Err(format!("{cmd} answered {r}").into());
        }
    }
    let start = Instant::now();
    for _ in 0..n {
        let r = rsp.ask("vCont;c:1")?;
        if !r.starts_with('T') {
            return Err(format!("continue answered {r}").into());
        }
    }
    let us = start.elapsed().as_secs_f64() * 1e6 / n as f64;
    end(rsp, server, s);
    Ok(us)
}

/// MB/s for reading `total` bytes of guest memory with `m` packets of the size
/// the stub offers (what gdb does for a large `x/`).
fn gdb_read(total: usize) -> Result<(f64, usize), Error> {
    let (mut rsp, server, s) = stub(SPIN_CPL0_OUT)?;
    let features = rsp.ask("qSupported:multiprocess-;swbreak+")?;
    let packet = features
        .split(';')
        .find_map(|f| f.strip_prefix("PacketSize="))
        .and_then(|v| usize::from_str_radix(v, 16).ok())
        .unwrap_or(4096);
    // Hex doubles the data; leave room for the framing.
    let chunk = ((packet - 16) / 2).min(total);
    let base = 0x10_0000u64;
    let start = Instant::now();
    let mut done = 0;
    while done < total {
        let n = chunk.min(total - done);
        let reply = rsp.ask(&format!("m{:x},{n:x}", base + done as u64))?;
        if reply.len() != 2 * n {
            return Err((format!(
                "read at {:#x}: {} hex digits",
                base + done as u64,
                reply.len()
            ))
            .into());
        }
        done += n;
    }
    let mbs = total as f64 / start.elapsed().as_secs_f64() / 1e6;
    end(rsp, server, s);
    Ok((mbs, chunk))
}

/// The stepi figures (CPL0 and CPL3), the packet floor and the register read.
fn step_figures(repeat: usize, figures: &mut Vec<Figure>) -> Result<(), Error> {
    const STEPS: u64 = 500;
    let mut runs = vec![];
    let mut raw = vec![];
    for _ in 0..repeat {
        raw.push(raw_steps(STEPS)?);
        runs.push(gdb_steps(STEPS)?);
    }
    let of = |f: fn(&Steps) -> f64| median(runs.iter().map(f).collect());
    let r = median(raw);
    let (g, gr, f, rg) = (
        of(|s| s.step),
        of(|s| s.step + s.step_regs),
        of(|s| s.floor),
        of(|s| s.regs),
    );
    figures.push(Figure {
        name: "gdb stepi round trip, CPL0".into(),
        unit: "us/step",
        value: g,
        baseline: Some(r),
        ratio: Some(g / r),
        note: format!(
            "vCont;s + its stop reply (with rbp/rsp/rip: gdb reads no registers after it) over loopback TCP, {STEPS} steps from the entry; baseline: KVM_GUESTDBG_SINGLESTEP exits in a bare KVM_RUN loop, same steps"
        ),
    });
    let user: Vec<f64> = (0..repeat)
        .map(|_| gdb_user_steps(STEPS))
        .collect::<Result<_, _>>()?;
    let u = median(user);
    figures.push(Figure {
        name: "gdb stepi round trip, CPL3".into(),
        unit: "us/step",
        value: u,
        baseline: Some(r),
        ratio: Some(u / r),
        note: format!(
            "{STEPS} steps in a user-mode loop; on PVM RFLAGS.TF caught at the guest's #DB entry (KVM cannot step CPL3 here); baseline: the CPL0 KVM single-step exit above"
        ),
    });
    figures.push(Figure {
        name: "gdb packet round trip (no vCPU work)".into(),
        unit: "us/packet",
        value: f,
        baseline: None,
        ratio: None,
        note: "qC over loopback TCP, one after each CPL0 stepi above: the floor under every gdb command here".into(),
    });
    figures.push(Figure {
        name: "gdb stepi, CPL0, against its floor".into(),
        unit: "us/step",
        value: g,
        baseline: Some(f + r),
        ratio: Some(g / (f + r)),
        note:
            "the stepi above; baseline: the packet round trip + the raw single-step exit, same run"
                .into(),
    });
    figures.push(Figure {
        name: "gdb stepi + register read, CPL0".into(),
        unit: "us/step",
        value: gr,
        baseline: Some(f + rg + r),
        ratio: Some(gr / (f + rg + r)),
        note: format!(
            "the stepi above, then a g (the general registers; x87/SSE and the rest come by p when asked), as LLDB or a gdb that wanted every register would; baseline: a qC round trip + a g round trip ({rg:.1} us, no step between) + the raw single-step exit: the rest is handing the vCPU over"
        ),
    });
    Ok(())
}

pub fn figures(repeat: usize, figures: &mut Vec<Figure>) -> Result<(), Error> {
    step_figures(repeat, figures)?;
    const HITS: u64 = 200;
    let (mut hid, mut vis) = (vec![], vec![]);
    for _ in 0..repeat {
        vis.push(gdb_continue_hits(HITS, true)?);
        hid.push(gdb_continue_hits(HITS, false)?);
    }
    let (h, v) = (median(hid), median(vis));
    figures.push(Figure {
        name: "gdb continue to a breakpoint, hidden".into(),
        unit: "us/hit",
        value: h,
        baseline: Some(v),
        ratio: Some(h / v),
        note: format!(
            "vCont;c to a `break` on kernel text hit {HITS} times (a loop calls it); baseline: the same with `monitor breakpoints visible`"
        ),
    });
    let mut mbs = vec![];
    let mut chunk = 0;
    for _ in 0..repeat {
        let (m, c) = gdb_read(8 << 20)?;
        mbs.push(m);
        chunk = c;
    }
    figures.push(Figure {
        name: "gdb memory read (large x/)".into(),
        unit: "MB/s",
        value: median(mbs),
        baseline: None,
        ratio: None,
        note: format!(
            "8 MiB of guest memory in `m` packets of {chunk} bytes through the guest's page tables"
        ),
    });
    Ok(())
}
