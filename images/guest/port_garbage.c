/* port-garbage (test image): writes garbage to every I/O port and reads every port,
 * except the exit ports, then reports that the VMM survived. */
#include "rt/rt.h"

int main(void) {
    kputs("port-garbage: writing and reading every port\n");
    u64 sum = 0;
    for (u32 p = 0; p < 0x10000; p++) {
        if (p == PORT_DEBUG_EXIT || p == 0x64 || (p >= 0x3f8 && p <= 0x3ff)) continue;
        outb((u16)p, (u8)(p * 37 + 11));
        if ((p & 1) == 0) outw((u16)p, 0xdead);
        sum += inb((u16)p);
    }
    kprintf("port-garbage: survived, sum of reads %lx\n", sum);
    return 0;
}
