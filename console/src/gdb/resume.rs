//! Resuming: continue, single-step and scheduler locking per thread.

use crate::error::Error;

use gdbstub::common::{Signal, Tid};
use gdbstub::target::ext::base::multithread::{
    MultiThreadResume, MultiThreadSchedulerLocking, MultiThreadSchedulerLockingOps,
    MultiThreadSingleStep, MultiThreadSingleStepOps,
};

use super::*;

impl MultiThreadResume for GdbTarget {
    fn resume(&mut self) -> Result<(), Error> {
        let actions = std::mem::take(&mut self.resume);
        // gdbstub hands a legacy `c`/`s` over as an action for the current
        // thread alone with scheduler locking; in all-stop mode they resume
        // every vCPU (only the selected one steps), as with QEMU.
        let locked = std::mem::take(&mut self.locked) && !self.legacy.get();
        if self.refused {
            return Ok(()); // a thread that does not exist: stop where we are
        }
        let cpus: Vec<u32> = actions.keys().copied().collect();
        for (cpu, action) in actions {
            if action == Resume::Step {
                // The held vCPU arms the step itself as it resumes; another one is
                // asked on its thread.
                let stepping = match self.s.control().step_on_resume(cpu) {
                    Some(ok) => ok,
                    None => self
                        .on_cpu(cpu, |c| c.start_step())
                        .ok_or("vCPU did not answer")?,
                };
                if !stepping {
                    // Not fatal: the thread stops where it is and gdb sees no progress.
                    crate::errln!(
                        "[vmiscope] gdb: vCPU {cpu} cannot single-step here (CPL3 needs a #DB gate in the guest's IDT and a free DR slot; see `vmiscope caps`)"
                    );
                    self.refused = true;
                    return Ok(());
                }
                self.s.control().arm_step(cpu);
            }
        }
        self.seen = self.s.control().stop_count();
        if locked {
            self.s.go_only(&cpus);
        } else {
            self.s.go();
        }
        Ok(())
    }

    fn clear_resume_actions(&mut self) -> Result<(), Error> {
        self.resume.clear();
        Ok(())
    }

    fn set_resume_action_continue(&mut self, t: Tid, _: Option<Signal>) -> Result<(), Error> {
        self.set_action(t, Resume::Continue);
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<MultiThreadSingleStepOps<'_, Self>> {
        Some(self)
    }

    fn support_scheduler_locking(&mut self) -> Option<MultiThreadSchedulerLockingOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadSchedulerLocking for GdbTarget {
    fn set_resume_action_scheduler_lock(&mut self) -> Result<(), Error> {
        self.locked = true;
        Ok(())
    }
}

impl MultiThreadSingleStep for GdbTarget {
    fn set_resume_action_step(&mut self, t: Tid, _: Option<Signal>) -> Result<(), Error> {
        self.set_action(t, Resume::Step);
        Ok(())
    }
}
