/* step: a labelled run of CPL0 instructions for single-step tests:
 * step_start -> (2 instructions) -> step_mid -> (2 instructions) -> step_end;
 * then at CPL3 `user_step_pushf`: PUSHFQ; POP, reporting whether the flags it
 * pushed had TF set (a debugger's single-step must not leak into them). */
#include "rt/rt.h"

__attribute__((noinline, used)) u64 step_region(void) {
    u64 r;
    __asm__ volatile(".globl step_start\nstep_start:\n"
                     "mov $1, %%eax\n"
                     "add $2, %%eax\n"
                     ".globl step_mid\nstep_mid:\n"
                     "imul $3, %%eax, %%eax\n"
                     "add $4, %%eax\n"
                     ".globl step_end\nstep_end:\n"
                     "nop\n"
                     : "=a"(r));
    return r;
}

static USER u64 user_pushf(u64 arg) {
    u64 flags;
    __asm__ volatile(".globl user_step_pushf\nuser_step_pushf:\n"
                     "pushfq\n"
                     "pop %0\n"
                     : "=r"(flags));
    uprintf1("step: user pushf TF %d\n", (flags >> 8) & 1);
    return arg;
}

int main(void) {
    run_user(user_pushf, 0);
    u64 r = step_region();
    kprintf("step: region result %d\n", r);
    if (r != 13) return 1;
    kputs("step: done\n");
    return 0;
}
