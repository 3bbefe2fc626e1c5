//! The engine's state and the machinery every handler shares: adding and removing
//! hooks (with their hypervisor controls), dispatching an event to the hooks that
//! match, combining verdicts, alerts, exceptions, the journal, and the common
//! prologue/epilogue of a handler (written once, unlike HVMI's ten copies).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use crate::alert::{Alert, Journal};
use crate::arch::SRegs;
use crate::ctx::{Callback, Requests};
use crate::exceptions::Exceptions;
use crate::glue::{BreakpointKind, GlueError, Guest, PageRights, VmControl};
use crate::hooks::Hooks;
use crate::target::{Class, HookId, Owner, Rights, Target};
use crate::verdict::Verdict;

mod dispatch;
mod integrity;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HookError {
    #[error("{0:#x} is outside guest RAM")]
    OutsideRam(u64),
    #[error("{0:#x} is not mapped in the guest's page tables")]
    Unmapped(u64),
    #[error("a memory hook must stay inside one 4 KiB page ({0:#x} + {1:#x} crosses)")]
    CrossesPage(u64, u64),
    #[error("empty range")]
    Empty,
    #[error("{0:#x} + {1:#x} is larger than guest RAM ({2:#x} bytes) or wraps")]
    TooLarge(u64, u64, u64),
    #[error("no hook {0}")]
    NoHook(HookId),
    #[error("hypervisor: {0}")]
    Glue(#[from] GlueError),
}

/// A guest range `[addr, addr+len)` that is not empty, does not wrap and is no
/// larger than guest RAM: the bound every length from outside (symbols, gdb,
/// commands) meets before anything is built from it.
pub fn check_extent(addr: u64, len: u64, ram: u64) -> Result<(), HookError> {
    if len == 0 {
        return Err(HookError::Empty);
    }
    if len > ram || addr.checked_add(len).is_none() {
        return Err(HookError::TooLarge(addr, len, ram));
    }
    Ok(())
}

/// Handler timing: a log2 histogram of nanoseconds.
#[derive(Debug, Clone, Default)]
pub struct Latency {
    pub buckets: [u64; 32],
    pub count: u64,
    pub total_ns: u64,
}

impl Latency {
    fn add(&mut self, ns: u64) {
        self.buckets[(64 - ns.max(1).leading_zeros() as usize - 1).min(31)] += 1;
        self.count += 1;
        self.total_ns += ns;
    }
}

/// What makes two alerts the same act: vCPU, hook, class, RIP and reason.
type AlertKey = (u32, HookId, Class, u64, String);

/// How many handled events `Engine::recent` keeps (the journal keeps all).
pub const RECENT: usize = 10_000;

pub use crate::event::EventRecord;

/// Per-vCPU engine state (passed explicitly: no global "current vCPU").
#[derive(Debug, Clone, Default)]
pub(crate) struct VcpuState {
    /// Registers as last seen, for CR/DTR change detection.
    pub(crate) last: Option<SRegs>,
    pub(crate) last_xcr0: Option<u64>,
    /// Exits seen on this vCPU (to know that two exits belong to one instruction).
    pub(crate) exits: u64,
    /// The instruction execution last analysed.
    pub(crate) insn: Option<Analysed>,
}

/// One analysed instruction execution: its verdict covers its other accesses.
#[derive(Debug, Clone)]
pub(crate) struct Analysed {
    pub(crate) start: u64,
    pub(crate) end: u64,
    /// The vCPU's exit number at the analysis.
    pub(crate) exit: u64,
    pub(crate) verdict: Verdict,
    /// The access whose exit triggered the analysis.
    pub(crate) trigger: (u64, crate::event::AccessKind),
    /// Every (gpa, len, kind) piece the analysis covered.
    pub(crate) pieces: Vec<(u64, u64, crate::event::AccessKind)>,
}

/// Instructions found for (CR3, reported RIP, write?): (start, bytes).
pub(crate) type InsnCache = HashMap<(u64, u64, bool), (u64, Vec<u8>)>;

/// The introspection engine.
/// Names a guest address, e.g. "entry_SYSCALL_64+0x10".
pub type Symbolizer = Box<dyn Fn(u64) -> Option<String> + Send>;

/// Names the task the vCPU being handled runs, e.g. "swapper/0[0]".
pub type TaskNamer = Box<dyn Fn(&dyn Guest) -> Option<String> + Send>;

pub struct Engine {
    hooks: Hooks,
    page_counts: HashMap<u64, [u32; 3]>,
    msr_counts: HashMap<u32, (u32, u32)>,
    class_counts: HashMap<Class, u32>,
    rights_dirty: bool,
    alerts: Vec<Alert>,
    /// Where each distinct act's alert is in `alerts` (see `push_alert`).
    alert_index: std::collections::HashMap<AlertKey, usize>,
    /// The analyst's verdict overrides, newest last (at most `RECENT`).
    overrides: Vec<crate::alert::Override>,
    /// The last `RECENT` handled events.
    recent: VecDeque<Arc<EventRecord>>,
    exceptions: Exceptions,
    /// Report NotAllowed but enforce nothing.
    log_only: bool,
    journal: Option<Box<dyn Journal>>,
    event_id: u64,
    events_per_class: HashMap<Class, u64>,
    latency: Latency,
    vcpus: Vec<VcpuState>,
    /// Our breakpoints by gpa: the original byte, how the VMM placed it, and
    /// whether it is hidden (then reads of a patched byte return the original).
    breakpoints: HashMap<u64, (u8, BreakpointKind, bool)>,
    integrity: Vec<crate::integrity::Region>,
    /// Set when the engine cannot go on (HVMI's DisableOnReturn): a commit of
    /// hypervisor controls failed.
    fatal: Option<String>,
    /// What callbacks asked for during the running dispatch.
    requests: Requests,
    started: Instant,
    /// Names a guest address ("sym+0x10"): alerts name their writer with it.
    symbolizer: Option<Symbolizer>,
    /// Names the current task in events and alerts (an OS-aware guest).
    task_namer: Option<TaskNamer>,
    /// The start of the instruction being analysed, when the exit's RIP is not it.
    insn_rip: Option<u64>,
    /// Instructions found for (CR3, reported RIP, write?): where they start and their
    /// bytes. Reused only after re-reading the bytes from guest memory and finding
    /// them unchanged (HVMI's instruction cache, keyed the same way).
    insn_cache: InsnCache,
    next_alert: u64,
    /// The record of the event the running handler call concluded (taken by
    /// `take_handled`), so a caller never has to guess which record is its own.
    handled: Option<Arc<EventRecord>>,
}

impl Default for Engine {
    fn default() -> Self {
        Engine::new()
    }
}

impl Engine {
    /// `init`: an engine with no hooks; every event class starts off.
    pub fn new() -> Self {
        crate::decode::warm_up();
        Engine {
            hooks: Hooks::default(),
            page_counts: HashMap::new(),
            msr_counts: HashMap::new(),
            class_counts: HashMap::new(),
            rights_dirty: false,
            alerts: vec![],
            alert_index: Default::default(),
            overrides: vec![],
            recent: VecDeque::new(),
            exceptions: Exceptions::default(),
            log_only: false,
            journal: None,
            event_id: 0,
            events_per_class: HashMap::new(),
            latency: Latency::default(),
            vcpus: vec![],
            breakpoints: HashMap::new(),
            integrity: vec![],
            fatal: None,
            requests: Requests::default(),
            started: Instant::now(),
            symbolizer: None,
            task_namer: None,
            insn_rip: None,
            insn_cache: HashMap::new(),
            next_alert: 0,
            handled: None,
        }
    }

