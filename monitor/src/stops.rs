//! Stopping at events. The session's `ExitHandler` (`SessionHandler`) asks the
//! engine, then, before the VMM applies the decision, checks the event
//! breakpoints (`next-event`, `break event`, `break hook`, `step`); on a match
//! the vCPU thread publishes the stop and waits, running the front ends'
//! requests with its own `VcpuCtl` until it is told to resume, maybe with an
//! overridden verdict.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use kvm_bindings::{kvm_regs, kvm_sregs};
use vmiscope_introspect::{Class, EventRecord, HookId, Verdict};
use vmiscope_vmm::{Event, Reply, VcpuCtl, VmShared};

/// An event breakpoint's number (`break`, `delete`; gdb's breakpoints and
/// watchpoints are event breakpoints too).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BreakId(pub u32);

impl std::fmt::Display for BreakId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// An event breakpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventBreak {
    pub id: BreakId,
    pub class: Option<Class>,
    pub hook: Option<HookId>,
    pub vcpu: Option<u32>,
    /// Stop after an allowed write has landed (gdb's watchpoints, which compare
    /// old and new values), not before the verdict.
    pub after_write: bool,
}

impl EventBreak {
    fn matches(&self, r: &EventRecord) -> bool {
        self.class.is_none_or(|c| c == r.class)
            && self.hook.is_none_or(|h| r.hooks.contains(&h))
            && self.vcpu.is_none_or(|v| v == r.vcpu)
    }
}

/// What the console may do with a stopped event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Override {
    Allow,
    Deny,
}

/// Why a vCPU stopped: what the console, the TUI and gdb match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCause {
    /// `next-event`: the first handled event on any vCPU.
    NextEvent,
    /// An event breakpoint (`break event`, `break hook`, gdb's breakpoints and
    /// watchpoints), by id.
    Break(BreakId),
    /// A requested single-step completed.
    Step,
    /// A hardware execute breakpoint (gdb's `hbreak`).
    HwBreak { slot: u8 },
}

impl std::fmt::Display for StopCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopCause::NextEvent => f.write_str("next-event"),
            StopCause::Break(id) => write!(f, "breakpoint {id}"),
            StopCause::Step => f.write_str("step"),
            StopCause::HwBreak { .. } => f.write_str("hw-breakpoint"),
        }
    }
}

/// A vCPU stopped for the analyst.
#[derive(Debug, Clone)]
pub struct Stop {
    pub vcpu: u32,
    /// Why it stopped.
    pub cause: StopCause,
    /// The handled event, when the stop is at one.
    pub event: Option<Arc<EventRecord>>,
    /// The VMM event the stop is at (None: a polled change, which has none);
    /// the front ends format it.
    pub raw: Option<Event>,
    /// What happens unless the analyst overrides it.
    pub proposed: Proposed,
}

/// What happens to the event a vCPU stopped at unless the analyst overrides
/// it; everything but `Reply` has happened already.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proposed {
    /// Nothing to decide: a step, a hardware breakpoint.
    Nothing,
    /// The engine's reply, applied when the vCPU resumes.
    Reply(Reply),
    /// An allowed write that has landed (a watchpoint-style stop).
    WriteLanded,
    /// A polled register change, already decided and applied (or undone).
    Polled(Verdict),
}

impl Proposed {
    /// Whether the verdict is still to be applied (an override can change it).
    pub fn pending(&self) -> bool {
        matches!(self, Proposed::Reply(_))
    }
}

impl Stop {
    pub(crate) fn new(
        cpu: &VcpuCtl<'_>,
        cause: StopCause,
        raw: Option<Event>,
        proposed: Proposed,
    ) -> Stop {
        Stop {
            vcpu: cpu.id(),
            cause,
            event: None,
            raw,
            proposed,
        }
    }

    pub(crate) fn at(mut self, rec: Arc<EventRecord>) -> Stop {
        self.event = Some(rec);
        self
    }
}

/// The held vCPU's registers, taken when it stopped and again after every request
/// it ran (a request may change them): reads while it is held need no round trip.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pub vcpu: u32,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The vCPU's task count when taken: a task since may have changed them.
    pub tasks: u64,
    /// Whether a single-step from here can work (`VcpuCtl::can_step`).
    pub can_step: bool,
}

impl Snapshot {
    fn take(cpu: &VcpuCtl<'_>) -> Self {
        Snapshot {
            vcpu: cpu.id(),
            regs: cpu.regs(),
            sregs: cpu.sregs(),
            tasks: cpu.tasks_run(),
            can_step: cpu.can_step(),
        }
    }
}

