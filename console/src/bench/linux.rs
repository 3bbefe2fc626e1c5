//! `bench --linux KERNEL [--initrd FILE]`: from process start to the kernel's
//! first line (its `Linux version` banner, printed at once with
//! `earlyprintk=serial`), entering the vmlinux vmiscope decompressed on the
//! host, beside the bzImage's own decompressor run in the guest (the
//! baseline), in one run. With an initramfs, also from process start to the
//! kernel's `Run /init`, beside QEMU+KVM booting the same kernel and initramfs
//! (through its firmware and the bzImage's decompressor, as QEMU users do).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::common::{Figure, Report};
use crate::error::Error;

/// Longest a boot may take to print its line (the decompressor runs in KVM's
/// emulator on a PVM host: minutes).
const LIMIT: Duration = Duration::from_secs(900);

/// Milliseconds from spawning `cmd` to a line of its stdout with `line`.
fn time_to_line(mut cmd: Command, what: &str, line: &str) -> Result<f64, Error> {
    let t = Instant::now();
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    let mut child = cmd.spawn().map_err(|e| format!("{what}: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    // Its last words, for the error if the line never comes.
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let last = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .filter(|l| !l.trim().is_empty())
            .last()
    });
    // The kill makes a read that waits forever end (a boot that never gets
    // there). `done` goes before the child is reaped, so the pid is ours.
    let pid = child.id();
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let timer = std::thread::spawn(move || {
        if wait.recv_timeout(LIMIT) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
            // Our own child, not yet reaped (see `done`): the pid is still its.
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    });
    let seen = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains(line));
    let ms = t.elapsed().as_secs_f64() * 1e3;
    drop(done);
    let _ = timer.join();
    let _ = child.kill();
    let _ = child.wait();
    let last = last.join().ok().flatten();
    if !seen {
        let why = last
            .map(|l| format!(" (its last words: {l})"))
            .unwrap_or_default();
        return Err(format!("{what} printed no `{line}` line{why}").into());
    }
    Ok(ms)
}

/// `vmiscope run KERNEL --batch` with `extra`.
fn ours(kernel: &str, extra: &[&str]) -> Result<Command, Error> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    cmd.args(["run", kernel, "--batch", "--mem", "512"])
        .args(["--timeout", &LIMIT.as_secs().to_string()])
        .args(extra);
    Ok(cmd)
}

fn banner_figure(kernel: &str) -> Result<Figure, Error> {
    let early = ["--cmdline", "earlyprintk=serial console=ttyS0"];
    let banner = "Linux version";
    let ours_ms = time_to_line(ours(kernel, &early)?, "vmiscope", banner)?;
    let mut own = early.to_vec();
    own.push("--own-decompressor");
    let theirs = time_to_line(ours(kernel, &own)?, "vmiscope --own-decompressor", banner)?;
    Ok(Figure {
        name: "linux: process start to banner".into(),
        unit: "ms",
        value: ours_ms,
        baseline: Some(theirs),
        ratio: Some(ours_ms / theirs),
        note: "vmlinux decompressed by vmiscope; baseline: the bzImage's own decompressor in the guest".into(),
    })
}

/// Process start to `Run /init`, vmiscope beside QEMU+KVM. QEMU's failure
/// (not installed, or no KVM it can use) leaves the baseline empty, with why.
fn init_figure(kernel: &str, initrd: &str) -> Result<Figure, Error> {
    let line = "Run /init";
    let ours_ms = time_to_line(ours(kernel, &["--initrd", initrd])?, "vmiscope", line)?;
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "kvm", "-cpu", "host", "-m", "512", "-smp", "1"])
        .args([
            "-nographic",
            "-no-reboot",
            "-kernel",
            kernel,
            "-initrd",
            initrd,
        ])
        .args(["-append", "console=ttyS0"]);
    let theirs = time_to_line(qemu, "qemu-system-x86_64 -accel kvm", line);
    let note = match &theirs {
        Ok(_) => "baseline: QEMU+KVM, `qemu-system-x86_64 -accel kvm -cpu host -m 512`, same kernel and initramfs".to_string(),
        Err(e) => format!("no baseline: {e}"),
    };
    let theirs = theirs.ok();
    Ok(Figure {
        name: "linux: process start to Run /init".into(),
        unit: "ms",
        value: ours_ms,
        baseline: theirs,
        ratio: theirs.map(|t| ours_ms / t),
        note,
    })
}

pub fn measure(kernel: &str, initrd: Option<&str>) -> Result<Report, Error> {
    let mut figures = vec![banner_figure(kernel)?];
    if let Some(i) = initrd {
        figures.push(init_figure(kernel, i)?);
    }
    Ok(Report {
        baseline: if initrd.is_some() {
            "baseline"
        } else {
            "decompressor"
        },
        host: vmiscope_vmm::HostKind::detect().figures_label(),
        iterations: 1,
        repeat: 1,
        figures,
    })
}
