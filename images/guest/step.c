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

/* endbr64 (a NOP to a CPU without CET) and what follows: a single step from
 * step_endbr must stop at step_after_endbr, one instruction on. */
__attribute__((noinline, used)) u64 step_endbr_region(void) {
    u64 r;
    __asm__ volatile(".globl step_endbr\nstep_endbr:\n"
                     "endbr64\n"
                     ".globl step_after_endbr\nstep_after_endbr:\n"
                     "mov $5, %%eax\n"
                     ".globl step_after_mov\nstep_after_mov:\n"
                     "add $1, %%eax\n"
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
    if (step_endbr_region() != 6) return 1;
    kputs("step: done\n");
    return 0;
}
