//! Per-vCPU state, messages (pause, resume, tasks), kicks, the stop, counters.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{VcpuInfo, VcpuMsg, VcpuState, VcpuTask, VmShared};
use crate::devices::SerialLog;
use crate::host::Host;
use crate::kick;
use crate::stats::ExitClass;
use crate::stop::StopReason;

impl VmShared {
    /// How long vCPU `cpu` has not exited.
    pub(crate) fn quiet_for(&self, cpu: u32) -> Duration {
        let last = self.vcpus[cpu as usize]
            .last_exit_ns
            .load(Ordering::Relaxed);
        Duration::from_nanos(self.now_ns().saturating_sub(last))
    }

    /// What kind of KVM this is (PVM or hardware-virtualised).
    pub fn host(&self) -> Host {
        self.host
    }

    /// The guest's serial output.
    pub fn serial(&self) -> &Arc<SerialLog> {
        &self.serial
    }

    pub(crate) fn vcpu_info(&self, cpu: u32) -> &VcpuInfo {
        &self.vcpus[cpu as usize]
    }

    /// Records vCPU `cpu`'s new state and wakes whoever waits for one.
    pub(crate) fn set_state(&self, cpu: u32, state: VcpuState) {
        let v = &self.vcpus[cpu as usize];
        if v.state.swap(state as u8, Ordering::SeqCst) != state as u8 {
            let _g = self.state_lock.lock().unwrap();
            self.state_cv.notify_all();
        }
    }

    /// Whether every vCPU has stopped (halted for good, or its thread ended).
    pub(crate) fn all_stopped(&self) -> bool {
        (0..self.vcpu_count()).all(|c| self.vcpu_state(c) == Some(VcpuState::Stopped))
    }

    /// Waits (blocking on the state condvar) until `done` holds for every vCPU's
    /// state, up to `timeout`; returns whether it did.
    pub fn wait_states(&self, timeout: Duration, done: impl Fn(u32, VcpuState) -> bool) -> bool {
        let t = Instant::now();
        let mut g = self.state_lock.lock().unwrap();
        loop {
            if (0..self.vcpu_count()).all(|c| self.vcpu_state(c).is_some_and(|s| done(c, s))) {
                return true;
            }
            let Some(left) = timeout.checked_sub(t.elapsed()) else {
                return false;
            };
            g = self.state_cv.wait_timeout(g, left).unwrap().0;
        }
    }

    pub fn vcpu_count(&self) -> u32 {
        self.vcpus.len() as u32
    }

