/* vmcall (test image): a VMCALL at CPL0, which livelocks a PVM vCPU unless the VMM
 * turned KVM's fix-hypercall quirk off (then the guest gets #UD). */
#include "rt/rt.h"

int main(void) {
    kputs("vmcall: executing vmcall at CPL0\n");
    u64 rax = 0x22;
    __asm__ volatile("vmcall" : "+a"(rax) : "D"(0x18) : "memory");
    kprintf("vmcall: returned, rax %lx\n", rax);
    return 3;
}
