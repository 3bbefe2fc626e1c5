//! The `Reply` contract of `event.rs`, row by row, over a fake backend: what each
//! reply does to each exit kind, without a guest.

use std::collections::{HashMap, VecDeque};

use super::*;
use crate::error::VmError;
use crate::event::HandlerStop;
use crate::vcpu::state::Catch;

/// What the fake saw the exit handling do.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Did {
    Asked(Event),
    IoIn(u32),
    MmioRead(u64),
    Msr { error: bool, data: Option<u64> },
    SetMsr(u32, u64),
    RamWrite(u64, Vec<u8>),
    Stopped(StopReason),
    Skipped(u8),
    SteppedOver(u64),
    Reinjected(u64),
    Halted,
    StepEnded(u64),
    Caught(Catch),
    PastHwBreakpoint,
    ExecFault(u64, u64),
    FixedUp,
}

#[derive(Default)]
struct Fake {
    regs: kvm_regs,
    replies: VecDeque<Reply>,
    did: Vec<Did>,
    ram: HashMap<u64, u8>,
    access: HashMap<u64, Access>,
    msrs: HashMap<u32, u64>,
    ports: HashMap<u16, u32>,
    /// What the devices make of a port write.
    effect: Option<PortEffect>,
    /// KVM's single-step is armed.
    stepping: bool,
    /// A shutdown comes back in the INIT state (SVM), the exit before at this RIP.
    reset_at: Option<u64>,
    /// What each debug-register slot holds (an analyst's when not here).
    slots: HashMap<usize, SlotUse>,
    /// Our INT3s: RIP → guest-physical address (other RIPs map to themselves).
    sw_bps: HashMap<u64, u64>,
    /// What the next internal error says.
    site: Option<Site>,
    /// How often the failed instruction was read.
    insn_reads: std::cell::Cell<u32>,
    /// The VMM can complete the failed instruction.
    fixable: bool,
    /// A kick finds the vCPU on the same CPL0 hypercall as the last one.
    livelocked: bool,
}

const RAM: u64 = 0x10_0000;

impl Fake {
    fn answering(reply: Reply) -> Fake {
        let mut f = Fake::default();
        f.replies.push_back(reply);
        f.regs.rip = 0x1000;
        f
    }

    fn did(&self) -> Vec<Did> {
        self.did.clone()
    }

    /// What the exit did besides asking the handler.
    fn effects(&self) -> Vec<Did> {
        self.did
            .iter()
            .filter(|d| !matches!(d, Did::Asked(_)))
            .cloned()
            .collect()
    }
}

