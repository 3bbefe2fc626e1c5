//! The engine's one entry point: an event in, the response and the record of that
//! event out. The eight `handle_*` functions (HVMI's names, kept greppable) are
//! its implementation; a hypervisor adapter needs only this.

use std::sync::Arc;

use crate::engine::{Engine, EventRecord};
use crate::glue::Guest;
use crate::handlers::{self, BreakpointAction, MemAction, MemExit};
use crate::verdict::Verdict;

/// An event the hypervisor traps, as the engine takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineEvent {
    /// An access to a hooked page (EPT read, write or execute).
    Mem(MemExit),
    /// RDMSR (`write: None`) or WRMSR of an intercepted MSR.
    Msr { index: u32, write: Option<u64> },
    /// One of our breakpoints (or an INT3 at a guest-physical address we know).
    Breakpoint { gva: u64, gpa: u64 },
    /// The introcall doorbell.
    Introcall { op: u64, args: [u64; 3] },
}

/// What the hypervisor does with the trapped operation. The resume semantics:
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Let it happen as it would without the trap: apply the write, serve the read
    /// from memory, run the fetched instruction, apply the MSR write, step over
    /// our breakpoint (its original byte), or give the guest its own #BP.
    Allow,
    /// The write (memory or MSR) has no effect; the instruction completes.
    Drop,
    /// The read returns this value.
    Data(u64),
    /// Re-enter without doing anything: the engine already moved RIP past a
    /// denied fetched instruction.
    Retry,
    /// Do not run the instruction under our breakpoint; RIP moves past its bytes.
    Skip(u8),
    /// The introcall's answer (RBX), or None: nobody claimed it.
    Introcall(Option<u64>),
    /// The engine cannot keep its hooks' controls in place: end the run.
    Fatal(String),
}

/// The response to one event, and the record of that event (None when no hook
/// fired). Both come from the same call, so a caller never has to look for "its"
/// record among other vCPUs' ones.
#[derive(Debug, Clone)]
pub struct Handled {
    pub response: Response,
    pub record: Option<Arc<EventRecord>>,
}

impl Engine {
    /// Handles one trapped event of the vCPU `guest` is.
    pub fn handle_event(&mut self, guest: &mut dyn Guest, event: EngineEvent) -> Handled {
        self.take_handled();
        let response = match event {
            EngineEvent::Mem(x) => match handlers::handle_ept_violation(self, guest, &x).1 {
                MemAction::Apply => Response::Allow,
                MemAction::Drop => Response::Drop,
                MemAction::Data(v) => Response::Data(v),
                MemAction::Skip => Response::Retry,
            },
            EngineEvent::Msr { index, write } => {
                match handlers::handle_msr_violation(self, guest, index, write) {
                    Verdict::NotAllowed => Response::Drop,
                    _ => Response::Allow,
                }
            }
            EngineEvent::Breakpoint { gva, gpa } => {
                match handlers::handle_breakpoint(self, guest, gva, gpa) {
                    BreakpointAction::StepOver | BreakpointAction::Reinject => Response::Allow,
                    BreakpointAction::Skip(len) => Response::Skip(len),
                }
            }
            EngineEvent::Introcall { op, args } => {
                Response::Introcall(handlers::handle_introcall(self, guest, op, args))
            }
        };
        let record = self.take_handled();
        let response = match self.take_fatal() {
            Some(why) => Response::Fatal(why),
            None => response,
        };
        Handled { response, record }
    }

    /// The work of every exit of the vCPU `guest` is: register polls (CR, DTR;
    /// no host exits for them), or with `timer` HVMI's timer handler (also XCR0,
    /// integrity regions, hooks following remapped pages). Returns the record of
    /// the newest change it concluded, if any.
    pub fn handle_exit(&mut self, guest: &mut dyn Guest, timer: bool) -> Option<Arc<EventRecord>> {
        self.take_handled();
        self.note_exit(guest.vcpu());
        if timer {
            handlers::handle_timer(self, guest);
        } else {
            handlers::poll_registers(self, guest);
        }
        self.take_handled()
    }
}
