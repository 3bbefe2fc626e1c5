//! Step-overs that must run alone. While a vCPU steps over the instruction under
//! one of our INT3s (or any instruction on a page with hidden INT3s), the INT3s
//! on that page hold their original bytes: another vCPU running there would pass
//! a breakpoint unseen. So such a step runs with every other vCPU out of the
//! guest, and turns are taken: a vCPU that just had one waits until the others
//! have entered the guest once before it takes the next (else a vCPU stepping
//! through a hidden breakpoint's page instruction by instruction starves them).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{NO_VCPU, VcpuState, VmShared};

/// How long a vCPU waits for the others to take their turn; a vCPU that does not
/// enter the guest in that time (blocked in a handler) is not waited for.
const TURN_WAIT: Duration = Duration::from_millis(20);

impl VmShared {
    /// Lets vCPU `me` alone run guest code until `end_exclusive`: waits for its
    /// turn, then kicks every other vCPU out of the guest and waits until they are
    /// out. They wait in their message loops (serving tasks, acknowledging
    /// pauses) meanwhile.
    pub(crate) fn begin_exclusive(&self, me: u32) {
        if self.vcpus.len() < 2 {
            return;
        }
        self.wait_for_others_turn(me);
        loop {
            match self
                .exclusive
                .compare_exchange(NO_VCPU, me, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => break,
                Err(x) if x == me => return,
                Err(_) if self.is_stopping() => return,
                Err(_) => std::thread::sleep(Duration::from_micros(20)),
            }
        }
        for c in (0..self.vcpu_count()).filter(|c| *c != me) {
            self.kick(c);
        }
        // Every reader of the gate is a vCPU inside KVM_RUN: once the write lock
        // is ours, none is, and none re-enters while excluded.
        drop(self.run_gate.write().unwrap());
    }

    pub(crate) fn end_exclusive(&self, me: u32) {
        if self
            .exclusive
            .compare_exchange(me, NO_VCPU, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            let entries = self.vcpus.iter().map(|v| v.entries.load(Ordering::SeqCst));
            *self.last_turn.lock().unwrap() = Some((me, entries.collect()));
        }
    }

    /// Whether another vCPU is stepping alone (see `begin_exclusive`).
    pub(crate) fn excluded(&self, me: u32) -> bool {
        let x = self.exclusive.load(Ordering::SeqCst);
        x != NO_VCPU && x != me
    }

    /// If `me` had the last turn, waits (bounded) until every other running vCPU
    /// has entered the guest since.
    fn wait_for_others_turn(&self, me: u32) {
        let Some((last, entries)) = self.last_turn.lock().unwrap().clone() else {
            return;
        };
        if last != me {
            return;
        }
        let t = Instant::now();
        let waiting = |c: usize| {
            c as u32 != me
                && self.vcpu_state(c as u32) == Some(VcpuState::Running)
                && self.vcpus[c].entries.load(Ordering::SeqCst) == entries[c]
        };
        while (0..self.vcpus.len()).any(waiting) && t.elapsed() < TURN_WAIT {
            std::thread::sleep(Duration::from_micros(20));
        }
    }
}
