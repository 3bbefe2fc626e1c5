/* vmiscope guest runtime: what every image's C code may use. */
#pragma once
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;

#define MAX_CPUS 4
#define USER __attribute__((section(".user.text"), noinline, used))
#define UINLINE static inline __attribute__((always_inline))
#define PAGE(name) __attribute__((section(".page." #name), aligned(4096), used))

/* Ports of the vmiscope PC (see vmm/src/devices). */
#define PORT_SERIAL 0x3f8
#define PORT_DEBUG_EXIT 0xf4   /* QEMU isa-debug-exit: status (v << 1) | 1 */
#define PORT_POWEROFF 0x604    /* write 0x2000: power off, status 0 */
#define PORT_FWCFG_SEL 0x510
#define PORT_FWCFG_DATA 0x511
#define INTROCALL_PORT 0x9a    /* doorbell: `out 0x9a, al` with RAX = INTROCALL_MAGIC */
#define INTROCALL_MAGIC 0x22

struct frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vector, error, rip, cs, rflags, rsp, ss;
};

UINLINE void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
UINLINE void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(port)); }
UINLINE void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
UINLINE u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
UINLINE u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
UINLINE void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
UINLINE void barrier(void) { __asm__ volatile("" ::: "memory"); }

UINLINE u64 rdmsr(u32 msr) {
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}
UINLINE void wrmsr(u32 msr, u64 v) {
    __asm__ volatile("wrmsr" ::"c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}
/* The *_safe helpers return 0, or 1 + the vector of the exception the instruction raised
 * (the trap handler finds the instruction in __ex_table and resumes after it). */
#define EXTABLE "\n.pushsection __ex_table, \"a\"\n.quad 1b, 2b\n.popsection\n"
UINLINE u64 wrmsr_safe(u32 msr, u64 v) {
    register u64 err __asm__("r11") = 0;
    __asm__ volatile("1: wrmsr\n2:" EXTABLE : "+r"(err) : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
    return err;
}
UINLINE u64 rdmsr_safe(u32 msr, u64 *out) {
    register u64 err __asm__("r11") = 0;
    u32 lo = 0, hi = 0;
    __asm__ volatile("1: rdmsr\n2:" EXTABLE : "+r"(err), "+a"(lo), "+d"(hi) : "c"(msr) : "memory");
    *out = ((u64)hi << 32) | lo;
    return err;
}
#define DEF_CR(n) \
    UINLINE u64 read_cr##n(void) { u64 v; __asm__ volatile("mov %%cr" #n ", %0" : "=r"(v)); return v; } \
    UINLINE u64 write_cr##n##_safe(u64 v) { \
        register u64 err __asm__("r11") = 0; \
        __asm__ volatile("1: mov %1, %%cr" #n "\n2:" EXTABLE : "+r"(err) : "r"(v) : "memory"); \
        return err; }
DEF_CR(0)
DEF_CR(3)
DEF_CR(4)
struct __attribute__((packed)) dtr { u16 limit; u64 base; };
UINLINE void sidt(struct dtr *d) { __asm__ volatile("sidt %0" : "=m"(*d)); }
UINLINE void sgdt(struct dtr *d) { __asm__ volatile("sgdt %0" : "=m"(*d)); }
UINLINE u64 lidt_safe(const struct dtr *d) {
    register u64 err __asm__("r11") = 0;
    __asm__ volatile("1: lidt %1\n2:" EXTABLE : "+r"(err) : "m"(*d) : "memory");
    return err;
}
UINLINE u64 lgdt_safe(const struct dtr *d) {
    register u64 err __asm__("r11") = 0;
    __asm__ volatile("1: lgdt %1\n2:" EXTABLE : "+r"(err) : "m"(*d) : "memory");
    return err;
}
UINLINE u64 xgetbv(u32 idx) {
    u32 lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(idx));
    return ((u64)hi << 32) | lo;
}
UINLINE u64 xgetbv_safe(u32 idx, u64 *out) {
    register u64 err __asm__("r11") = 0;
    u32 lo = 0, hi = 0;
    __asm__ volatile("1: xgetbv\n2:" EXTABLE : "+r"(err), "+a"(lo), "+d"(hi) : "c"(idx) : "memory");
    *out = ((u64)hi << 32) | lo;
    return err;
}
UINLINE u64 xsetbv_safe(u32 idx, u64 v) {
    register u64 err __asm__("r11") = 0;
    __asm__ volatile("1: xsetbv\n2:" EXTABLE : "+r"(err) : "c"(idx), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
    return err;
}
UINLINE void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d) {
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

/* Introcall doorbell (vmiscope's stand-in for HVMI's VMCALL, which livelocks a PVM
 * vCPU): RAX = magic, RDI = sub-op, RSI/RDX/RBX = arguments. On return RAX = status
 * (0 = handled, -1 = nobody handled it) and RBX = result. Works at CPL0 and CPL3. */
UINLINE u64 introcall(u64 op, u64 a, u64 b, u64 c, u64 *result) {
    u64 rax = INTROCALL_MAGIC, rbx = c;
    __asm__ volatile("outb %%al, %2" : "+a"(rax), "+b"(rbx) : "i"(INTROCALL_PORT), "D"(op), "S"(a), "d"(b) : "memory");
    *result = rbx;
    return rax;
}

/* Syscalls from CPL3: RAX = number, args in RDI, RSI, RDX, RCX, R8, then `ud2`: the #UD
 * is the way into CPL0 on a PVM host (`syscall` stays at CPL3, `int n` arrives as #UD). */
enum { SYS_EXIT_USER = 1, SYS_PUTS = 2, SYS_PRINTF = 3, SYS_CALL = 4 };
UINLINE u64 usys(u64 nr, u64 a, u64 b, u64 c, u64 d, u64 e) {
    register u64 r8 __asm__("r8") = e;
    __asm__ volatile("ud2" : "+a"(nr) : "D"(a), "S"(b), "d"(c), "c"(d), "r"(r8) : "memory");
    return nr;
}
#define uprintf0(f) usys(SYS_PRINTF, (u64)(f), 0, 0, 0, 0)
#define uprintf1(f, a) usys(SYS_PRINTF, (u64)(f), (u64)(a), 0, 0, 0)
#define uprintf2(f, a, b) usys(SYS_PRINTF, (u64)(f), (u64)(a), (u64)(b), 0, 0)
#define uprintf3(f, a, b, c) usys(SYS_PRINTF, (u64)(f), (u64)(a), (u64)(b), (u64)(c), 0)
/* Runs a kernel function fn(arg) on behalf of user code (a test convenience). */
#define ucall(fn, arg) usys(SYS_CALL, (u64)(fn), (u64)(arg), 0, 0, 0)

/* Kernel services. */
void kprintf(const char *fmt, ...);
void kputs(const char *s);
__attribute__((noreturn)) void rt_exit(int code);
u64 run_user(u64 (*fn)(u64), u64 arg);
int rt_cpu(void);
extern int rt_ncpus;
extern volatile u64 rt_bp_count;
extern void (*rt_bp_hook)(struct frame *f);
u64 fwcfg_u64(u16 key, int len);
void rt_idt_desc(struct dtr *d);
extern u64 rt_gdt[];

/* Provided by each image. */
int main(void);
void ap_main(int cpu);