impl ExitBackend for Fake {
    fn id(&self) -> u32 {
        0
    }
    fn regs(&self) -> kvm_regs {
        self.regs
    }
    fn set_regs(&mut self, regs: &kvm_regs) {
        self.regs = *regs;
    }
    fn cpl(&self) -> u8 {
        3
    }
    fn la57(&self) -> bool {
        false
    }
    fn reset_at_shutdown(&self) -> Option<u64> {
        self.reset_at
    }
    fn count(&self, _: ExitClass) {}
    fn ask(&mut self, event: &Event) -> Reply {
        self.did.push(Did::Asked(event.clone()));
        self.replies.pop_front().unwrap_or(Reply::Continue)
    }
    fn stop(&mut self, reason: StopReason) {
        self.did.push(Did::Stopped(reason));
    }
    fn halt(&mut self) -> bool {
        self.did.push(Did::Halted);
        true
    }
    fn port_write(&mut self, _: u16, _: u8, _: u32) -> PortEffect {
        self.effect.take().unwrap_or(PortEffect::Unclaimed)
    }
    fn port_read(&mut self, port: u16, _: u8) -> Option<u32> {
        self.ports.get(&port).copied()
    }
    fn complete_io_in(&mut self, value: u32) {
        self.did.push(Did::IoIn(value));
    }
    fn complete_mmio_read(&mut self, value: u64) {
        self.did.push(Did::MmioRead(value));
    }
    fn complete_msr(&mut self, error: bool, data: Option<u64>) {
        self.did.push(Did::Msr { error, data });
    }
    fn get_msr(&mut self, index: u32) -> Option<u64> {
        self.msrs.get(&index).copied()
    }
    fn set_msr(&mut self, index: u32, value: u64) -> bool {
        self.did.push(Did::SetMsr(index, value));
        self.msrs.contains_key(&index)
    }
    fn ram_contains(&self, gpa: u64, len: u64) -> bool {
        gpa + len <= RAM
    }
    fn page_access(&self, gpa: u64) -> Access {
        self.access
            .get(&(gpa & !0xfff))
            .copied()
            .unwrap_or(Access::Full)
    }
    fn ram_read(&self, gpa: u64, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = self.ram.get(&(gpa + i as u64)).copied().unwrap_or(0);
        }
    }
    fn ram_write(&mut self, gpa: u64, data: &[u8]) {
        self.did.push(Did::RamWrite(gpa, data.to_vec()));
    }
    fn slot_use(&self, slot: usize) -> SlotUse {
        self.slots.get(&slot).copied().unwrap_or(SlotUse::Analyst)
    }
    fn stepped(&mut self, pc: u64) -> Flow {
        self.did.push(Did::StepEnded(pc));
        Flow::Stop
    }
    fn caught(&mut self, catch: Catch) -> Flow {
        self.did.push(Did::Caught(catch));
        Flow::Continue
    }
    fn step_past_hw_breakpoint(&mut self) {
        self.did.push(Did::PastHwBreakpoint);
    }
    fn sw_breakpoint_at(&self, rip: u64) -> (Option<u64>, bool) {
        match self.sw_bps.get(&rip) {
            Some(gpa) => (Some(*gpa), true),
            None => (Some(rip), false),
        }
    }
    fn failure_site(&mut self) -> FailureSite {
        let s = self.site.expect("an internal error the test set up");
        FailureSite {
            emulation: s.emulation,
            rip: s.rip,
            cpl: s.cpl,
            page: s.page,
            slots_changed: s.slots_changed,
        }
    }
    fn failed_instruction(&mut self) -> FailedInsn {
        let s = self.site.expect("an internal error the test set up");
        self.insn_reads.set(self.insn_reads.get() + 1);
        let mut bytes = s.bytes;
        if s.int3 {
            bytes[0] = 0xcc;
        }
        FailedInsn { bytes, len: s.len }
    }
    fn exec_fault(&mut self, gva: u64, gpa: u64, _: u8) -> Flow {
        self.did.push(Did::ExecFault(gva, gpa));
        Flow::Continue
    }
    fn fixup(&mut self, _: &[u8]) -> bool {
        if self.fixable {
            self.did.push(Did::FixedUp);
        }
        self.fixable
    }
    fn kicked_on_hypercall(&mut self) -> Option<u64> {
        self.livelocked.then_some(self.regs.rip)
    }
    fn kvm_stepping(&self) -> bool {
        self.stepping
    }
    fn finish_deferred(&mut self) {}
    fn skip(&mut self, len: u8) {
        self.did.push(Did::Skipped(len));
    }
    fn step_over_at(&mut self, gpa: u64) -> Result<(), VmError> {
        self.did.push(Did::SteppedOver(gpa));
        Ok(())
    }
    fn reinject_breakpoint(&mut self, rip: u64) -> Result<(), VmError> {
        self.did.push(Did::Reinjected(rip));
        Ok(())
    }
}

const TRAPPED: u64 = 0x5000;

fn write_trapped(reply: Reply) -> Fake {
    let mut f = Fake::answering(reply);
    f.access.insert(TRAPPED, Access::WriteTrap);
    f
}

fn all_trapped(reply: Reply) -> Fake {
    let mut f = Fake::answering(reply);
    f.access.insert(TRAPPED, Access::AllTrap);
    f.ram.insert(TRAPPED + 8, 0x77);
    f
}

fn crashed() -> Reply {
    Reply::Stop(HandlerStop::EngineCrashed("test".into()))
}

fn handler_stop() -> Did {
    Did::Stopped(StopReason::Handler(HandlerStop::EngineCrashed(
        "test".into(),
    )))
}

const WRITE: RawExit = RawExit::MmioWrite {
    gpa: TRAPPED + 8,
    len: 2,
    data: 0xbeef,
};

