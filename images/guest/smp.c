/* smp: every vCPU checks in; vCPU 0 waits for the others and reports. */
#include "rt/rt.h"

static volatile int arrived;

void ap_main(int cpu) {
    kprintf("smp: cpu %d up\n", cpu);
    __sync_fetch_and_add(&arrived, 1);
}

int main(void) {
    kprintf("smp: cpu 0 up, %d cpus\n", rt_ncpus);
    if (rt_ncpus < 2) {
        kputs("smp: needs at least 2 vCPUs\n");
        return 1;
    }
    for (u64 spins = 0; arrived < rt_ncpus - 1; spins++) {
        if (spins > 2000000) {
            kprintf("smp: only %d of %d cpus arrived\n", arrived + 1, rt_ncpus);
            return 2;
        }
        cpu_relax();
    }
    kprintf("smp: all %d cpus up\n", rt_ncpus);
    kputs("smp: done\n");
    return 0;
}
