/* msr: writes LSTAR and SYSENTER_EIP at CPL0 and reads them back. With the MSR
 * filter on, the VMM sees each write and applies it, drops it, or refuses it (#GP). */
#include "rt/rt.h"

#define MSR_LSTAR 0xc0000082
#define MSR_SYSENTER_EIP 0x176

static void one(const char *name, u32 msr, u64 v) {
    u64 before = 0, after = 0;
    rdmsr_safe(msr, &before);
    u64 err = wrmsr_safe(msr, v);
    u64 rerr = rdmsr_safe(msr, &after);
    kprintf("msr: %s (%x) before %lx, wrmsr %lx: %s, reads back %lx%s\n", name, msr, before, v,
            err ? "#GP" : "ok", after, rerr ? " (rdmsr #GP)" : "");
}

int main(void) {
    one("LSTAR", MSR_LSTAR, 0xffffffff81c00000UL);
    one("SYSENTER_EIP", MSR_SYSENTER_EIP, 0xffffffff81c00100UL);
    /* Not canonical: the CPU raises #GP, whatever a policy would decide. */
    one("LSTAR-noncanonical", MSR_LSTAR, 0x0000800000000000UL);
    kputs("msr: done\n");
    return 0;
}
