/* introcall: rings the introcall doorbell at CPL0 and CPL3 and prints the reply. */
#include "rt/rt.h"

static USER u64 user_call(u64 op) {
    u64 res = 0;
    u64 st = introcall(op, 0x10, 0x20, 0x30, &res);
    uprintf3("introcall: cpl3 op %d -> status %lx result %lx\n", op, st, res);
    return st;
}

int main(void) {
    u64 res = 0;
    u64 st = introcall(1, 0x1234, 0x5678, 0x9abc, &res);
    kprintf("introcall: cpl0 op 1 -> status %lx result %lx\n", st, res);
    run_user(user_call, 2);
    kputs("introcall: done\n");
    return 0;
}