#[test]
fn a_step_over_a_trapped_write_ends_at_its_exit() {
    // KVM drops the trap of a step over an emulated MMIO write (handle_exit).
    let landed = Did::RamWrite(TRAPPED + 8, vec![0xef, 0xbe]);
    let mut f = write_trapped(Reply::Continue);
    f.stepping = true;
    assert_eq!(handle_exit(&mut f, WRITE), Flow::Stop);
    assert_eq!(f.effects(), [landed, Did::StepEnded(0x1000)]);
    // Not stepping: the write lands and the guest goes on.
    let mut f = write_trapped(Reply::Continue);
    assert_eq!(handle_exit(&mut f, WRITE), Flow::Continue);
    assert!(!f.effects().contains(&Did::StepEnded(0x1000)));
    // A handler's stop wins over the step's end.
    let mut f = write_trapped(crashed());
    f.stepping = true;
    assert_eq!(handle_exit(&mut f, WRITE), Flow::Stop);
    assert_eq!(f.effects(), [handler_stop()]);
}

#[test]
fn a_trapped_write_lands_on_continue_only() {
    let landed = Did::RamWrite(TRAPPED + 8, vec![0xef, 0xbe]);
    let mut f = write_trapped(Reply::Continue);
    assert_eq!(handle_exit(&mut f, WRITE), Flow::Continue);
    assert!(matches!(f.did()[0], Did::Asked(Event::Mem(m)) if m.write && m.data == 0xbeef));
    assert_eq!(f.effects(), std::slice::from_ref(&landed));
    for reply in [Reply::Drop, Reply::Deny, Reply::Retry, Reply::Data(1)] {
        let mut f = write_trapped(reply.clone());
        assert_eq!(handle_exit(&mut f, WRITE), Flow::Continue);
        assert_eq!(f.effects(), [], "{reply:?} drops the write");
    }
    let mut f = write_trapped(crashed());
    assert_eq!(handle_exit(&mut f, WRITE), Flow::Stop);
    assert_eq!(f.effects(), [handler_stop()]);
}

#[test]
fn a_write_to_a_page_no_longer_trapped_lands_without_asking() {
    let mut f = Fake::answering(Reply::Drop);
    assert_eq!(handle_exit(&mut f, WRITE), Flow::Continue);
    assert_eq!(f.did(), [Did::RamWrite(TRAPPED + 8, vec![0xef, 0xbe])]);
}

#[test]
fn a_trapped_read_returns_data_or_memory() {
    let read = RawExit::MmioRead {
        gpa: TRAPPED + 8,
        len: 1,
    };
    let mut f = all_trapped(Reply::Data(0x42));
    handle_exit(&mut f, read);
    assert!(matches!(f.did()[0], Did::Asked(Event::Mem(m)) if !m.write));
    assert_eq!(f.effects(), [Did::MmioRead(0x42)]);
    for reply in [Reply::Continue, Reply::Drop, Reply::Deny, Reply::Retry] {
        let mut f = all_trapped(reply.clone());
        handle_exit(&mut f, read);
        assert_eq!(f.effects(), [Did::MmioRead(0x77)], "{reply:?} reads RAM");
    }
    let mut f = all_trapped(crashed());
    assert_eq!(handle_exit(&mut f, read), Flow::Stop);
    assert_eq!(f.effects(), [handler_stop()]);
}

#[test]
fn mmio_outside_ram_reads_all_ones_and_drops_writes() {
    let (gpa, len) = (RAM + 0x1000, 4);
    let mut f = Fake::answering(Reply::Continue);
    handle_exit(&mut f, RawExit::MmioRead { gpa, len });
    assert!(matches!(f.did()[0], Did::Asked(Event::Mmio(_))));
    assert_eq!(f.effects(), [Did::MmioRead(u64::MAX)]);
    let mut f = Fake::answering(Reply::Continue);
    handle_exit(&mut f, RawExit::MmioWrite { gpa, len, data: 1 });
    assert_eq!(f.effects(), [], "no RAM to write");
}

