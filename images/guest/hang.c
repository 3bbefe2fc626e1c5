/* hang (test image): a CPL3 loop that never exits to the VMM. */
#include "rt/rt.h"

static USER u64 user_hang(u64 a) {
    for (;;) barrier();
    return a;
}

int main(void) {
    kputs("hang: entering an endless CPL3 loop\n");
    run_user(user_hang, 0);
    return 1;
}
