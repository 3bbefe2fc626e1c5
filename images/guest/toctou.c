/* toctou (test image, 2 vCPUs): vCPU 0 runs one store instruction many times while
 * vCPU 1 keeps rewriting it, flipping its destination between `scratch` and
 * `guarded`. A VMM that decides on one version of the bytes and applies the effect
 * of another lets writes reach `guarded` unseen. */
#include "rt/rt.h"

PAGE(guarded) volatile u32 guarded[1024] = {0x600d};
PAGE(scratch) volatile u32 scratch[1024];
static volatile int done;
static volatile u64 flips;
volatile u64 toctou_rounds = 20000;

/* victim(a = guarded, b = scratch, v): `mov [rsi], edx` (89 16) <-> `mov [rdi], edx` (89 17) */
__asm__(".text\n.globl victim\nvictim:\n.globl victim_store\nvictim_store:\n mov %edx, (%rsi)\n ret\n");
void victim(volatile u32 *a, volatile u32 *b, u32 v);
extern u8 victim_store[];

void ap_main(int cpu) {
    (void)cpu;
    volatile u8 *modrm = &victim_store[1];
    while (!done) {
        *modrm = (*modrm == 0x16) ? 0x17 : 0x16;
        flips++;
    }
    kprintf("toctou: cpu 1 flipped the store %d times\n", flips);
}

int main(void) {
    if (rt_ncpus < 2) return 1;
    kprintf("toctou: guarded at %p, scratch at %p\n", (u64)guarded, (u64)scratch);
    u64 n = toctou_rounds;
    /* The race needs vCPU 1 flipping while vCPU 0 stores: on a slow host (the
     * nested-SVM rig) vCPU 1 started late and all 20000 rounds ran before it. */
    while (flips < 1000) cpu_relax();
    for (u64 i = 1; i <= n; i++) victim(guarded, scratch, 0xbad00000 | (u32)i);
    done = 1;
    for (volatile u64 i = 0; i < 2000; i++) cpu_relax();
    kprintf("toctou: guarded %x after %d rounds\n", guarded[0], n);
    kputs("toctou: done\n");
    return 0;
}