#[test]
fn msr_reads_and_writes_per_reply() {
    const LSTAR: u32 = 0xc000_0082;
    let rd = RawExit::RdMsr { index: LSTAR };
    let wr = RawExit::WrMsr {
        index: LSTAR,
        value: 5,
    };
    let run = |reply: Reply, exit: RawExit| {
        let mut f = Fake::answering(reply);
        f.msrs.insert(LSTAR, 9);
        handle_exit(&mut f, exit);
        f.effects()
    };
    let ok = |data| Did::Msr { error: false, data };
    let gp = |data| Did::Msr { error: true, data };
    // RDMSR: Data is returned, Deny is #GP, anything else reads the real MSR.
    assert_eq!(run(Reply::Data(7), rd), [ok(Some(7))]);
    assert_eq!(run(Reply::Deny, rd), [gp(Some(0))]);
    assert_eq!(run(Reply::Continue, rd), [ok(Some(9))]);
    assert_eq!(run(Reply::Drop, rd), [ok(Some(9))]);
    // WRMSR: Continue applies it (KVM does not), Drop completes without it, Deny is #GP.
    assert_eq!(run(Reply::Continue, wr), [Did::SetMsr(LSTAR, 5), ok(None)]);
    assert_eq!(run(Reply::Drop, wr), [ok(None)]);
    assert_eq!(run(Reply::Deny, wr), [gp(None)]);
    assert_eq!(run(crashed(), wr), [handler_stop()]);
    // A value the CPU rejects (non-canonical LSTAR) is #GP whatever the handler
    // would say: it is not even asked.
    let bad = RawExit::WrMsr {
        index: LSTAR,
        value: 0x8000_0000_0000,
    };
    assert_eq!(run(Reply::Drop, bad), [gp(None)]);
    assert_eq!(run(Reply::Continue, bad), [gp(None)]);
    // An MSR KVM does not know: the read is #GP, like on hardware.
    let mut f = Fake::answering(Reply::Continue);
    handle_exit(&mut f, RawExit::RdMsr { index: 0x1234 });
    assert_eq!(f.effects(), [gp(Some(0))]);
}

#[test]
fn unclaimed_ports_read_all_ones_unless_the_handler_answers() {
    let inp = RawExit::IoIn {
        port: 0x80,
        size: 1,
    };
    let mut f = Fake::answering(Reply::Continue);
    handle_exit(&mut f, inp);
    assert_eq!(f.effects(), [Did::IoIn(u32::MAX)]);
    let mut f = Fake::answering(Reply::Data(3));
    handle_exit(&mut f, inp);
    assert_eq!(f.effects(), [Did::IoIn(3)]);
    // A device's port is not an event.
    let mut f = Fake::answering(Reply::Data(3));
    f.ports.insert(0x80, 0x11);
    handle_exit(&mut f, inp);
    assert_eq!(f.did(), [Did::IoIn(0x11)]);
}

#[test]
fn the_introcall_doorbell_sets_rax_and_rbx() {
    let ring = RawExit::IoOut {
        port: crate::devices::INTROCALL_PORT,
        size: 1,
        value: 0,
    };
    let mut f = Fake::answering(Reply::Data(0x99));
    f.regs.rax = INTROCALL_MAGIC;
    f.regs.rdi = 7;
    f.effect = Some(PortEffect::Doorbell);
    handle_exit(&mut f, ring);
    assert!(matches!(f.did()[0], Did::Asked(Event::Introcall(c)) if c.op == 7));
    assert_eq!((f.regs.rax, f.regs.rbx), (0, 0x99));
    // Nobody took it: RAX = -1.
    let mut f = Fake::answering(Reply::Continue);
    f.regs.rax = INTROCALL_MAGIC;
    f.effect = Some(PortEffect::Doorbell);
    handle_exit(&mut f, ring);
    assert_eq!(f.regs.rax, u64::MAX);
}

#[test]
fn breakpoints_step_over_skip_or_reinject() {
    let ours = |reply| {
        let mut f = Fake::answering(reply);
        let flow = breakpoint(&mut f, 0x1000, Some(0x2000), true, 0);
        (flow, f.effects())
    };
    assert_eq!(ours(Reply::Continue).1, [Did::SteppedOver(0x2000)]);
    assert_eq!(ours(Reply::Skip(3)).1, [Did::Skipped(3)]);
    assert_eq!(ours(Reply::Retry).1, []);
    assert_eq!(ours(crashed()), (Flow::Stop, vec![handler_stop()]));
    // The guest's own INT3 goes back to the guest, whatever the handler said.
    let mut f = Fake::answering(Reply::Skip(3));
    breakpoint(&mut f, 0x1000, Some(0x2000), false, 3);
    assert_eq!(f.effects(), [Did::Reinjected(0x1000)]);
}

