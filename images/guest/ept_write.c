/* ept-write: writes to `ept_target` at CPL0 (u32) and CPL3 (u64) and reports what it
 * reads back. With the page write-trapped the VMM sees one memory-write exit per
 * write; the guest sees its write only if the VMM applies it. */
#include "rt/rt.h"

PAGE(ept_target) volatile u64 ept_target[512] = {0x1111111111111111UL, 0x2222222222222222UL};

static USER u64 user_write(u64 v) {
    ept_target[1] = v;
    return ept_target[1];
}

int main(void) {
    kprintf("ept-write: target page at %p\n", (u64)ept_target);
    *(volatile u32 *)&ept_target[0] = 0xc0ffee00;
    kprintf("ept-write: cpl0 wrote u32 c0ffee00 at %p, reads back %x\n", (u64)&ept_target[0],
            *(volatile u32 *)&ept_target[0]);
    u64 r = run_user(user_write, 0x1122334455667788UL);
    kprintf("ept-write: cpl3 wrote u64 1122334455667788 at %p, reads back %lx\n", (u64)&ept_target[1], r);
    kputs("ept-write: done\n");
    return 0;
}
