//! Why a run ended, and the exit status `vmiscope run --batch` maps it to.

use std::fmt;

/// Why an exit handler ends the run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerStop {
    /// The engine can no longer keep its hooks' hypervisor controls in place
    /// (HVMI's "disable on return"): going on would run the guest unprotected.
    #[error("introspection disabled: {0}")]
    EngineFailed(String),
    /// The engine panicked while handling an event.
    #[error("the introspection engine crashed: {0}")]
    EngineCrashed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest wrote to an exit port; the status it asked for.
    GuestExit(i32),
    /// The guest pulsed the i8042 reset line.
    Reset,
    /// A vCPU triple-faulted at `rip`. `reset`: KVM re-initialised the vCPU at
    /// the shutdown (SVM does, `shutdown_interception` in
    /// arch/x86/kvm/svm/svm.c: the VMCB is undefined after a shutdown), so
    /// every register is the INIT state, not the fault's, and `rip` is where
    /// its exit before the shutdown was.
    TripleFault { cpu: u32, rip: u64, reset: bool },
    /// KVM's emulator could not run an instruction and nobody handled it.
    EmulationFailure {
        cpu: u32,
        rip: u64,
        cpl: u8,
        bytes: Vec<u8>,
    },
    /// A vCPU sat on a hypercall that never completes (VMCALL at CPL0 on PVM).
    Livelock { cpu: u32, rip: u64 },
    /// Every vCPU halted with no way to wake up.
    AllHalted,
    /// `--timeout` expired; where each vCPU was.
    Timeout {
        millis: u64,
        where_: Vec<(u32, u64, u8)>,
    },
    /// The user ended the run (`quit`, the end of a console's input, gdb's `kill`).
    User,
    /// A front end ended the run because it was done, and says why (a
    /// script's last line ran while the guest still ran).
    Done(String),
    /// A signal ended the run (SIGINT from Ctrl-C, SIGTERM, SIGHUP).
    Signal(i32),
    /// The exit handler ended the run.
    Handler(HandlerStop),
    /// The VMM itself failed.
    Error(String),
}

impl StopReason {
    /// Guest statuses are the guest's; VMM-side reasons use even numbers, which the
    /// isa-debug-exit convention ((v << 1) | 1) never produces.
    pub fn exit_status(&self) -> i32 {
        match self {
            StopReason::GuestExit(s) => *s,
            StopReason::Reset => 0,
            StopReason::Error(_) | StopReason::Handler(_) => 2,
            StopReason::TripleFault { .. } => 4,
            StopReason::EmulationFailure { .. } => 6,
            StopReason::Livelock { .. } => 8,
            StopReason::AllHalted => 10,
            StopReason::Timeout { .. } => 124,
            // The user chose to end it: not a failure.
            StopReason::User | StopReason::Done(_) => 0,
            // The shell's convention for a process ended by a signal.
            StopReason::Signal(n) => 128 + n,
        }
    }
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::GuestExit(s) => write!(f, "guest exited with status {s}"),
            StopReason::Reset => write!(f, "guest requested a reset"),
            StopReason::TripleFault {
                cpu,
                rip,
                reset: false,
            } => write!(f, "vCPU {cpu} triple-faulted (shutdown) at rip {rip:#x}"),
            StopReason::TripleFault {
                cpu,
                rip,
                reset: true,
            } => write!(
                f,
                "vCPU {cpu} triple-faulted (shutdown); KVM re-initialised it at the shutdown \
                 (as KVM on SVM does), so its registers are the INIT state, not the fault's; \
                 its exit before was at rip {rip:#x}"
            ),
            StopReason::EmulationFailure {
                cpu,
                rip,
                cpl,
                bytes,
            } => {
                write!(
                    f,
                    "vCPU {cpu}: KVM cannot emulate the instruction at rip {rip:#x} (CPL{cpl}), bytes"
                )?;
                for b in bytes {
                    write!(f, " {b:02x}")?;
                }
                Ok(())
            }
            StopReason::Livelock { cpu, rip } => write!(
                f,
                "vCPU {cpu} livelocked on a hypercall (VMCALL/VMMCALL) at rip {rip:#x}: on this PVM host \
                 a CPL0 hypercall never completes"
            ),
            StopReason::AllHalted => write!(f, "every vCPU halted with nothing to wake it"),
            StopReason::Timeout { millis, where_ } => {
                write!(
                    f,
                    "timeout: the guest was still running after {:.1} s",
                    *millis as f64 / 1000.0
                )?;
                for (cpu, rip, cpl) in where_ {
                    write!(f, "; vCPU {cpu} at rip {rip:#x} CPL{cpl}")?;
                }
                Ok(())
            }
            StopReason::User => write!(f, "stopped by the user"),
            StopReason::Done(why) => f.write_str(why),
            StopReason::Signal(n) if *n == libc::SIGINT => {
                write!(f, "stopped by the user (Ctrl-C, SIGINT)")
            }
            StopReason::Signal(n) => write!(f, "stopped by {}", crate::signals::name(*n)),
            StopReason::Handler(cause) => {
                write!(f, "stopped by the introspection handler: {cause}")
            }
            StopReason::Error(m) => write!(f, "VMM error: {m}"),
        }
    }
}
