/* hello: the smallest image. CPL0 greeting, a trip to CPL3 and back, pass. */
#include "rt/rt.h"

static USER u64 user_hello(u64 arg) {
    uprintf1("hello from CPL3 (arg %d)\n", arg);
    return arg + 1;
}

int main(void) {
    kprintf("Hello from the vmiscope guest: %d vCPU(s), %d MiB RAM\n", rt_ncpus, fwcfg_u64(0x03, 8) >> 20);
    u64 r = run_user(user_hello, 41);
    kprintf("back at CPL0, user code returned %d\n", r);
    if (r != 42) return 1;
    kputs("hello: PASS\n");
    return 0;
}