    /// `uninit`: removes every hook and undoes its controls.
    pub fn uninit(&mut self, guest: &mut dyn Guest) -> Result<(), GlueError> {
        let ids: Vec<HookId> = self.hooks.iter().map(|h| h.id).collect();
        for id in ids {
            self.hooks.flag_removed(id);
        }
        self.commit(guest)
    }

    pub fn set_journal(&mut self, j: Box<dyn Journal>) {
        self.journal = Some(j);
    }

    /// Whether the exit for `class` is switched on (some hook of it exists).
    pub fn class_enabled(&self, class: Class) -> bool {
        self.class_counts.get(&class).copied().unwrap_or(0) > 0
    }

    /// Microseconds since the engine started (the clock of `EventRecord::at_us`).
    pub fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    // ---- what the console and tests read ----

    pub fn hooks(&self) -> &Hooks {
        &self.hooks
    }

    /// Alerts raised so far (enforced or log-only).
    /// Names guest addresses in alerts (the writer's symbol) from now on.
    pub fn set_symbolizer(&mut self, f: Symbolizer) {
        self.symbolizer = Some(f);
    }

    /// Names the current task in events and alerts from now on.
    pub fn set_task_namer(&mut self, f: TaskNamer) {
        self.task_namer = Some(f);
    }

