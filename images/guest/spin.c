/* spin: benchmark workloads. The VMM may patch `spin_mode` and `spin_count` before
 * the run (by symbol). Modes: 0 CPL3 writes to spin_page, 1 CPL3 `out`, 2 CPL0 `out`,
 * 3 CPL0 writes to spin_page, 4 CPL3 compute loop, 5 CPL3 loop that never exits,
 * 6 CPL0 calls of `spin_bp` (alone on its page, for breakpoints), 7 CPL0 calls of
 * `spin_kbp` (alone on a kernel-text page), 8 the CPL0 loop `spin_hot` (3
 * instructions an iteration) on a kernel page that also holds `spin_hot_bp`, never
 * called (a breakpoint there costs the loop only what its page costs). In mode 0
 * every other vCPU runs the same write loop, and vCPU 0 waits for them. */
#include "rt/rt.h"

volatile u64 spin_mode = 0;
volatile u64 spin_count = 100000;
PAGE(spin_page) volatile u64 spin_page[512];
static volatile int aps_done, go;

__attribute__((section(".page.spin_bp"), aligned(4096), noinline, used)) u64 spin_bp(u64 x) { return x + 1; }

/* Kernel text (supervisor pages): where debug-register breakpoints fire on PVM. */
__attribute__((section(".text.spin_kbp"), aligned(4096), noinline, used)) u64 spin_kbp(u64 x) { return x + 1; }
__attribute__((section(".text.spin_hot"), aligned(4096), noinline, used)) u64 spin_hot(u64 n) {
    u64 x = 0;
    __asm__ volatile("1: add %1, %0\n\t.globl spin_hot_dec\nspin_hot_dec: dec %1\n\tjnz 1b"
                     : "+r"(x), "+r"(n));
    return x;
}
__attribute__((section(".text.spin_hot"), noinline, used)) u64 spin_hot_bp(u64 x) { return x + 2; }

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

void ap_main(int cpu) {
    (void)cpu;
    /* Start together with vCPU 0, after its first print (when a VMM arms its hooks). */
    while (!go) cpu_relax();
    if (spin_mode == 0) run_user(user_spin, 0);
    __sync_fetch_and_add(&aps_done, 1);
}

int main(void) {
    u64 mode = spin_mode, n = spin_count;
    kprintf("spin: mode %d count %d\n", mode, n);
    go = 1;
    if (mode == 6) {
        u64 s = 0;
        for (u64 i = 0; i < n; i++) s = spin_bp(s);
        kprintf("spin: spin_bp called %d times\n", s);
    } else if (mode == 7) {
        u64 s = 0;
        for (u64 i = 0; i < n; i++) s = spin_kbp(s);
        kprintf("spin: spin_kbp called %d times\n", s);
    } else if (mode == 8) {
        outb(0x80, 0); /* the loop starts (a timestamp for the host) */
        u64 s = spin_hot(n);
        outb(0x80, 1); /* ... and ends */
        kprintf("spin: spin_hot %d\n", s);
    } else if (mode == 2)
        for (u64 i = 0; i < n; i++) outb(0x80, (u8)i);
    else if (mode == 3)
        for (u64 i = 0; i < n; i++) spin_page[i & 7] = i;
    else
        run_user(user_spin, mode);
    while (aps_done < rt_ncpus - 1) cpu_relax();
    kputs("spin: done\n");
    return 0;
}
