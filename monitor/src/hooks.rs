//! Hook edits from the front ends, VM-wide: made on the calling thread, with
//! no vCPU thread taking part (`vmm::glue::VmWide`). Each edit holds every
//! vCPU out of the guest from its first change to its commit
//! (`VmShared::hold_guest`): a hidden breakpoint's INT3 lands in guest memory
//! before its page is trapped, and no vCPU may run in between. MSR
//! interception and debug registers are VM-wide state each vCPU picks up at
//! its next entry.

use std::sync::Arc;

use vmiscope_introspect::glue::{GlueError, VmControl};
use vmiscope_introspect::policy::{self, Policy};
use vmiscope_introspect::{Callback, Class, Engine, HookError, HookId, Owner, Target};
use vmiscope_vmm::glue::VmWide;
use vmiscope_vmm::{VcpuCtl, VcpuTask, VmShared};

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
        let name = name.into();
        self.add_with(vm, cpu, target.class(), |e, ctl| {
            e.add_hook(ctl, target, name, callback)
        })
    }

    /// As `add_hook`, for a hook a debugger placed (owned by gdb, named after it).
    pub fn add_gdb_hook(
        self: &Arc<Self>,
        vm: &VmShared,
        cpu: u32,
        target: Target,
        callback: Callback,
    ) -> Result<HookId, HookError> {
        self.add_with(vm, cpu, target.class(), |e, ctl| {
            e.add_owned_hook(ctl, target, Owner::Gdb, callback)
        })
    }

    fn add_with(
        self: &Arc<Self>,
        vm: &VmShared,
        cpu: u32,
        class: Class,
        add: impl FnOnce(&mut Engine, &mut dyn VmControl) -> Result<HookId, HookError>,
    ) -> Result<HookId, HookError> {
        let mut ctl = vm_wide(vm, cpu)?;
        let mut e = self.engine.lock().unwrap();
        let held = vm.hold_guest();
        let switched_on = !e.class_enabled(class);
        let id = add(&mut e, &mut ctl)?;
        e.commit(&mut ctl)?;
        drop(held);
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
        let _held = vm.hold_guest();
        e.remove_hook(id)?;
        e.commit(&mut vm_wide(vm, 0)?)?;
        Ok(())
    }

    /// Switches `policies` on now, with the policy environment of now; returns
    /// their hooks. On a vCPU's thread: a policy reads that vCPU's descriptor
    /// tables to find what it protects.
    pub fn enable_policies(
        &self,
        cpu: &mut VcpuCtl<'_>,
        policies: &[Policy],
    ) -> Result<Vec<HookId>, String> {
        let env = self.policy_env();
        let mut e = self.engine.lock().unwrap();
        let _held = cpu.vm().hold_guest();
        let r = policy::enable(&mut e, cpu, policies, &env).map_err(|e| e.to_string());
        e.commit(cpu).map_err(|e| e.to_string())?;
        r
    }

    /// Switches `policy` off: its hooks are removed and committed. Returns how
    /// many there were (0: it was not on).
    pub fn disable_policy(&self, vm: &VmShared, p: Policy) -> Result<usize, HookError> {
        let mut e = self.engine.lock().unwrap();
        let _held = vm.hold_guest();
        let n = policy::disable(&mut e, p);
        e.commit(&mut vm_wide(vm, 0)?)?;
        Ok(n)
    }

    /// Applies the hook removals flagged since the last commit.
    pub fn commit_hooks(&self, vm: &VmShared) -> Result<(), HookError> {
        let mut e = self.engine.lock().unwrap();
        let _held = vm.hold_guest();
        e.commit(&mut vm_wide(vm, 0)?)?;
        Ok(())
    }
}

fn vm_wide(vm: &VmShared, cpu: u32) -> Result<VmWide<'_>, HookError> {
    VmWide::new(vm, cpu).ok_or_else(|| GlueError::Failed(format!("no vCPU {cpu}")).into())
}