#[test]
fn halt_shutdown_and_guest_exits_end_the_run() {
    let mut f = Fake::answering(Reply::Continue);
    assert_eq!(handle_exit(&mut f, RawExit::Hlt), Flow::Stop);
    assert_eq!(
        f.effects(),
        [Did::Halted, Did::Stopped(StopReason::AllHalted)]
    );
    // Continue cannot save a triple fault.
    let mut f = Fake::answering(Reply::Continue);
    assert_eq!(handle_exit(&mut f, RawExit::Shutdown), Flow::Stop);
    assert_eq!(
        f.effects(),
        [Did::Stopped(StopReason::TripleFault {
            cpu: 0,
            rip: 0x1000,
            reset: false,
        })]
    );
    // On SVM the vCPU comes back from a shutdown in the INIT state: the
    // reason names where its previous exit was instead.
    let mut f = Fake::answering(Reply::Continue);
    f.reset_at = Some(0xffff_ffff_8100_0000);
    handle_exit(&mut f, RawExit::Shutdown);
    assert_eq!(
        f.effects(),
        [Did::Stopped(StopReason::TripleFault {
            cpu: 0,
            rip: 0xffff_ffff_8100_0000,
            reset: true,
        })]
    );
    let mut f = Fake::answering(Reply::Continue);
    f.effect = Some(PortEffect::Exit(3));
    let exit = RawExit::IoOut {
        port: 0xf4,
        size: 1,
        value: 1,
    };
    assert_eq!(handle_exit(&mut f, exit), Flow::Stop);
    assert_eq!(f.did(), [Did::Stopped(StopReason::GuestExit(3))]);
}

// Debug exits, emulation failures and kicks (`faults`).

const PC: u64 = 0xffff_ffff_8100_1000;

fn debug_exit(f: &mut Fake, exception: u32, dr6: u64) -> Flow {
    handle_exit(
        f,
        RawExit::Debug {
            exception,
            pc: PC,
            dr6,
        },
    )
}

#[test]
fn a_debug_exit_goes_to_the_step_the_catch_or_the_breakpoint_it_is() {
    // A step's end (DR6.BS), or a #DB with no slot bit (KVM's step on some hosts).
    for dr6 in [1 << 14, 0] {
        let mut f = Fake::answering(Reply::Continue);
        debug_exit(&mut f, 1, dr6);
        assert_eq!(f.effects(), [Did::StepEnded(PC)]);
    }
    // A slot that watches a guest exception entry is a catch, not an event.
    let mut f = Fake::answering(Reply::Continue);
    f.slots.insert(2, SlotUse::Catch(Catch::Db));
    assert_eq!(debug_exit(&mut f, 1, 1 << 2), Flow::Continue);
    assert_eq!(f.did, [Did::Caught(Catch::Db)]);
    // One of our hidden breakpoints: its event, then a step past it; a skip
    // moves RIP instead.
    let mut f = Fake::answering(Reply::Continue);
    f.slots.insert(1, SlotUse::HiddenBreakpoint { gpa: 0x1000 });
    debug_exit(&mut f, 1, 1 << 1);
    let ev = Event::Breakpoint {
        rip: PC,
        gpa: Some(0x1000),
        ours: true,
        cpl: 3,
    };
    assert_eq!(f.did, [Did::Asked(ev), Did::PastHwBreakpoint]);
    let mut f = Fake::answering(Reply::Skip(3));
    f.slots.insert(1, SlotUse::HiddenBreakpoint { gpa: 0x1000 });
    debug_exit(&mut f, 1, 1 << 1);
    assert_eq!(f.effects(), [Did::Skipped(3)]);
    // An analyst's: HwBreakpoint with its slot; Retry runs it again as is.
    let mut f = Fake::answering(Reply::Continue);
    debug_exit(&mut f, 1, 1);
    let ev = Event::HwBreakpoint { rip: PC, slot: 0 };
    assert_eq!(f.did, [Did::Asked(ev), Did::PastHwBreakpoint]);
    let mut f = Fake::answering(Reply::Retry);
    debug_exit(&mut f, 1, 1 << 3);
    assert_eq!(f.effects(), []);
    let mut f = Fake::answering(crashed());
    assert_eq!(debug_exit(&mut f, 1, 1), Flow::Stop);
    // An INT3: ours is stepped over at its page, the guest's goes back to it.
    let mut f = Fake::answering(Reply::Continue);
    f.sw_bps.insert(PC, 0x2000);
    debug_exit(&mut f, 3, 0);
    assert_eq!(f.effects(), [Did::SteppedOver(0x2000)]);
    let mut f = Fake::answering(Reply::Continue);
    debug_exit(&mut f, 3, 0);
    assert_eq!(f.effects(), [Did::Reinjected(PC)]);
    // Any other exception is not ours to have: the run ends with the reason.
    let mut f = Fake::answering(Reply::Continue);
    assert_eq!(debug_exit(&mut f, 6, 0), Flow::Stop);
    assert!(
        matches!(&f.did[..], [Did::Stopped(StopReason::Error(w))] if w.contains("exception 6")),
        "{:?}",
        f.did
    );
}