    /// Why the run ended (or is ending), once it is.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.stop.lock().unwrap().clone()
    }

    /// Ends the run (the first reason wins) and kicks every vCPU out of the guest.
    pub fn stop(&self, reason: StopReason) {
        {
            let mut s = self.stop.lock().unwrap();
            if s.is_none() {
                *s = Some(reason);
            }
        }
        self.stopping.store(true, Ordering::SeqCst);
        for (i, v) in self.vcpus.iter().enumerate() {
            if let Some(tx) = v.tx.lock().unwrap().as_ref() {
                let _ = tx.send(VcpuMsg::Stop);
            }
            self.kick(i as u32);
        }
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn send(&self, cpu: u32, msg: VcpuMsg) {
        // Only a pause needs the vCPU out of the guest: a resume or a wake is for
        // a vCPU that is not in it, and kicking one that has just been let go
        // would cost it a signal and an entry that returns EINTR at once.
        let kick = matches!(msg, VcpuMsg::Pause);
        if let Some(tx) = self
            .vcpus
            .get(cpu as usize)
            .and_then(|v| v.tx.lock().unwrap().clone())
        {
            let _ = tx.send(msg);
        }
        if kick {
            self.kick_if_running(cpu);
        }
    }

    /// Kicks `cpu` out of the guest only if it may be in it: a paused or held
    /// vCPU reads its messages anyway, and a kick would cost it a signal and a
    /// wasted guest entry (KVM_RUN returning EINTR at once). Read after the
    /// message is queued: a vCPU marks itself running before it last looks at
    /// its queue (`serve_messages`), so a message is never left unseen.
    pub(super) fn kick_if_running(&self, cpu: u32) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.vcpu_state(cpu) == Some(VcpuState::Running) {
            self.kick(cpu);
        }
    }

    /// Runs `task` on vCPU `cpu`'s thread at its next stop point: at once when it
    /// is paused or held at a stop, else after its next exit (a kick forces one).
    /// The one path for running something on a vCPU.
    pub fn with_vcpu(&self, cpu: u32, task: VcpuTask) -> bool {
        let Some(v) = self.vcpus.get(cpu as usize) else {
            return false;
        };
        let sent =
            v.tx.lock()
                .unwrap()
                .as_ref()
                .is_some_and(|tx| tx.send(VcpuMsg::With(task)).is_ok());
        self.kick_if_running(cpu);
        sent
    }

    /// Asks every vCPU to pause (it stops at its next exit; a kick forces one).
    pub fn pause_all(&self) {
        (0..self.vcpu_count()).for_each(|c| self.send(c, VcpuMsg::Pause));
    }

    /// How many tasks (`with_vcpu`) vCPU `cpu` has started (see `VcpuCtl::tasks_run`).
    pub fn tasks_started(&self, cpu: u32) -> u64 {
        self.vcpus
            .get(cpu as usize)
            .map_or(0, |v| v.tasks.load(Ordering::SeqCst))
    }

    /// Pauses every vCPU but those held at a stop (they stay held until their
    /// stop is resumed; a Pause would only wake them for nothing).
    pub fn pause_unheld(&self) {
        (0..self.vcpu_count())
            .filter(|c| self.vcpu_state(*c) != Some(VcpuState::Held))
            .for_each(|c| self.send(c, VcpuMsg::Pause));
    }

    /// Resumes one paused vCPU.
    pub fn resume_vcpu(&self, cpu: u32) {
        self.send(cpu, VcpuMsg::Resume);
    }

    pub fn resume_all(&self) {
        (0..self.vcpu_count()).for_each(|c| self.send(c, VcpuMsg::Resume));
    }

    /// Waits until no vCPU is in the guest (each paused, held at a stop, or
    /// stopped), blocking on the vCPUs' acknowledgements.
    pub fn wait_paused(&self, timeout: Duration) -> bool {
        self.wait_states(timeout, |_, s| s.is_quiet())
    }

    /// Wakes a held vCPU so that its hold condition is looked at again.
    pub fn wake_vcpu(&self, cpu: u32) {
        if let Some(tx) = self
            .vcpus
            .get(cpu as usize)
            .and_then(|v| v.tx.lock().unwrap().clone())
        {
            let _ = tx.send(VcpuMsg::Wake);
        }
    }

    /// vCPU `cpu`'s state (None: no such vCPU).
    pub fn vcpu_state(&self, cpu: u32) -> Option<VcpuState> {
        let v = self.vcpus.get(cpu as usize)?;
        Some(VcpuState::from_u8(v.state.load(Ordering::SeqCst)))
    }

    /// The paging mode of `cpu` at its last exit (None: no such vCPU).
    pub fn last_paging(&self, cpu: u32) -> Option<vmiscope_introspect::paging::PagingMode> {
        let p = &self.vcpus.get(cpu as usize)?.paging;
        let r = |i: usize| p[i].load(Ordering::Relaxed);
        Some(vmiscope_introspect::paging::PagingMode::from_regs(
            r(0),
            r(1),
            r(2),
            r(3),
        ))
    }

    /// RIP and CPL of `cpu` at its last exit (None: no such vCPU).
    pub fn last_position(&self, cpu: u32) -> Option<(u64, u8)> {
        let v = self.vcpus.get(cpu as usize)?;
        Some((
            v.last_rip.load(Ordering::Relaxed),
            v.last_cpl.load(Ordering::Relaxed),
        ))
    }

    /// vCPU `cpu`'s registers when its thread ended (None: still running, or
    /// no such vCPU).
    pub fn final_state(&self, cpu: u32) -> Option<super::FinalState> {
        *self.vcpus.get(cpu as usize)?.last_state.lock().unwrap()
    }

    /// Kicks `cpu` out of the guest once (it reports `Event::Kicked` and goes on).
    pub fn kick_vcpu(&self, cpu: u32) {
        self.kick(cpu);
    }

    /// Kicks vCPU `cpu` out of KVM_RUN. Never the calling thread's own vCPU: a
    /// thread running this is not in KVM_RUN, goes through its messages and the
    /// run gate before it enters again, and a kick would only make that entry
    /// return EINTR at once (a vCPU committing memslots while it steps over an
    /// instruction on a trapped page kicked itself twice a step).
    pub(crate) fn kick(&self, cpu: u32) {
        if let Some(t) = self.vcpus.get(cpu as usize).and_then(|v| v.thread.get()) {
            // SAFETY: pthread_self and pthread_equal only compare thread ids.
            if unsafe { libc::pthread_equal(*t, libc::pthread_self()) } != 0 {
                return;
            }
            kick::kick(*t);
        }
    }

    pub(crate) fn now_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    /// Per-class exit counts, summed over vCPUs, and per vCPU.
    pub fn exit_counts(&self) -> (Vec<(ExitClass, u64)>, Vec<u64>) {
        let mut total: Vec<(ExitClass, u64)> = ExitClass::ALL.iter().map(|c| (*c, 0)).collect();
        let mut per = vec![];
        for v in &self.vcpus {
            let snap = v.stats.snapshot();
            per.push(snap.iter().map(|(_, n)| n).sum());
            for (class, n) in snap {
                total[class as usize].1 += n;
            }
        }
        total.retain(|(_, n)| *n > 0);
        (total, per)
    }
}
