/* vmiscope guest runtime: descriptor tables, traps, syscalls, console, exit. */
#include "rt.h"
#include <stdarg.h>

#define KSTACK_SIZE 16384

struct __attribute__((packed)) tss {
    u32 rsvd0;
    u64 rsp0, rsp1, rsp2, rsvd1, ist[7], rsvd2;
    u16 rsvd3, iomap;
};
/* TSS followed by an all-zero I/O permission bitmap: CPL3 code may use every port
 * (IOPL=3 alone is not enough on a PVM host, which checks the bitmap anyway). */
struct __attribute__((packed)) tss_io {
    struct tss t;
    u8 bitmap[8192];
    u8 end;
};
struct idt_entry {
    u16 off0, sel;
    u8 ist, type;
    u16 off1;
    u32 off2, rsvd;
};

extern u64 isr_table[22];
extern u8 kstacks[], trapstacks[], user_stacks[];
u64 enter_user(u64 rip, u64 rsp, u64 arg, u64 *save);
__attribute__((noreturn)) void resume_kernel(u64 rsp, u64 ret);
void rt_load_tables(struct dtr *gdt, struct dtr *idt, u16 tss_sel);

u64 rt_gdt[5 + 2 * MAX_CPUS] __attribute__((aligned(16)));
static struct tss_io tss[MAX_CPUS] __attribute__((aligned(16)));
static struct idt_entry idt[32] __attribute__((aligned(16)));
static u64 saved_ctx[MAX_CPUS];
static volatile int rt_ready;
static volatile int console_lock;
int rt_ncpus;
volatile u64 rt_bp_count;
void (*rt_bp_hook)(struct frame *f);

struct extable { u64 insn, fixup; };
extern struct extable __ex_table_start[], __ex_table_end[];

/* ---- console (COM1; every byte is one port exit) ---- */
static void lock(void) { while (__sync_lock_test_and_set(&console_lock, 1)) cpu_relax(); }
static void unlock(void) { __sync_lock_release(&console_lock); }
static void putc_raw(char c) { outb(PORT_SERIAL, (u8)c); }
static void puts_raw(const char *s) { while (*s) putc_raw(*s++); }
static void put_num(u64 v, int base, int width, int is_signed) {
    char buf[24];
    int n = 0;
    if (is_signed && (i64)v < 0) { putc_raw('-'); v = -(i64)v; }
    do { u64 d = v % base; buf[n++] = d < 10 ? '0' + d : 'a' + d - 10; v /= base; } while (v);
    while (width-- > n) putc_raw('0');
    while (n) putc_raw(buf[--n]);
}
/* %s %c %d %u %x %lx %ld %lu %016lx %p: a small, integer-only printf. */
static void vprint(const char *f, va_list ap) {
    for (; *f; f++) {
        if (*f != '%') { putc_raw(*f); continue; }
        f++;
        int width = 0;
        while (*f == '0') f++;
        while (*f >= '0' && *f <= '9') width = width * 10 + (*f++ - '0');
        while (*f == 'l') f++;
        switch (*f) {
        case 's': { const char *s = va_arg(ap, const char *); puts_raw(s ? s : "(null)"); break; }
        case 'c': putc_raw((char)va_arg(ap, int)); break;
        case 'd': put_num(va_arg(ap, u64), 10, width, 1); break;
        case 'u': put_num(va_arg(ap, u64), 10, width, 0); break;
        case 'x': put_num(va_arg(ap, u64), 16, width, 0); break;
        case 'p': puts_raw("0x"); put_num(va_arg(ap, u64), 16, width, 0); break;
        case '%': putc_raw('%'); break;
        default: putc_raw('?'); break;
        }
    }
}
void kprintf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    lock();
    vprint(fmt, ap);
    unlock();
    va_end(ap);
}
void kputs(const char *s) { lock(); puts_raw(s); unlock(); }

__attribute__((noreturn)) void rt_exit(int code) {
    if (code == 0)
        outw(PORT_POWEROFF, 0x2000);
    else
        outb(PORT_DEBUG_EXIT, (u8)code);
    for (;;) __asm__ volatile("hlt");
}

int rt_cpu(void) {
    u16 tr;
    __asm__ volatile("str %0" : "=r"(tr));
    return (tr - 0x28) / 16;
}

u64 fwcfg_u64(u16 key, int len) {
    u64 v = 0;
    outw(PORT_FWCFG_SEL, key);
    for (int i = 0; i < len; i++) v |= (u64)inb(PORT_FWCFG_DATA) << (8 * i);
    return v;
}

void rt_idt_desc(struct dtr *d) { d->limit = sizeof(idt) - 1; d->base = (u64)idt; }