#[derive(Default)]
struct State {
    breaks: Vec<EventBreak>,
    next_id: BreakId,
    /// `next-event`: Some(all) while armed; `all` stops at any handled event,
    /// otherwise only at one a hook or policy asked for.
    next_event: Option<bool>,
    /// vCPU being single-stepped by `step`.
    stepping: Option<u32>,
    stop: Option<Stop>,
    /// The resume order for the held vCPU.
    resume: Option<Option<Override>>,
    /// Bumped at every stop, so waiters can tell a new stop from an old one.
    stops: u64,
    /// The newest stop, kept after the vCPU resumed (for watchers that poll).
    last: Option<Stop>,
    /// The held vCPU's registers (see `Snapshot`).
    snapshot: Option<Snapshot>,
    /// Single-step the held vCPU when it resumes (gdb's `stepi`).
    step_on_resume: bool,
}

/// Shared between the console thread and the vCPU threads.
pub struct Control {
    state: Mutex<State>,
    cv: Condvar,
    /// Written at every stop: a thread that also waits on a socket (gdb's)
    /// polls both instead of waking up every millisecond to look.
    stopped: vmm_sys_util::eventfd::EventFd,
    /// `State::stops`, readable without the lock (a waiter spinning for the
    /// next stop must not contend with the vCPU publishing it).
    published: std::sync::atomic::AtomicU64,
    /// To wake the held vCPU when its resume order is given.
    vm: Arc<VmShared>,
    /// Told of each stop as it happens (the session's notices).
    on_stop: StopSink,
}

/// Receives each stop as it happens, on the vCPU thread that stopped.
pub type StopSink = Box<dyn Fn(&Stop) + Send + Sync>;

impl Control {
    /// `on_stop` is told of each stop as it happens.
    pub fn new(vm: Arc<VmShared>, on_stop: StopSink) -> Self {
        Control {
            on_stop,
            state: Mutex::default(),
            cv: Condvar::new(),
            stopped: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
                .expect("an eventfd (the kernel's limit on open files?)"),
            published: Default::default(),
            vm,
        }
    }

    pub fn add_break(
        &self,
        class: Option<Class>,
        hook: Option<HookId>,
        vcpu: Option<u32>,
    ) -> BreakId {
        self.add_break_ext(class, hook, vcpu, false)
    }

    pub fn add_break_ext(
        &self,
        class: Option<Class>,
        hook: Option<HookId>,
        vcpu: Option<u32>,
        after_write: bool,
    ) -> BreakId {
        let mut s = self.state.lock().unwrap();
        s.next_id.0 += 1;
        let id = s.next_id;
        s.breaks.push(EventBreak {
            id,
            class,
            hook,
            vcpu,
            after_write,
        });
        id
    }

    pub fn breaks(&self) -> Vec<EventBreak> {
        self.state.lock().unwrap().breaks.clone()
    }

    pub fn delete_break(&self, id: BreakId) -> bool {
        let mut s = self.state.lock().unwrap();
        let n = s.breaks.len();
        s.breaks.retain(|b| b.id != id);
        s.breaks.len() != n
    }

    /// Stop at the next handled event on any vCPU (`all`), or at the next one
    /// a hook or policy asked for: not an unhooked access that only shares a
    /// page with a hooked one.
    pub fn arm_next_event(&self, all: bool) {
        self.state.lock().unwrap().next_event = Some(all);
    }

    pub fn arm_step(&self, vcpu: u32) {
        self.state.lock().unwrap().stepping = Some(vcpu);
    }

    pub fn stop(&self) -> Option<Stop> {
        self.state.lock().unwrap().stop.clone()
    }

    /// The registers of `vcpu` if it is the one held at a stop, and no task
    /// has run on it since they were taken (the vCPU retakes them after one).
    pub fn snapshot(&self, vcpu: u32) -> Option<Snapshot> {
        let tasks = self.vm.tasks_started(vcpu);
        self.state
            .lock()
            .unwrap()
            .snapshot
            .filter(|sn| sn.vcpu == vcpu && sn.tasks == tasks)
    }

    /// Single-steps the held vCPU `vcpu` when it next resumes, if it can step
    /// from where it is. Returns None when `vcpu` is not the held one.
    pub fn step_on_resume(&self, vcpu: u32) -> Option<bool> {
        let mut s = self.state.lock().unwrap();
        let sn = s.snapshot.filter(|sn| sn.vcpu == vcpu)?;
        s.step_on_resume = sn.can_step;
        Some(sn.can_step)
    }

