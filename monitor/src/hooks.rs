//! Hook edits from the front ends, VM-wide: made on the calling thread while
//! the vCPUs run on, with no vCPU thread taking part (`vmm::glue::VmWide`).
//! A page-rights change is committed with the run gate, which kicks every vCPU
//! out of the guest and holds it until the memslots are whole; MSR
//! interception and breakpoints are VM-wide state each vCPU picks up at its
//! next entry.

use std::sync::Arc;

use vmiscope_introspect::glue::GlueError;
use vmiscope_introspect::{Callback, Class, HookError, HookId, Target};
use vmiscope_vmm::glue::VmWide;
use vmiscope_vmm::{VcpuTask, VmShared};

use crate::handler::Introspection;

impl Introspection {
    /// Adds a hook and commits it. A guest-virtual target is resolved with
    /// vCPU `cpu`'s page tables at its last exit.
    ///
    /// A hook that switches a polled class on (CR, DTR, XCR: no exits, see
    /// `handlers::poll_registers`) also asks every vCPU for its baseline, in a
    /// task it runs at once if paused or at its next exit (a kick away): the
    /// answer is not waited for. Without it a change made before a vCPU's first
    /// poll would become the baseline and go unseen (XCR0 is read only on the
    /// 1 Hz timer).
    pub fn add_hook(
        self: &Arc<Self>,
        vm: &VmShared,
        cpu: u32,
        target: Target,
        name: impl Into<String>,
        callback: Callback,
    ) -> Result<HookId, HookError> {
        let mut ctl = vm_wide(vm, cpu)?;
        let class = target.class();
        let mut e = self.engine.lock().unwrap();
        let switched_on = !e.class_enabled(class);
        let id = e.add_hook(&mut ctl, target, name, callback)?;
        e.commit(&mut ctl)?;
        drop(e);
        if switched_on && matches!(class, Class::Cr | Class::Dtr | Class::Xcr) {
            for v in 0..vm.vcpu_count() {
                let me = self.clone();
                let task: VcpuTask = Box::new(move |c| {
                    me.engine.lock().unwrap().take_polled_baseline(c);
                });
                vm.with_vcpu(v, task);
            }
        }
        Ok(id)
    }

    /// Removes a hook: flagged, then its controls undone by the commit (HVMI's
    /// flag-then-commit, so a callback running now on a vCPU finishes first).
    pub fn remove_hook(&self, vm: &VmShared, id: HookId) -> Result<(), HookError> {
        let mut e = self.engine.lock().unwrap();
        e.remove_hook(id)?;
        e.commit(&mut vm_wide(vm, 0)?)?;
        Ok(())
    }

    /// Applies the hook removals flagged since the last commit.
    pub fn commit_hooks(&self, vm: &VmShared) -> Result<(), HookError> {
        let mut e = self.engine.lock().unwrap();
        e.commit(&mut vm_wide(vm, 0)?)?;
        Ok(())
    }
}

fn vm_wide(vm: &VmShared, cpu: u32) -> Result<VmWide<'_>, HookError> {
    VmWide::new(vm, cpu).ok_or_else(|| GlueError::Failed(format!("no vCPU {cpu}")).into())
}
