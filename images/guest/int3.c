/* int3: calls `bp_target` (where a debugger plants hidden breakpoints) three times,
 * then executes its own INT3 at CPL0 and at CPL3, which its #BP handler must see. */
#include "rt/rt.h"

__attribute__((noinline, used)) u64 bp_target(u64 x) {
    __asm__ volatile("" ::: "memory");
    return x + 1;
}

static USER u64 user_int3(u64 arg) {
    __asm__ volatile(".globl int3_cpl3\nint3_cpl3: int3" ::: "memory");
    return arg;
}

int main(void) {
    kprintf("int3: bp_target at %p\n", (u64)bp_target);
    u64 sum = 0;
    for (u64 i = 0; i < 3; i++) sum += bp_target(i);
    kprintf("int3: bp_target sum %d\n", sum);
    /* A debugger's hidden breakpoint must read as the original byte. */
    kprintf("int3: first byte of bp_target %x\n", *(volatile u8 *)bp_target);
    __asm__ volatile(".globl int3_cpl0\nint3_cpl0: int3" ::: "memory");
    run_user(user_int3, 0);
    kprintf("int3: guest handled %d #BP\n", rt_bp_count);
    if (sum != 6) return 1;
    kputs("int3: done\n");
    return 0;
}
