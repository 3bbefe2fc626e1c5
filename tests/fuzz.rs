//! A bounded, seeded fuzz suite that keeps the hardening findings fixed: mutated
//! images and mutated Linux kernels (the bzImage boot path), hostile guest code
//! at CPL0 and CPL3 (with and without policies), random and malformed gdb
//! packets followed by a real gdb attaching, random console lines, FIFOs and
//! full disks for every file option, and signals at random moments of REPL and
//! TUI sessions. The rule it checks everywhere: no panic, no hang past the
//! timeout, a clear error for every refusal, the journal valid.
//!
//! About a minute in all by default. `VMISCOPE_FUZZ_SEED` picks the seed (printed
//! on failure) and `VMISCOPE_FUZZ_SCALE` multiplies every count, to run longer
//! locally: `VMISCOPE_FUZZ_SCALE=20 cargo test --release --test fuzz`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::kvm_available;

/// splitmix64: small, seedable, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn new(salt: u64) -> Rng {
        let seed = std::env::var("VMISCOPE_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed_2026_1202);
        Rng(seed ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
}

fn seed_note() -> String {
    format!(
        "(seed {}; rerun with VMISCOPE_FUZZ_SEED)",
        std::env::var("VMISCOPE_FUZZ_SEED").unwrap_or_else(|_| "default".into())
    )
}

fn scaled(n: usize) -> usize {
    let k: usize = std::env::var("VMISCOPE_FUZZ_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    n * k.max(1)
}

fn vmiscope() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmiscope"));
    c.env("XDG_STATE_HOME", std::env::temp_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Waits for `child` at most `limit` (a hang is a failure: it is killed first),
/// reading its output meanwhile (a full pipe would block it).
fn finish(mut child: Child, limit: Duration, what: &str) -> Output {
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut v);
            }
            v
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let t = Instant::now();
    let mut hung = false;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > limit {
            hung = true;
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    };
    if hung {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = stdout.lines().collect();
        panic!(
            "{what}: still running after {limit:?} {}\nstderr: {}\nlast output: {}",
            seed_note(),
            String::from_utf8_lossy(&out.stderr),
            lines[lines.len().saturating_sub(15)..].join("\n")
        );
    }
    out
}

/// The rule: an exit status (not a signal), no panic.
fn check(out: &Output, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code().is_some(),
        "{what}: killed by a signal {} {err}",
        seed_note()
    );
    assert!(
        !err.contains("panicked") && out.status.code() != Some(101),
        "{what}: panic {}\n{err}",
        seed_note()
    );
}

/// `vmiscope ARGS` within `limit`, by the rule (`check`); a refusal (exit 2)
/// must say why.
fn run_or_refuse(args: &[impl AsRef<std::ffi::OsStr>], limit: Duration, what: &str) {
    let out = finish(vmiscope().args(args).spawn().unwrap(), limit, what);
    check(&out, what);
    if out.status.code() == Some(2) {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.lines().any(|l| l.starts_with("vmiscope: error: ")),
            "{what}: a refusal without a message {}\n{err}",
            seed_note()
        );
    }
}

