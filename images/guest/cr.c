/* cr: writes CR0.WP, CR4.PGE and CR3 at CPL0, printing each value read back. No exit
 * exists for these on KVM: vmiscope sees them by comparing registers on exits. */
#include "rt/rt.h"

int main(void) {
    u64 cr0 = read_cr0(), cr4 = read_cr4(), cr3 = read_cr3();
    kprintf("cr: cr0 %lx cr3 %lx cr4 %lx\n", cr0, cr3, cr4);
    u64 e = write_cr0_safe(cr0 & ~(1UL << 16));
    kprintf("cr: cleared CR0.WP (%s), cr0 now %lx\n", e ? "fault" : "ok", read_cr0());
    /* The print above made exits: a VMM that polls CRs has seen the change by now. */
    kprintf("cr: cr0 after an exit %lx\n", read_cr0());
    e = write_cr0_safe(cr0);
    kprintf("cr: restored CR0 (%s), cr0 now %lx\n", e ? "fault" : "ok", read_cr0());
    e = write_cr4_safe(cr4 ^ (1UL << 7));
    kprintf("cr: toggled CR4.PGE (%s), cr4 now %lx\n", e ? "fault" : "ok", read_cr4());
    e = write_cr4_safe(cr4);
    kprintf("cr: restored CR4 (%s), cr4 now %lx\n", e ? "fault" : "ok", read_cr4());
    e = write_cr3_safe(cr3);
    kprintf("cr: reloaded CR3 (%s), cr3 now %lx\n", e ? "fault" : "ok", read_cr3());
    kputs("cr: done\n");
    return 0;
}
