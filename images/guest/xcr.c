/* xcr: enables CR4.OSXSAVE and writes XCR0 with XSETBV at CPL0 (a valid and an
 * invalid value), printing what XGETBV reads back. */
#include "rt/rt.h"

/* Iterations of a CPL3 loop after the XSETBV, so a 1 Hz timer can look at XCR0
 * (no exit exists for XSETBV); patched by tests, 0 by default. */
volatile u64 xcr_spin = 0;

static USER u64 user_spin(u64 n) {
    volatile u64 x = 0;
    for (u64 i = 0; i < n; i++) x += i;
    return x;
}

int main(void) {
    u32 a, b, c, d;
    cpuid(1, 0, &a, &b, &c, &d);
    kprintf("xcr: cpuid.1.ecx %x (xsave %d)\n", c, (c >> 26) & 1);
    /* As an OS does: no XSAVE in CPUID, no CR4.OSXSAVE (setting it would #GP).
     * vmiscope hides XSAVE on a host whose KVM never sees XSETBV. */
    if (!((c >> 26) & 1)) {
        kputs("xcr: no XSAVE in CPUID, nothing to test: done\n");
        return 0;
    }
    u64 x = 0;
    /* Architectural faults reach the guest as they would without a VMM: #UD (6)
     * while CR4.OSXSAVE is clear, #GP (13) for an XCR that does not exist. */
    u64 e = xgetbv_safe(0, &x);
    kprintf("xcr: xgetbv with OSXSAVE clear: %s %d\n", e ? "fault" : "no fault", e ? (int)e - 1 : 0);
    e = write_cr4_safe(read_cr4() | (1UL << 18));
    kprintf("xcr: set CR4.OSXSAVE (%s), cr4 %lx\n", e ? "fault" : "ok", read_cr4());
    if (e) return 1;
    kprintf("xcr: xcr0 %lx\n", xgetbv(0));
    e = xgetbv_safe(0x55, &x);
    kprintf("xcr: xgetbv of XCR 0x55: %s %d\n", e ? "fault" : "no fault", e ? (int)e - 1 : 0);
    e = xsetbv_safe(0, 3);
    kprintf("xcr: xsetbv xcr0 <- 3 (%s), xcr0 now %lx\n", e ? "fault" : "ok", xgetbv(0));
    if (xcr_spin) {
        run_user(user_spin, xcr_spin);
        kprintf("xcr: xcr0 after a timer tick %lx\n", xgetbv(0));
    }
    e = xsetbv_safe(0, 0);
    kprintf("xcr: xsetbv xcr0 <- 0 (%s), xcr0 now %lx\n", e ? "fault" : "ok", xgetbv(0));
    kputs("xcr: done\n");
    return 0;
}