    pub(crate) fn symbol_of(&self, addr: u64) -> Option<String> {
        self.symbolizer.as_ref().and_then(|f| f(addr))
    }

    /// The analyst's verdict overrides (the console's `verdict`).
    pub fn overrides(&self) -> &[crate::alert::Override] {
        &self.overrides
    }

    pub fn alerts(&self) -> &[Alert] {
        &self.alerts
    }

    /// The last `RECENT` handled events, oldest first.
    pub fn recent(&self) -> &VecDeque<Arc<EventRecord>> {
        &self.recent
    }

    pub fn exceptions(&self) -> &Exceptions {
        &self.exceptions
    }

    pub fn exceptions_mut(&mut self) -> &mut Exceptions {
        &mut self.exceptions
    }

    pub fn log_only(&self) -> bool {
        self.log_only
    }

    /// Report what would be denied, enforce nothing.
    pub fn set_log_only(&mut self, on: bool) {
        self.log_only = on;
    }

    /// Events handled so far (the id of the newest).
    pub fn event_count(&self) -> u64 {
        self.event_id
    }

    pub fn events_per_class(&self) -> &HashMap<Class, u64> {
        &self.events_per_class
    }

    /// Handler timing.
    pub fn latency(&self) -> &Latency {
        &self.latency
    }

    /// Why the engine cannot go on, once (see `fatal`).
    pub fn take_fatal(&mut self) -> Option<String> {
        self.fatal.take()
    }

    pub(crate) fn set_fatal(&mut self, why: String) {
        self.fatal.get_or_insert(why);
    }

    /// The original byte under our INT3 at `gpa` (None where no INT3 patches
    /// the code: no breakpoint, or one in a debug register).
    pub(crate) fn original_byte(&self, gpa: u64) -> Option<u8> {
        match self.breakpoints.get(&gpa) {
            Some((b, k, _)) if k.patches() => Some(*b),
            _ => None,
        }
    }

    /// What a guest read of `gpa` must see instead of our INT3: the original
    /// byte under a hidden breakpoint (a visible one reads as the INT3 it is,
    /// also where its page is trapped for the fetch of it).
    pub(crate) fn hidden_byte(&self, gpa: u64) -> Option<u8> {
        match self.breakpoints.get(&gpa) {
            Some((b, k, true)) if k.patches() => Some(*b),
            _ => None,
        }
    }

    /// Whether a hook watches execution on the page of `gpa`.
    pub(crate) fn watches_exec(&self, gpa: u64) -> bool {
        self.page_counts
            .get(&(gpa & !0xfff))
            .is_some_and(|c| c[2] > 0)
    }

    /// Whether one of our breakpoints is at `gpa` (patched or not).
    pub(crate) fn is_our_breakpoint(&self, gpa: u64) -> bool {
        self.breakpoints.contains_key(&gpa)
    }

    pub(crate) fn insn_cache(&mut self) -> &mut InsnCache {
        &mut self.insn_cache
    }

    /// Where the instruction being analysed starts, when the exit's RIP is past it.
    pub(crate) fn set_insn_rip(&mut self, rip: Option<u64>) {
        self.insn_rip = rip;
    }

    pub(crate) fn vcpu(&mut self, id: u32) -> &mut VcpuState {
        let i = id as usize;
        if self.vcpus.len() <= i {
            self.vcpus.resize(i + 1, VcpuState::default());
        }
        &mut self.vcpus[i]
    }

    // ---- adding and removing hooks ----

    /// Adds a hook; its hypervisor control (page rights, MSR interception,
    /// breakpoint, polling) is switched on with the first hook that needs it.
    pub fn add_hook(
        &mut self,
        guest: &mut dyn VmControl,
        target: Target,
        name: impl Into<String>,
        callback: Callback,
    ) -> Result<HookId, HookError> {
        self.add_hook_as(guest, target, Owner::Analyst, name.into(), callback)
    }

    /// Adds a hook that `owner` placed (named after it): policies and gdb.
    pub fn add_owned_hook(
        &mut self,
        guest: &mut dyn VmControl,
        target: Target,
        owner: Owner,
        callback: Callback,
    ) -> Result<HookId, HookError> {
        self.add_hook_as(guest, target, owner, owner.to_string(), callback)
    }

