//! `bench --linux KERNEL`: from process start to the kernel's first line
//! (its `Linux version` banner, printed at once with `earlyprintk=serial`),
//! entering the vmlinux vmiscope decompressed on the host, beside the
//! bzImage's own decompressor run in the guest (the baseline), in one run.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::common::{Figure, Report};
use crate::error::Error;

/// Longest a boot may take to print its banner (the decompressor runs in
/// KVM's emulator on a PVM host: minutes).
const LIMIT: Duration = Duration::from_secs(900);

/// Milliseconds from spawning `vmiscope run KERNEL --batch` to the banner.
fn to_banner(kernel: &str, own_decompressor: bool) -> Result<f64, Error> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let t = Instant::now();
    let mut cmd = Command::new(exe);
    cmd.args(["run", kernel, "--batch", "--mem", "512"])
        .args(["--cmdline", "earlyprintk=serial console=ttyS0"])
        .args(["--timeout", &LIMIT.as_secs().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if own_decompressor {
        cmd.arg("--own-decompressor");
    }
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let seen = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains("Linux version"));
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let _ = child.kill();
    let _ = child.wait();
    if !seen {
        return Err(format!("{kernel} printed no `Linux version` line").into());
    }
    Ok(ms)
}

pub fn measure(kernel: &str) -> Result<Report, Error> {
    let ours = to_banner(kernel, false)?;
    let theirs = to_banner(kernel, true)?;
    Ok(Report {
        baseline: "decompressor",
        host: vmiscope_vmm::HostKind::detect().figures_label(),
        iterations: 1,
        repeat: 1,
        figures: vec![Figure {
            name: "linux: process start to banner".into(),
            unit: "ms",
            value: ours,
            baseline: Some(theirs),
            ratio: Some(ours / theirs),
            note: "vmlinux decompressed by vmiscope; baseline: the bzImage's own decompressor in the guest".into(),
        }],
    })
}