/* ---- tables ---- */
static void build_tables(int ncpus) {
    /* Accessed bits preset, as Linux and Windows do: otherwise the CPU writes
     * them at the first load of each selector (IRETQ to user mode, say), and
     * on a write-trapped GDT page that write makes KVM emulate the loading
     * instruction, which it cannot for IRETQ (measured on VMX KVM under Bochs:
     * the demo under every policy ended in an emulation failure). */
    rt_gdt[0] = 0;
    rt_gdt[1] = 0x00af9b000000ffffUL; /* 0x08 kernel code, 64-bit */
    rt_gdt[2] = 0x00cf93000000ffffUL; /* 0x10 kernel data */
    rt_gdt[3] = 0x00cff3000000ffffUL; /* 0x18 user data (0x1b) */
    rt_gdt[4] = 0x00affb000000ffffUL; /* 0x20 user code, 64-bit (0x23) */
    for (int c = 0; c < ncpus; c++) {
        struct tss_io *t = &tss[c];
        u64 base = (u64)t, limit = sizeof(*t) - 1;
        t->t.rsp0 = (u64)trapstacks + (c + 1) * KSTACK_SIZE;
        t->t.iomap = sizeof(struct tss);
        t->end = 0xff;
        rt_gdt[5 + 2 * c] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89UL << 40) |
                            (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
        rt_gdt[6 + 2 * c] = base >> 32;
    }
    for (int v = 0; v < 22; v++) {
        u64 h = isr_table[v];
        idt[v].off0 = h & 0xffff;
        idt[v].sel = 0x08;
        idt[v].ist = 0;
        /* #BP is callable from CPL3 (DPL3), the rest are not. */
        idt[v].type = v == 3 ? 0xee : 0x8e;
        idt[v].off1 = (h >> 16) & 0xffff;
        idt[v].off2 = h >> 32;
        idt[v].rsvd = 0;
    }
}

static void load_tables(int cpu) {
    struct dtr g = {sizeof(rt_gdt) - 1, (u64)rt_gdt}, i;
    rt_idt_desc(&i);
    rt_load_tables(&g, &i, 0x28 + 16 * cpu);
}

__attribute__((weak)) void ap_main(int cpu) { (void)cpu; }

void rt_entry(u64 cpu, u64 ncpus) {
    if (ncpus == 0 || ncpus > MAX_CPUS) ncpus = 1;
    if (cpu == 0) {
        rt_ncpus = (int)ncpus;
        build_tables((int)ncpus);
        rt_ready = 1;
    } else {
        while (!rt_ready) cpu_relax();
    }
    load_tables((int)cpu);
    if (cpu == 0) rt_exit(main());
    ap_main((int)cpu);
    for (;;) __asm__ volatile("hlt");
}

u64 run_user(u64 (*fn)(u64), u64 arg) {
    int c = rt_cpu();
    return enter_user((u64)fn, (u64)user_stacks + (c + 1) * KSTACK_SIZE, arg, &saved_ctx[c]);
}

/* ---- traps ---- */
static void syscall(struct frame *f) {
    f->rip += 2; /* past the ud2 */
    switch (f->rax) {
    case SYS_EXIT_USER: resume_kernel(saved_ctx[rt_cpu()], f->rdi);
    case SYS_PUTS: kputs((const char *)f->rdi); f->rax = 0; break;
    case SYS_PRINTF: kprintf((const char *)f->rdi, f->rsi, f->rdx, f->rcx, f->r8); f->rax = 0; break;
    case SYS_CALL: f->rax = ((u64(*)(u64))f->rdi)(f->rsi); break;
    default: f->rax = (u64)-1; break;
    }
}

void rt_trap(struct frame *f) {
    for (struct extable *e = __ex_table_start; e < __ex_table_end; e++) {
        if (e->insn == f->rip) {
            f->rip = e->fixup;
            f->r11 = f->vector + 1;
            return;
        }
    }
    if (f->vector == 6 && (f->cs & 3) == 3 && *(u16 *)f->rip == 0x0b0f) {
        syscall(f);
        return;
    }
    if (f->vector == 3) {
        rt_bp_count++;
        if (rt_bp_hook)
            rt_bp_hook(f);
        else
            kprintf("guest: #BP at %lx (cpl%d), handled by the guest\n", f->rip - 1, f->cs & 3);
        return;
    }
    u64 cr2;
    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    kprintf("guest: FATAL exception %d error %lx at rip %lx cpl%d cr2 %lx\n", f->vector, f->error, f->rip,
            f->cs & 3, cr2);
    rt_exit(0x7e);
}