    fn add_hook_as(
        &mut self,
        guest: &mut dyn VmControl,
        target: Target,
        owner: Owner,
        name: String,
        callback: Callback,
    ) -> Result<HookId, HookError> {
        let target = self.resolve(guest, target)?;
        self.control(guest, &target, 1)?;
        Ok(self.hooks.insert(target, owner, name, callback))
    }

    /// Validates a target and fills in what the guest state determines.
    fn resolve(
        &mut self,
        guest: &mut dyn VmControl,
        mut target: Target,
    ) -> Result<Target, HookError> {
        match &mut target {
            Target::Gpa { gpa, len, .. } => {
                // Any length inside RAM: one hook, one slot change per run of
                // pages (`hook ept 0x400000 0xfc00000 w` is one command).
                check_extent(*gpa, *len, guest.ram_size())?;
                if *gpa + *len > guest.ram_size() {
                    return Err(HookError::OutsideRam(*gpa));
                }
            }
            Target::Gva {
                gva, len, cr3, gpa, ..
            } => {
                check_range(*gva, *len)?;
                let mut mode = guest.paging();
                if *cr3 == 0 {
                    *cr3 = mode.cr3;
                }
                mode.cr3 = *cr3;
                let t = crate::paging::translate(&crate::decode::phys(guest), mode, *gva)
                    .map_err(|_| HookError::Unmapped(*gva))?;
                if t.gpa >= guest.ram_size() {
                    return Err(HookError::OutsideRam(t.gpa));
                }
                *gpa = Some(t.gpa);
            }
            Target::Breakpoint { gva, gpa, hidden } => {
                let t = crate::paging::translate(&crate::decode::phys(guest), guest.paging(), *gva)
                    .map_err(|_| HookError::Unmapped(*gva))?;
                *gpa = t.gpa;
                let mut b = [0u8];
                guest.read_phys(t.gpa, &mut b)?;
                self.breakpoints
                    .insert(t.gpa, (b[0], BreakpointKind::Patched, *hidden));
            }
            _ => {}
        }
        Ok(target)
    }

    /// Takes `vcpu`'s baseline for the polled classes that are on (CR and DTR
    /// from its registers now, XCR0 read now): what a hook edit made outside
    /// any exit asks each vCPU to do when it switches such a class on, so that
    /// a change made before the vCPU's first poll is still seen as a change.
    pub fn take_polled_baseline(&mut self, vcpu: &dyn crate::glue::VcpuView) {
        let v = vcpu.vcpu();
        if self.class_enabled(Class::Cr) || self.class_enabled(Class::Dtr) {
            let now = vcpu.sregs();
            self.vcpu(v).last = now.set_up().then_some(now);
        }
        if self.class_enabled(Class::Xcr) {
            self.vcpu(v).last_xcr0 = vcpu.xcr0();
        }
    }