    /// The newest stop, even if the vCPU has been resumed since.
    pub fn last_stop(&self) -> Option<Stop> {
        self.state.lock().unwrap().last.clone()
    }

    /// A file descriptor that becomes readable at every stop (see `stopped`).
    pub fn stop_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.stopped.as_raw_fd()
    }

    /// Makes `stop_fd` readable at the guest's end too, so a waiter on it
    /// needs no timeout to notice the end (the front end calls it once the run
    /// has returned).
    pub fn notify_end(&self) {
        let _ = self.stopped.write(1);
    }

    /// Consumes the stop signal of `stop_fd` (the stop count says what came).
    pub fn clear_stop_signal(&self) {
        let _ = self.stopped.read();
    }

    /// Whether a vCPU is held at a stop that has been published (its
    /// registers taken, the stop count moved): `stop()` is set a moment
    /// before, while the vCPU is still on its way.
    pub fn is_held(&self) -> bool {
        let s = self.state.lock().unwrap();
        s.stop.is_some() && s.snapshot.is_some()
    }

    pub fn stop_count(&self) -> u64 {
        self.published.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits for a stop newer than `after`, up to `timeout`.
    pub fn wait_stop(&self, after: u64, timeout: Duration) -> Option<Stop> {
        let s = self.state.lock().unwrap();
        let (s, _) = self
            .cv
            .wait_timeout_while(s, timeout, |s| s.stops <= after)
            .unwrap();
        if s.stops > after {
            s.stop.clone()
        } else {
            None
        }
    }

    /// Lets the stopped vCPU go on, with `over` replacing the verdict.
    pub fn resume(&self, over: Option<Override>) -> bool {
        let mut s = self.state.lock().unwrap();
        let Some(cpu) = s.stop.as_ref().map(|st| st.vcpu) else {
            return false;
        };
        s.resume = Some(over);
        drop(s);
        self.vm.wake_vcpu(cpu);
        true
    }

    /// `resume`, then waits (briefly) until the vCPU has left the stop: the next
    /// command must not see the stop it just ended (`verdict` then `wait` in a
    /// pipe). gdb's resumes do not wait: its stub waits for the next stop anyway.
    pub fn resume_and_wait(&self, over: Option<Override>) -> bool {
        let stops = self.state.lock().unwrap().stops;
        if !self.resume(over) {
            return false;
        }
        let s = self.state.lock().unwrap();
        let _ = self
            .cv
            .wait_timeout_while(s, Duration::from_secs(1), |s| {
                s.stop.is_some() && s.stops == stops
            })
            .unwrap();
        true
    }

    /// Called by a vCPU thread: publish the stop, then hold the vCPU (the VMM's
    /// `VcpuCtl::hold`, which serves `with_vcpu` tasks meanwhile) until resumed.
    pub(crate) fn hold(&self, cpu: &mut VcpuCtl<'_>, stop: Stop) -> Option<Override> {
        {
            let mut s = self.state.lock().unwrap();
            // A step that ends in another stop (its instruction hit a watchpoint,
            // say) is over, as in gdb: it must not fire later, after a `continue`.
            if s.stepping == Some(cpu.id()) {
                s.stepping = None;
                cpu.set_single_step(false);
            }
            s.last = Some(stop.clone());
            (self.on_stop)(&stop);
            s.stop = Some(stop);
            s.step_on_resume = false;
            s.resume = None;
        }
        let mut tasks = None;
        let over = cpu.hold(|cpu| {
            // Called after every message. Only a task can change the registers:
            // they are read again only after one.
            let seen = cpu.tasks_run();
            if tasks != Some(seen) {
                let first = tasks.is_none();
                self.publish(Snapshot::take(cpu), first);
                // No x87/SSE read here: an ioctl (~8 us on PVM) that a debugger
                // rarely wants at a stop (gdb's `g` carries the general
                // registers alone), and the next resume would wait for it.
                // Sleepers are woken after the stop is out: a spinning waiter
                // has seen it already.
                self.cv.notify_all();
                if first {
                    let _ = self.stopped.write(1);
                }
                tasks = Some(seen);
            }
            let mut s = self.state.lock().unwrap();
            let over = s.resume.take()?;
            if std::mem::take(&mut s.step_on_resume) {
                cpu.set_single_step(true);
            }
            Some(over)
        });
        let mut s = self.state.lock().unwrap();
        s.stop = None;
        s.snapshot = None;
        self.cv.notify_all();
        over.flatten()
    }

    /// Stores the held vCPU's registers; with `first`, announces the stop (to
    /// spinning waiters; `hold` wakes sleeping ones): once the vCPU is held (its
    /// state says so) with its registers taken, so a waiter that pauses every
    /// vCPU sends it no kick and reads the registers with no round trip.
    fn publish(&self, sn: Snapshot, first: bool) {
        let mut s = self.state.lock().unwrap();
        s.snapshot = Some(sn);
        if first {
            s.stops += 1;
            self.published
                .store(s.stops, std::sync::atomic::Ordering::Release);
        }
    }

    /// Whether a step requested on `vcpu` was under way; it is over now.
    pub(crate) fn end_step(&self, vcpu: u32) -> bool {
        let mut s = self.state.lock().unwrap();
        let was = s.stepping == Some(vcpu);
        if was {
            s.stepping = None;
        }
        was
    }

    /// Whether this handled event must stop, and why.
    pub(crate) fn should_stop(&self, r: &EventRecord) -> Option<(StopCause, bool)> {
        self.state.lock().unwrap().should_stop(r)
    }
}