/// An internal error as the test sets it up: where, and the instruction.
#[derive(Debug, Clone, Copy)]
struct Site {
    emulation: bool,
    rip: u64,
    cpl: u8,
    page: Option<(u64, Access)>,
    slots_changed: bool,
    int3: bool,
    bytes: [u8; 15],
    len: u8,
}

fn site() -> Site {
    Site {
        emulation: true,
        rip: PC,
        cpl: 0,
        page: Some((0x3000, Access::Full)),
        slots_changed: false,
        int3: false,
        bytes: [0x0f, 0x0b, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        len: 15,
    }
}

fn failed(reply: Reply, site: Site) -> (Fake, Flow) {
    let mut f = Fake::answering(reply);
    f.site = Some(site);
    let flow = handle_exit(&mut f, RawExit::InternalError);
    (f, flow)
}

#[test]
fn an_emulation_failure_is_an_exec_trap_an_int3_a_fixup_or_the_end() {
    // A fetch from a page with no memslot is our execute trap.
    let trap = Site {
        page: Some((0x3000, Access::AllTrap)),
        ..site()
    };
    let (f, flow) = failed(Reply::Continue, trap);
    assert_eq!(
        (f.did.as_slice(), flow),
        (&[Did::ExecFault(PC, 0x3000)][..], Flow::Continue)
    );
    // Routed without reading the instruction (a hot loop's page faults on
    // every fetch).
    assert_eq!(f.insn_reads.get(), 0);
    // …unless the memslots changed since the entry: then it runs again.
    let moved = Site {
        slots_changed: true,
        ..trap
    };
    let (f, flow) = failed(Reply::Continue, moved);
    assert_eq!((f.did.as_slice(), flow), (&[][..], Flow::Continue));
    // Not an emulation failure: no execute trap, whatever the page.
    let other = Site {
        emulation: false,
        ..trap
    };
    let (f, flow) = failed(Reply::Continue, other);
    assert_eq!(flow, Flow::Stop);
    assert!(!f.did.contains(&Did::ExecFault(PC, 0x3000)));
    // An INT3 KVM's emulator could not run (PVM, CPL0): the breakpoint route.
    let int3 = Site {
        int3: true,
        ..site()
    };
    let (f, _) = failed(Reply::Continue, int3);
    assert_eq!(f.effects(), [Did::Reinjected(PC)]);
    // An instruction the VMM completes: nothing asked, the guest goes on.
    let mut f = Fake::answering(Reply::Continue);
    (f.site, f.fixable) = (Some(site()), true);
    assert_eq!(handle_exit(&mut f, RawExit::InternalError), Flow::Continue);
    assert_eq!(f.did, [Did::FixedUp]);
    // Else the handler is asked: Retry runs it again, anything else ends the
    // run with the instruction's bytes.
    let (f, flow) = failed(Reply::Retry, site());
    assert_eq!((f.effects().as_slice(), flow), (&[][..], Flow::Continue));
    let (f, flow) = failed(Reply::Continue, Site { len: 2, ..site() });
    assert_eq!(flow, Flow::Stop);
    assert_eq!(
        f.effects(),
        [Did::Stopped(StopReason::EmulationFailure {
            cpu: 0,
            rip: PC,
            cpl: 0,
            bytes: vec![0x0f, 0x0b],
        })]
    );
}

#[test]
fn a_kick_is_an_event_unless_the_vcpu_sits_on_a_hypercall() {
    let mut f = Fake::answering(Reply::Continue);
    assert_eq!(handle_exit(&mut f, RawExit::Intr), Flow::Continue);
    assert_eq!(f.did, [Did::Asked(Event::Kicked)]);
    let mut f = Fake::answering(crashed());
    assert_eq!(handle_exit(&mut f, RawExit::Intr), Flow::Stop);
    let mut f = Fake::answering(Reply::Continue);
    f.livelocked = true;
    assert_eq!(handle_exit(&mut f, RawExit::Intr), Flow::Stop);
    assert_eq!(
        f.did,
        [Did::Stopped(StopReason::Livelock {
            cpu: 0,
            rip: 0x1000
        })]
    );
}
