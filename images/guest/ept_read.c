/* ept-read: reads `ept_secret` at CPL0 and CPL3 and prints the values. With the page
 * read-trapped the VMM sees a memory-read exit per read and supplies the data. */
#include "rt/rt.h"

PAGE(ept_secret) volatile u64 ept_secret[512] = {0x5ec2e7000000c0deUL, 0x5ec2e7000000c3deUL};

static USER u64 user_read(u64 i) { return ept_secret[i]; }

int main(void) {
    kprintf("ept-read: secret page at %p\n", (u64)ept_secret);
    u64 a = ept_secret[0];
    kprintf("ept-read: cpl0 read %lx from %p\n", a, (u64)&ept_secret[0]);
    u64 b = run_user(user_read, 1);
    kprintf("ept-read: cpl3 read %lx from %p\n", b, (u64)&ept_secret[1]);
    kputs("ept-read: done\n");
    return 0;
}