impl State {
    /// Whether a handled event stops, and why (with whether the stop waits
    /// for an allowed write to land): an armed `next-event` first, once (any
    /// event with `all`, else one a hook fired on or the engine did not
    /// allow), then the first event breakpoint that matches.
    fn should_stop(&mut self, r: &EventRecord) -> Option<(StopCause, bool)> {
        if let Some(all) = self.next_event
            && (all || !r.hooks.is_empty() || r.verdict != Verdict::Allowed)
        {
            self.next_event = None;
            return Some((StopCause::NextEvent, false));
        }
        self.breaks
            .iter()
            .find(|b| b.matches(r))
            .map(|b| (StopCause::Break(b.id), b.after_write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmiscope_introspect::EventInfo;

    fn msr_write(vcpu: u32, hooks: Vec<HookId>, verdict: Verdict) -> EventRecord {
        EventRecord {
            event_id: 1,
            at_us: 0,
            class: Class::Msr,
            vcpu,
            rip: 0x1000,
            cpl: 0,
            instruction: None,
            task: None,
            event: EventInfo::Msr {
                index: 0x10,
                write: Some(1),
            },
            hooks,
            verdict,
            overridden: None,
        }
    }

    fn brk(id: u32, class: Option<Class>, hook: Option<u64>, vcpu: Option<u32>) -> EventBreak {
        EventBreak {
            id: BreakId(id),
            class,
            hook: hook.map(HookId),
            vcpu,
            after_write: id == 9,
        }
    }

    fn ids(v: &[u64]) -> Vec<HookId> {
        v.iter().copied().map(HookId).collect()
    }

    #[test]
    fn next_event_stops_once_at_what_it_was_armed_for() {
        let mut s = State::default();
        let quiet = msr_write(0, ids(&[]), Verdict::Allowed);
        let hooked = msr_write(0, ids(&[7]), Verdict::Allowed);
        s.next_event = Some(false);
        assert_eq!(s.should_stop(&quiet), None, "no hook fired, allowed");
        assert_eq!(s.should_stop(&hooked), Some((StopCause::NextEvent, false)));
        assert_eq!(s.should_stop(&hooked), None, "disarmed after one stop");
        s.next_event = Some(false);
        let denied = msr_write(0, ids(&[]), Verdict::NotAllowed);
        assert_eq!(s.should_stop(&denied), Some((StopCause::NextEvent, false)));
        s.next_event = Some(true);
        assert_eq!(s.should_stop(&quiet), Some((StopCause::NextEvent, false)));
    }

    #[test]
    fn an_event_breakpoint_matches_on_every_condition_it_names() {
        let mut s = State {
            breaks: vec![
                brk(1, Some(Class::Ept), None, None),
                brk(2, Some(Class::Msr), Some(7), Some(1)),
                brk(9, None, Some(8), None),
            ],
            ..State::default()
        };
        let r = |vcpu, hooks| msr_write(vcpu, hooks, Verdict::Allowed);
        assert_eq!(s.should_stop(&r(1, ids(&[3]))), None, "hook 7 did not fire");
        assert_eq!(s.should_stop(&r(0, ids(&[7]))), None, "another vCPU");
        assert_eq!(
            s.should_stop(&r(1, ids(&[3, 7]))),
            Some((StopCause::Break(BreakId(2)), false))
        );
        // A watchpoint-style break stops after the write lands.
        assert_eq!(
            s.should_stop(&r(0, ids(&[8]))),
            Some((StopCause::Break(BreakId(9)), true))
        );
        // Breakpoints stay armed.
        assert_eq!(
            s.should_stop(&r(0, ids(&[8]))),
            Some((StopCause::Break(BreakId(9)), true))
        );
    }
}
