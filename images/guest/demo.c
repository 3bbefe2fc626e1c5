/* demo: a rootkit-like scenario. Each act is what kernel malware does; after each,
 * the guest prints (which makes exits, so polled checks run) and then checks whether
 * the act took effect. Ends with a summary line; exit 0 when it ran to the end. */
#include "rt/rt.h"

#define MSR_LSTAR 0xc0000082
#define CR4_SMEP (1UL << 20)

typedef u64 (*sys_fn)(u64);
static u64 sys_getpid(u64 a) { (void)a; return 1; }
static u64 sys_evil(u64 a) { (void)a; return 666; }
PAGE(sys_table) sys_fn sys_table[512] = {sys_getpid};
PAGE(user_secret) volatile u64 user_secret[512] = {0x5afe5afe5afe5afeUL};
PAGE(rogue_idt) u8 rogue_idt[4096];

static int succeeded, blocked;
static void report(const char *act, int took_effect) {
    kprintf("demo: act %s: %s\n", act, took_effect ? "succeeded" : "blocked");
    if (took_effect) succeeded++; else blocked++;
}

static USER u64 user_scribble(u64 v) {
    user_secret[0] = v;
    return 0;
}

int main(void) {
    struct dtr idt;
    sidt(&idt);
    u32 a, b, c, d;
    cpuid(7, 0, &a, &b, &c, &d);
    int smep = 0;
    if ((b >> 7) & 1) smep = write_cr4_safe(read_cr4() | CR4_SMEP) == 0;
    kprintf("demo: starting; idt %lx, sys_table %p, user_secret %p, smep %s\n", idt.base, (u64)sys_table,
            (u64)user_secret, smep ? "on" : "unavailable");

    /* 1. IDT entry: point vector 20's handler somewhere else (a memory write). */
    volatile u16 *gate = (volatile u16 *)(idt.base + 20 * 16);
    u16 old_gate = gate[0];
    gate[0] = old_gate ^ 0x1000;
    kputs("demo: patched IDT entry 20\n");
    report("idt-entry", gate[0] != old_gate);

    /* 2. Syscall table hook. */
    sys_table[0] = sys_evil;
    kputs("demo: hooked sys_table[0]\n");
    report("syscall-table", sys_table[0] == sys_evil);

    /* 3. LSTAR rewrite. */
    u64 old_lstar = rdmsr(MSR_LSTAR), evil = 0xffffffff8badc0deUL;
    u64 err = wrmsr_safe(MSR_LSTAR, evil);
    kprintf("demo: wrmsr LSTAR (%s)\n", err ? "#GP" : "ok");
    report("lstar", rdmsr(MSR_LSTAR) == evil && old_lstar != evil);

    /* 4. Disable SMEP (or, where the CPU has none, CR4.PGE: same detection path). */
    u64 bit = smep ? CR4_SMEP : (1UL << 7);
    u64 cr4 = read_cr4();
    write_cr4_safe(cr4 & ~bit);
    kprintf("demo: cleared CR4 bit %lx\n", bit);
    report(smep ? "cr4-smep" : "cr4-pge", (read_cr4() & bit) == 0 && (cr4 & bit));

    /* 5. IDTR reload to a rogue table. */
    for (int i = 0; i <= idt.limit; i++) rogue_idt[i] = ((u8 *)idt.base)[i];
    struct dtr rogue = {idt.limit, (u64)rogue_idt}, now;
    lidt_safe(&rogue);
    kputs("demo: loaded rogue IDTR\n");
    sidt(&now);
    report("idtr", now.base == (u64)rogue_idt);

    /* 6. Write to a protected user page from CPL3. */
    run_user(user_scribble, 0xbad);
    kputs("demo: scribbled on user_secret\n");
    report("user-page", user_secret[0] == 0xbad);

    kprintf("demo: summary: %d succeeded, %d blocked\n", succeeded, blocked);
    return 0;
}