/// One mutation of an ELF image: bit flips in the headers, a truncation, or an
/// edge value in a header or program-header field.
fn mutate(rng: &mut Rng, elf: &[u8]) -> Vec<u8> {
    let mut v = elf.to_vec();
    let edges: [u64; 9] = [
        0,
        1,
        0x500,
        0x1000,
        0x8000,
        0xffff_ffff,
        0x1_0000_0000,
        1 << 63,
        u64::MAX,
    ];
    match rng.below(4) {
        0 => {
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(64 + 56 * 4) as usize;
                v[at] ^= 1 << rng.below(8);
            }
        }
        1 => v.truncate(rng.below(v.len() as u64) as usize),
        2 => {
            // A program-header field (offset, addresses, sizes) of header 0 or 1.
            let ph = 64 + 56 * rng.below(2) as usize;
            let field = ph + 8 * (1 + rng.below(6) as usize);
            v[field..field + 8].copy_from_slice(&rng.pick(&edges).to_le_bytes());
        }
        _ => {
            // e_entry, e_phoff, e_shoff, or the 16-bit counts and sizes.
            match rng.below(3) {
                0 => {
                    let f = [24usize, 32, 40][rng.below(3) as usize];
                    v[f..f + 8].copy_from_slice(&rng.pick(&edges).to_le_bytes());
                }
                _ => {
                    let f = [54usize, 56, 58, 60, 62][rng.below(5) as usize];
                    let x = *rng.pick(&[0u16, 1, 0xffff, 0x38, 0x40, 1000]);
                    v[f..f + 2].copy_from_slice(&x.to_le_bytes());
                }
            }
        }
    }
    v
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn mutated_images_are_run_or_refused_clearly() {
    if !kvm_available() {
        return;
    }
    let mut rng = Rng::new(1);
    let dir = common::temp_dir("fuzz-img");
    for i in 0..scaled(100) {
        let base = *rng.pick(&["hello", "spin", "multiboot", "demo"]);
        let img = mutate(&mut rng, common::image(base));
        let path = dir.join(format!("m{i}.elf"));
        std::fs::write(&path, &img).unwrap();
        let mut args = vec!["run", path.to_str().unwrap(), "--batch", "--timeout", "2"];
        if rng.below(3) == 0 {
            args.extend(["--protect", "all"]);
        }
        let what = format!("image {i} (from {base})");
        run_or_refuse(&args, Duration::from_secs(20), &what);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `elf` with `len` random bytes over the code at `at` (a file offset).
fn scribbled(rng: &mut Rng, elf: &[u8], at: usize, len: usize) -> Vec<u8> {
    let mut v = elf.to_vec();
    for b in &mut v[at..at + len] {
        *b = rng.next() as u8;
    }
    v
}

/// The file offset of `vaddr` in an image whose first PT_LOAD maps it.
fn file_offset(elf: &[u8], vaddr: u64) -> usize {
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
    let (phoff, phnum) = (
        u64_at(0x20) as usize,
        u16::from_le_bytes([elf[0x38], elf[0x39]]) as usize,
    );
    for i in 0..phnum {
        let ph = phoff + 56 * i;
        let (off, va, filesz) = (u64_at(ph + 8), u64_at(ph + 16), u64_at(ph + 32));
        if (va..va + filesz).contains(&vaddr) {
            return (off + vaddr - va) as usize;
        }
    }
    panic!("{vaddr:#x} is in no segment");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn hostile_guest_code_at_cpl0_and_cpl3_ends_cleanly() {
    if !kvm_available() {
        return;
    }
    let mut rng = Rng::new(2);
    let dir = common::temp_dir("fuzz-code");
    let hello = common::image("hello");
    let syms = vmiscope_monitor::Symbols::parse(hello);
    let targets = [
        ("CPL3", syms.get("user_hello").unwrap()),
        ("CPL0", syms.get("main").unwrap() + 0x10),
    ];
    for i in 0..scaled(60) {
        let (cpl, at) = *rng.pick(&targets);
        let img = scribbled(&mut rng, hello, file_offset(hello, at), 256);
        let path = dir.join(format!("c{i}.elf"));
        std::fs::write(&path, &img).unwrap();
        let journal = dir.join(format!("c{i}.jsonl"));
        let mut args = vec![
            "run".to_string(),
            path.display().to_string(),
            "--batch".into(),
            "--timeout".into(),
            "2".into(),
            "--journal".into(),
            journal.display().to_string(),
        ];
        if i % 2 == 1 {
            args.extend(["--protect".into(), "all".into()]);
        }
        let what = format!("random code {i} at {cpl}");
        let out = finish(
            vmiscope().args(&args).spawn().unwrap(),
            Duration::from_secs(20),
            &what,
        );
        check(&out, &what);
        let text = std::fs::read_to_string(&journal).unwrap_or_default();
        for l in text.lines() {
            assert!(
                serde_json::from_str::<serde_json::Value>(l).is_ok(),
                "{what}: journal line is not JSON {}: {l}",
                seed_note()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `$body#xx` (or a corrupt checksum).
fn packet(body: &[u8], good: bool) -> Vec<u8> {
    let sum = body.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    let mut p = b"$".to_vec();
    p.extend_from_slice(body);
    p.extend_from_slice(format!("#{:02x}", if good { sum } else { !sum }).as_bytes());
    p
}

fn random_packet(rng: &mut Rng) -> Vec<u8> {
    let hexes = [
        "0",
        "1",
        "2",
        "ffffffff",
        "ffffffffffffffff",
        "100000",
        "7ffe000",
        "10000000000",
    ];
    let h = |rng: &mut Rng| rng.pick(&hexes).to_string();
    let body = match rng.below(12) {
        0 => format!("m{},{}", h(rng), h(rng)),
        1 => format!("M{},{}:00", h(rng), h(rng)),
        2 => format!("Z{},{},{}", rng.below(5), h(rng), h(rng)),
        3 => format!("z{},{},{}", rng.below(5), h(rng), h(rng)),
        4 => format!("Hg{}", h(rng)),
        5 => format!("qThreadExtraInfo,{}", h(rng)),
        6 => format!("p{}", h(rng)),
        7 => format!("P{}=00", h(rng)),
        8 => format!("qXfer:features:read:target.xml:{},{}", h(rng), h(rng)),
        // Resumes name no existing thread (thread 1 would run the guest to its
        // end, and then there is nothing left to attach to).
        9 => format!(
            "vCont;{}:{}",
            rng.pick(&["c", "s", "t", "x"]),
            rng.pick(&["2", "ffffffff", "10000000000"])
        ),
        10 => {
            let cmd = rng.pick(&["hooks", "regs", "expect exit 0 timeout inf", "vcpu 9"]);
            format!(
                "qRcmd,{}",
                cmd.bytes().map(|b| format!("{b:02x}")).collect::<String>()
            )
        }
        // Random printable bytes behind a query letter (a leading c/s/k/D/R
        // would resume, kill or detach).
        _ => std::iter::once('q')
            .chain(
                (0..rng.below(40))
                    .map(|_| (b' ' + rng.below(94) as u8) as char)
                    .filter(|c| !matches!(c, '$' | '#' | '}' | '*')),
            )
            .collect(),
    };
    packet(body.as_bytes(), rng.below(10) != 0)
}

#[test]
#[cfg_attr(any(no_kvm, no_gdb), ignore = "needs /dev/kvm and gdb")]
fn random_and_malformed_gdb_packets_leave_the_stub_serving() {
    if !kvm_available() {
        return;
    }
    let mut rng = Rng::new(3);
    let child = vmiscope()
        .args(["run", "hello", "--batch", "--gdb", "0", "--timeout", "120"])
        .spawn()
        .unwrap();
    let mut child = child;
    let mut err = child.stderr.take().unwrap();
    // The port from the hint line.
    let mut seen = String::new();
    let port: u16 = loop {
        let mut b = [0u8; 256];
        let n = err.read(&mut b).unwrap();
        assert!(n > 0, "the stub never listened: {seen}");
        seen.push_str(&String::from_utf8_lossy(&b[..n]));
        if let Some(p) = seen
            .split("target remote 127.0.0.1:")
            .nth(1)
            .and_then(|r| r.split('\'').next())
            .and_then(|p| p.parse().ok())
        {
            break p;
        }
    };
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    for round in 0..scaled(15) {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        for _ in 0..40 {
            // Resumes would run the guest to its end: keep it stopped here.
            let p = random_packet(&mut rng);
            if c.write_all(&p).is_err() {
                break; // the stub ended this session (a malformed packet): fine
            }
            let mut buf = [0u8; 4096];
            // A reply, a timeout (no reply to a bad packet) or the end.
            if let Ok(0) = c.read(&mut buf) {
                break;
            }
            let _ = c.write_all(b"+");
        }
        drop(c);
        // A real gdb attaches after every round and reads a register.
        let out = Command::new("timeout")
            .args(["60", "gdb", "-batch", "-nx"])
            .args(["-ex", &format!("target remote 127.0.0.1:{port}")])
            .args(["-ex", "info registers rip", "-ex", "disconnect"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("rip"),
            "round {round}: gdb could not attach after random packets {}: {text}{}",
            seed_note(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(child.try_wait().unwrap().is_none(), "vmiscope ended");
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.code().is_none() || out.status.code() != Some(101));
}

fn random_line(rng: &mut Rng) -> String {
    let words: Vec<&str> = vmiscope::commands::HELP
        .iter()
        .filter_map(|e| e.usage.split(['/', ' ']).next())
        .filter(|w| {
            !matches!(
                *w,
                "quit" | "tui" | "continue" | "c" | "step" | "next-event" | "wait"
            )
        })
        .collect();
    let args = [
        "0",
        "-1",
        "0x",
        "18446744073709551616",
        "0xffffffffffffffff",
        "4294967296",
        "1e10",
        "NaN",
        "inf",
        "é",
        "main",
        "main+0xffffffffffffffff",
        "ept",
        "gva",
        "msr",
        "log",
        "deny",
        "rw",
        "force",
        "phys",
        "timeout",
        "\u{0}",
        "'",
        "\"",
    ];
    let mut line = rng.pick(&words).to_string();
    for _ in 0..rng.below(5) {
        line.push(' ');
        let a = *rng.pick(&args);
        line.push_str(a);
    }
    if rng.below(40) == 0 {
        line.push_str(&"x".repeat(100_000));
    }
    if line.starts_with("expect") {
        // An expectation that cannot hold waits its whole timeout (10 s unless
        // told): keep the session short.
        line.push_str(" timeout 0.05");
    }
    line
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn random_console_lines_get_an_answer_or_an_error() {
    if !kvm_available() {
        return;
    }
    let mut rng = Rng::new(4);
    let dir = common::temp_dir("fuzz-console");
    let journal = dir.join("j.jsonl");
    let mut child = vmiscope()
        .args([
            "run",
            "demo",
            "--repl",
            "--protect",
            "all",
            "--timeout",
            "60",
        ])
        .args(["--journal", journal.to_str().unwrap()])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut script = String::new();
    for _ in 0..scaled(1000) {
        script.push_str(&random_line(&mut rng));
        script.push('\n');
    }
    // Kept (with the journal) when the test fails, to replay by hand.
    std::fs::write(dir.join("lines.txt"), &script).unwrap();
    std::thread::spawn(move || {
        let _ = stdin.write_all(script.as_bytes());
    });
    let out = finish(child, Duration::from_secs(90), "console lines");
    check(&out, "console lines");
    assert_eq!(
        out.status.code(),
        Some(0),
        "end of input {}\n{}",
        seed_note(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&journal).unwrap_or_default();
    for l in text.lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(l).is_ok(),
            "journal line is not JSON: {l}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every file option given a FIFO (no writer, no reader), an endless device
/// and a full disk: each is refused at once with the reason, never an `open`
/// that waits for ever (a FIFO as `--journal`, `--exceptions` or `--initrd`
/// blocked there, ignoring every signal and `--timeout`), never read whole
/// (`--exceptions /dev/zero` ran the host out of memory).
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn every_file_option_refuses_fifos_endless_files_and_full_disks_at_once() {
    if !kvm_available() {
        return;
    }
    let dir = common::temp_dir("fuzz-files");
    let fifo = dir.join("fifo");
    let _ = std::fs::remove_file(&fifo);
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let fifo = fifo.to_str().unwrap();
    let script = dir.join("s.vms");
    std::fs::write(&script, "quit\n").unwrap();
    let script = script.to_str().unwrap();
    let mut cases: Vec<(Vec<&str>, &str)> = vec![(vec!["run", fifo, "--batch"], "a FIFO")];
    for opt in [
        "--journal",
        "--exceptions",
        "--initrd",
        "--symbols",
        "--module",
        "--script",
    ] {
        cases.push((vec!["run", "demo", "--batch", opt, fifo], "a FIFO"));
    }
    for opt in [
        "--exceptions",
        "--initrd",
        "--symbols",
        "--module",
        "--script",
    ] {
        cases.push((
            vec!["run", "demo", "--batch", opt, "/dev/zero"],
            "larger than",
        ));
    }
    cases.push((
        vec!["run", "demo", "--batch", "--journal", "/dev/full"],
        "No space left",
    ));
    cases.push((
        vec!["run", "demo", "--script", script, "--journal", "/dev/full"],
        "No space left",
    ));
    for (args, why) in cases {
        let what = args.join(" ");
        let child = vmiscope().args(&args).spawn().unwrap();
        let out = finish(child, Duration::from_secs(20), &what);
        check(&out, &what);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {err}");
        assert!(err.contains(why), "{what}: {err}");
    }
}

/// Debian's cloud kernel, if .ci/run unpacked it (target/linux/boot).
fn debian_kernel() -> Option<Vec<u8>> {
    let boot = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/linux/boot");
    let path = std::fs::read_dir(boot).ok()?.find_map(|e| {
        let p = e.ok()?.path();
        let name = p.file_name()?.to_string_lossy().into_owned();
        name.starts_with("vmlinuz-").then_some(p)
    })?;
    std::fs::read(path).ok()
}

/// One mutation of a bzImage along its boot path: a field of the setup header
/// the loader reads (setup_sects, the `HdrS` magic, the protocol version,
/// loadflags, the alignment, xloadflags, cmdline_size, the payload's offset and
/// length, init_size, pref_address) set to a hostile value, bytes of the
/// compressed payload scribbled, or the file cut short.
fn mutate_bzimage(rng: &mut Rng, k: &[u8]) -> (Vec<u8>, String) {
    let mut m = k.to_vec();
    let fields: [(usize, usize, &str); 12] = [
        (0x1f1, 1, "setup_sects"),
        (0x202, 4, "HdrS"),
        (0x206, 2, "version"),
        (0x211, 1, "loadflags"),
        (0x230, 4, "kernel_alignment"),
        (0x236, 2, "xloadflags"),
        (0x238, 4, "cmdline_size"),
        (0x248, 4, "payload_offset"),
        (0x24c, 4, "payload_length"),
        (0x258, 8, "pref_address"),
        (0x260, 4, "init_size"),
        (0x1f4, 4, "syssize"),
    ];
    match rng.below(4) {
        0 | 1 => {
            let (at, len, name) = *rng.pick(&fields);
            let random = rng.next();
            let v = *rng.pick(&[0, 1, u64::MAX, 0x8000_0000, random, 0x7fff_ffff]);
            m[at..at + len].copy_from_slice(&v.to_le_bytes()[..len]);
            (m, format!("{name} = {v:#x}"))
        }
        2 => {
            // The payload starts after the setup sectors: scribble inside it.
            let setup = (usize::from(m[0x1f1]).max(4) + 1) * 512;
            let at = setup + rng.below((m.len() - setup) as u64) as usize;
            let len = (1 + rng.below(64) as usize).min(m.len() - at);
            for b in &mut m[at..at + len] {
                *b = rng.next() as u8;
            }
            (m, format!("{len} bytes scribbled at {at:#x}"))
        }
        _ => {
            let len = rng.below(m.len() as u64) as usize;
            m.truncate(len);
            (m, format!("cut to {len} bytes"))
        }
    }
}

/// The Linux boot path under mutation: Debian's own kernel with hostile
/// setup-header fields, a scribbled payload or cut short, sometimes with a
/// garbage initrd or command line, is run (for at most 2 s) or refused with a
/// message, never a panic or a hang.
#[test]
#[cfg_attr(
    any(no_kvm, no_linux),
    ignore = "needs /dev/kvm and Debian's kernel (.ci/run)"
)]
fn mutated_linux_kernels_are_run_or_refused_clearly() {
    if !kvm_available() {
        return;
    }
    let Some(kernel) = debian_kernel() else {
        panic!("no vmlinuz in target/linux/boot (.ci/run unpacks it)");
    };
    let mut rng = Rng::new(7);
    let dir = common::temp_dir("fuzz-linux");
    let initrd = dir.join("garbage.cpio");
    let junk: Vec<u8> = (0..4096).map(|_| rng.next() as u8).collect();
    std::fs::write(&initrd, junk).unwrap();
    for i in 0..scaled(8) {
        let (img, how) = mutate_bzimage(&mut rng, &kernel);
        let path = dir.join(format!("k{i}"));
        std::fs::write(&path, &img).unwrap();
        let mut args = vec![
            "run".to_string(),
            path.to_str().unwrap().into(),
            "--batch".into(),
            "--timeout".into(),
            "2".into(),
            "--mem".into(),
            "256".into(),
        ];
        if rng.below(3) == 0 {
            args.extend(["--initrd".into(), initrd.to_str().unwrap().into()]);
        }
        if rng.below(3) == 0 {
            let n = rng.below(3000) as usize;
            args.extend(["--cmdline".into(), "x".repeat(n)]);
        }
        let what = format!("kernel {i} ({how})");
        run_or_refuse(&args, Duration::from_secs(60), &what);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The last record of a journal, parsed.
fn last_record(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    serde_json::from_str(text.lines().last().unwrap_or("null")).unwrap_or_default()
}

/// Signals at random moments of REPL and TUI sessions (at the entry, while the
/// guest runs, stopped at an event, during `journal save`): each ends vmiscope
/// with 128 + the signal and a journal whose last record is `end` with that
/// status. SIGINT at the REPL only pauses the guest (as Ctrl-C there), so it
/// is followed by a SIGTERM.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn signals_at_random_moments_end_repl_and_tui_sessions_with_their_journal() {
    if !kvm_available() {
        return;
    }
    let mut rng = Rng::new(8);
    let dir = common::temp_dir("fuzz-signals");
    let phases: [&[u8]; 4] = [
        b"",
        b"continue\n",
        b"hook msr 0x176 w\nbreak event msr\ncontinue --wait\n",
        b"continue\njournal save /dev/null\njournal save /dev/null\n",
    ];
    for i in 0..scaled(6) {
        let journal = dir.join(format!("r{i}.jsonl"));
        let phase = *rng.pick(&phases);
        // `hang` never ends on its own; `msr` stops at its SYSENTER write.
        let image = if phase.starts_with(b"hook") {
            "msr"
        } else {
            "hang"
        };
        let mut child = vmiscope()
            .args([
                "run",
                image,
                "--repl",
                "--journal",
                journal.to_str().unwrap(),
            ])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(phase);
        // The header is written before the console starts: wait for it, then
        // a random moment more (up to 0.5 s).
        let t = Instant::now();
        while std::fs::metadata(&journal).map_or(true, |m| m.len() == 0) {
            assert!(t.elapsed() < Duration::from_secs(20), "no journal header");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(rng.below(500)));
        let sig = *rng.pick(&[libc::SIGTERM, libc::SIGHUP, libc::SIGINT]);
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let expect = if sig == libc::SIGINT {
            // SAFETY: as above.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            128 + libc::SIGTERM
        } else {
            128 + sig
        };
        let what = format!(
            "REPL {i} on {image}, phase {:?}, signal {sig}",
            String::from_utf8_lossy(phase)
        );
        let out = finish(child, Duration::from_secs(30), &what);
        drop(stdin);
        check(&out, &what);
        // SIGINT ends a command that is running (130); at the prompt it only
        // pauses the guest, and the SIGTERM after it ends the session (143).
        let code = out.status.code().unwrap_or_default();
        assert!(
            code == expect || (sig == libc::SIGINT && code == 128 + libc::SIGINT),
            "{what}: exit status {code} {}",
            seed_note()
        );
        let end = last_record(&journal);
        assert_eq!(end["type"], "end", "{what}: last record {end}");
        assert_eq!(end["status"], code, "{what}: {end}");
    }
    if common::tool_available("tmux", "-V") {
        for i in 0..scaled(2) {
            tui_signalled(&mut rng, &dir.join(format!("t{i}.jsonl")));
        }
    } else if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but tmux is missing");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A TUI in a tmux terminal, signalled at a random moment: its journal ends
/// with the signal's status (the terminal keeps the process's status away, the
/// journal records it).
fn tui_signalled(rng: &mut Rng, journal: &std::path::Path) {
    let name = format!(
        "vmiscope-fuzz-{}-{}",
        std::process::id(),
        rng.below(1 << 30)
    );
    let exe = env!("CARGO_BIN_EXE_vmiscope");
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .args(["-L", &name])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
    };
    let cmd = format!("{exe} run hang --tui --journal {}", journal.display());
    assert!(
        tmux(&[
            "new-session",
            "-d",
            "-s",
            &name,
            "-x",
            "120",
            "-y",
            "40",
            &cmd
        ])
        .success()
    );
    let t = Instant::now();
    let pid = loop {
        let found = std::fs::read_dir("/proc").unwrap().find_map(|e| {
            let e = e.ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (text.starts_with(exe) && text.contains(&*journal.to_string_lossy()))
                .then(|| e.file_name().to_string_lossy().parse::<i32>().ok())
                .flatten()
        });
        let header = std::fs::metadata(journal).is_ok_and(|m| m.len() > 0);
        match found {
            Some(p) if header => break p,
            _ => {}
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the TUI did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    if rng.below(2) == 0 {
        // While the guest runs.
        tmux(&["send-keys", "-t", &name, "F5"]);
    }
    std::thread::sleep(Duration::from_millis(rng.below(500)));
    let sig = *rng.pick(&[libc::SIGTERM, libc::SIGHUP]);
    // SAFETY: signalling the vmiscope this test started.
    unsafe { libc::kill(pid, sig) };
    let t = Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists()
        && std::fs::read(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| !String::from_utf8_lossy(&s).contains(") Z"))
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the TUI outlived signal {sig}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    tmux(&["kill-server"]);
    let end = last_record(journal);
    assert_eq!(end["type"], "end", "TUI, signal {sig}: last record {end}");
    assert_eq!(end["status"], 128 + sig, "TUI, signal {sig}: {end}");
}
