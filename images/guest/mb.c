/* multiboot: the 64-bit half. Prints what the loader passed (magic, memory, command
 * line, modules, memory map) and what fw_cfg says, then powers off. */
#include "rt/rt.h"

struct mb_info {
    u32 flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr;
    u32 syms[4];
    u32 mmap_length, mmap_addr;
};
struct mb_mod { u32 start, end, string, rsvd; };
struct __attribute__((packed)) mb_mmap { u32 size; u64 base, len; u32 type; };

int main(void) { return 0; } /* unused: this image enters at mb_entry32 */

/* `vmiscope bench` patches the count: a breakpoint on mb_kbp is then hit that
 * often, in kernel code on pages mapped U/S=1 (see mb.S). */
volatile u64 mb_bench_count = 0;
__attribute__((noinline, used)) u64 mb_kbp(u64 x) { return x + 1; }

void mb_main(u32 magic, u32 info_addr) {
    struct mb_info *mi = (struct mb_info *)(u64)info_addr;
    kprintf("multiboot: long mode reached, magic %x (%s)\n", magic, magic == 0x2BADB002 ? "ok" : "BAD");
    if (magic != 0x2BADB002) rt_exit(1);
    kprintf("multiboot: flags %x mem_lower %d KiB mem_upper %d KiB\n", mi->flags, mi->mem_lower, mi->mem_upper);
    if (mi->flags & (1 << 2)) kprintf("multiboot: cmdline '%s'\n", (const char *)(u64)mi->cmdline);
    if (mi->flags & (1 << 3)) {
        kprintf("multiboot: %d module(s)\n", mi->mods_count);
        struct mb_mod *m = (struct mb_mod *)(u64)mi->mods_addr;
        for (u32 i = 0; i < mi->mods_count; i++) {
            char head[33];
            u32 n = m[i].end - m[i].start;
            u32 k = 0;
            for (; k < n && k < 32; k++) {
                char ch = ((const char *)(u64)m[i].start)[k];
                head[k] = (ch >= 32 && ch < 127) ? ch : '.';
            }
            head[k] = 0;
            kprintf("multiboot: module %d at %x, %d bytes, '%s': '%s'\n", i, m[i].start, n,
                    (const char *)(u64)m[i].string, head);
        }
    }
    if (mi->flags & (1 << 6)) {
        for (u32 off = 0; off < mi->mmap_length;) {
            struct mb_mmap *e = (struct mb_mmap *)(u64)(mi->mmap_addr + off);
            kprintf("multiboot: mmap %lx len %lx type %d\n", e->base, e->len, e->type);
            off += e->size + 4;
        }
    }
    u64 sig = fwcfg_u64(0x00, 4);
    kprintf("multiboot: fw_cfg signature %s, %d cpu(s), %d MiB\n", sig == 0x554d4551 ? "QEMU" : "missing",
            fwcfg_u64(0x05, 2), fwcfg_u64(0x03, 8) >> 20);
    if (mb_bench_count) {
        /* An IDT of its own, as a kernel has by then: the host arms its
         * hooks once the guest runs on its own tables (no exception comes). */
        static u64 idt[64] __attribute__((aligned(16)));
        struct __attribute__((packed)) { u16 limit; u64 base; } d = { sizeof(idt) - 1, (u64)idt };
        __asm__ volatile("lidt %0" : : "m"(d));
        kputs("multiboot: bench loop\n");
        u64 s = 0;
        for (u64 i = 0; i < mb_bench_count; i++) s = mb_kbp(s);
        kprintf("multiboot: mb_kbp called %d times\n", s);
    }
    kputs("multiboot: done\n");
    rt_exit(0);
}
