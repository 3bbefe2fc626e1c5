/* dtr: loads a copy of the IDT and of the GDT (LIDT/LGDT) and back, at CPL0. */
#include "rt/rt.h"

PAGE(idt_copy) u8 idt_copy[4096];
PAGE(gdt_copy) u8 gdt_copy[4096];

static void copy(u8 *dst, const u8 *src, u64 n) {
    for (u64 i = 0; i < n; i++) dst[i] = src[i];
}

int main(void) {
    struct dtr idt, gdt, n, now;
    sidt(&idt);
    sgdt(&gdt);
    kprintf("dtr: idtr %lx/%x gdtr %lx/%x\n", idt.base, idt.limit, gdt.base, gdt.limit);
    copy(idt_copy, (const u8 *)idt.base, idt.limit + 1);
    n.base = (u64)idt_copy;
    n.limit = idt.limit;
    u64 e = lidt_safe(&n);
    sidt(&now);
    kprintf("dtr: lidt %lx (%s), idtr now %lx\n", n.base, e ? "fault" : "ok", now.base);
    sidt(&now);
    kprintf("dtr: idtr after an exit %lx\n", now.base);
    copy(gdt_copy, (const u8 *)gdt.base, gdt.limit + 1);
    n.base = (u64)gdt_copy;
    n.limit = gdt.limit;
    e = lgdt_safe(&n);
    sgdt(&now);
    kprintf("dtr: lgdt %lx (%s), gdtr now %lx\n", n.base, e ? "fault" : "ok", now.base);
    lidt_safe(&idt);
    lgdt_safe(&gdt);
    sidt(&now);
    kprintf("dtr: restored, idtr now %lx\n", now.base);
    kputs("dtr: done\n");
    return 0;
}
