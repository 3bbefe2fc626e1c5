/* ept-exec: calls `exec_target`, alone on its page, at CPL0 and CPL3. With the page
 * execute-trapped the VMM sees an execute fault at the function's address. */
#include "rt/rt.h"

__attribute__((section(".page.exec_target"), aligned(4096), noinline, used)) u64 exec_target(u64 x) {
    return x * 2 + 1;
}

static USER u64 user_exec(u64 x) { return exec_target(x); }

int main(void) {
    kprintf("ept-exec: exec_target at %p\n", (u64)exec_target);
    u64 a = exec_target(20);
    kprintf("ept-exec: cpl0 exec_target(20) = %d\n", a);
    u64 b = run_user(user_exec, 30);
    kprintf("ept-exec: cpl3 exec_target(30) = %d\n", b);
    if (a != 41 || b != 61) return 1;
    kputs("ept-exec: done\n");
    return 0;
}