    /// Applies (+1) or undoes (-1) the hypervisor controls a hook needs.
    fn control(
        &mut self,
        guest: &mut dyn VmControl,
        target: &Target,
        delta: i32,
    ) -> Result<(), GlueError> {
        let class = target.class();
        let c = self.class_counts.entry(class).or_default();
        let was_on = *c > 0;
        *c = c.checked_add_signed(delta).unwrap_or(0);
        if !was_on && *c > 0 {
            // A polled class starts from the registers as they are now, so a change
            // made before the first poll is still seen as a change.
            if let Some((v, now, xcr0)) = guest.polled_baseline() {
                match class {
                    Class::Cr | Class::Dtr => self.vcpu(v).last = now.set_up().then_some(now),
                    Class::Xcr => self.vcpu(v).last_xcr0 = xcr0,
                    _ => {}
                }
            }
        }
        match *target {
            Target::Gpa { rights, .. }
            | Target::Gva {
                gpa: Some(_),
                rights,
                ..
            } => {
                for page in target.pages() {
                    self.page_rights(guest, page, rights, delta)?;
                }
            }
            Target::Breakpoint { gpa, gva, hidden } => {
                // A hidden INT3's page is read-trapped so guest reads of it return
                // the original byte (AllowedPatched); a debug-register breakpoint
                // changes no byte and needs no trap.
                if delta > 0 {
                    let kind = guest.set_breakpoint(gpa, gva, true, hidden)?;
                    if let Some(e) = self.breakpoints.get_mut(&gpa) {
                        e.1 = kind;
                    }
                    if let Some(r) = kind.trap(hidden) {
                        self.page_rights(guest, gpa, r, delta)?;
                    }
                } else {
                    let kind = self.breakpoints.remove(&gpa).map(|e| e.1);
                    if let Some(r) = kind.and_then(|k| k.trap(hidden)) {
                        self.page_rights(guest, gpa, r, delta)?;
                    }
                    guest.set_breakpoint(gpa, gva, false, hidden)?;
                }
            }
            Target::Msr { index, read, write } => {
                let e = self.msr_counts.entry(index).or_default();
                let old = (e.0 > 0, e.1 > 0);
                if read {
                    e.0 = e.0.checked_add_signed(delta).unwrap_or(0);
                }
                if write {
                    e.1 = e.1.checked_add_signed(delta).unwrap_or(0);
                }
                let new = (e.0 > 0, e.1 > 0);
                if old != new {
                    guest.intercept_msr(index, new.0, new.1)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Per-page counts; the page's rights change only when a count goes 0 <-> 1.
    fn page_rights(
        &mut self,
        guest: &mut dyn VmControl,
        gpa: u64,
        rights: Rights,
        delta: i32,
    ) -> Result<(), GlueError> {
        let page = gpa & !0xfff;
        let counts = self.page_counts.entry(page).or_default();
        let before = *counts;
        for (i, on) in [rights.read, rights.write, rights.exec]
            .into_iter()
            .enumerate()
        {
            if on {
                counts[i] = counts[i].checked_add_signed(delta).unwrap_or(0);
            }
        }
        let after = *counts;
        if after == [0, 0, 0] {
            self.page_counts.remove(&page);
        }
        let zero = |c: [u32; 3]| c.map(|n| n > 0);
        if zero(before) != zero(after) {
            guest.set_page_rights(page, rights_for(after))?;
            self.rights_dirty = true;
        }
        Ok(())
    }

    /// Flags a hook for removal (it stops firing now; deleted at the next commit).
    pub fn remove_hook(&mut self, id: HookId) -> Result<(), HookError> {
        self.hooks
            .flag_removed(id)
            .map(|_| ())
            .ok_or(HookError::NoHook(id))
    }

    pub fn set_hook_enabled(&mut self, id: HookId, on: bool) -> Result<(), HookError> {
        let h = self
            .hooks
            .get_mut(id)
            .filter(|h| !h.removed)
            .ok_or(HookError::NoHook(id))?;
        h.enabled = on;
        Ok(())
    }

    /// Deletes flagged hooks, undoes their controls, and applies page-rights
    /// changes in one batch. Runs at every handler's end and on the timer.
    pub fn commit(&mut self, guest: &mut dyn VmControl) -> Result<(), GlueError> {
        for h in self.hooks.commit() {
            self.control(guest, &h.target, -1)?;
        }
        if self.rights_dirty {
            self.rights_dirty = false;
            guest.commit_rights()?;
        }
        Ok(())
    }

    /// Moves a GVA hook to its page's new frame (or off, when unmapped).
    pub(crate) fn repage(
        &mut self,
        guest: &mut dyn Guest,
        id: HookId,
        new: Option<u64>,
    ) -> Result<(), GlueError> {
        let Some(h) = self.hooks.get(id) else {
            return Ok(());
        };
        let old = h.target.clone();
        self.control(guest, &old, -1)?;
        self.hooks.repage(id, new);
        let now = self.hooks.get(id).map(|h| h.target.clone());
        if let Some(t) = now {
            self.control(guest, &t, 1)?;
        }
        Ok(())
    }

    /// Records that the vCPU exited (for per-instruction bookkeeping).
    pub fn note_exit(&mut self, vcpu: u32) {
        self.vcpu(vcpu).exits += 1;
    }
}

fn check_range(addr: u64, len: u64) -> Result<(), HookError> {
    if len == 0 {
        return Err(HookError::Empty);
    }
    // Checked: a length near 2^64 must not wrap round into a small range.
    if (addr & 0xfff)
        .checked_add(len)
        .is_none_or(|end| end > 0x1000)
    {
        return Err(HookError::CrossesPage(addr, len));
    }
    Ok(())
}

/// Read and execute hooks need every access to exit; write hooks only writes.
fn rights_for(counts: [u32; 3]) -> PageRights {
    if counts[0] > 0 || counts[2] > 0 {
        PageRights::AllTrapped
    } else if counts[1] > 0 {
        PageRights::WriteTrapped
    } else {
        PageRights::Full
    }
}
