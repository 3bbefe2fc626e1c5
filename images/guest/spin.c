/* spin: benchmark workloads. The VMM may patch `spin_mode` and `spin_count` before
 * the run (by symbol). Modes: 0 CPL3 writes to spin_page, 1 CPL3 `out`, 2 CPL0 `out`,
 * 3 CPL0 writes to spin_page, 4 CPL3 compute loop, 5 CPL3 loop that never exits. */
#include "rt/rt.h"

volatile u64 spin_mode = 0;
volatile u64 spin_count = 100000;
PAGE(spin_page) volatile u64 spin_page[512];

static USER u64 user_spin(u64 mode) {
    u64 n = spin_count;
    switch (mode) {
    case 0: for (u64 i = 0; i < n; i++) spin_page[i & 7] = i; break;
    case 1: for (u64 i = 0; i < n; i++) outb(0x80, (u8)i); break;
    case 4: { volatile u64 x = 0; for (u64 i = 0; i < n; i++) x += i; break; }
    case 5: for (;;) barrier();
    }
    return n;
}

int main(void) {
    u64 mode = spin_mode, n = spin_count;
    kprintf("spin: mode %d count %d\n", mode, n);
    if (mode == 2)
        for (u64 i = 0; i < n; i++) outb(0x80, (u8)i);
    else if (mode == 3)
        for (u64 i = 0; i < n; i++) spin_page[i & 7] = i;
    else
        run_user(user_spin, mode);
    kputs("spin: done\n");
    return 0;
}
