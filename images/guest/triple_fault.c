/* triple-fault (test image): loads an empty IDT and faults. */
#include "rt/rt.h"

int main(void) {
    kputs("triple-fault: loading an empty IDT, then ud2\n");
    struct dtr z = {0, 0};
    lidt_safe(&z);
    __asm__ volatile("ud2");
    return 1;
}
