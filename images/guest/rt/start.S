/* vmiscope guest runtime: entry, page tables, exception stubs, ring switches.
 *
 * Boot protocol (vmiscope's direct ELF64 entry): every vCPU starts at _start in
 * 64-bit mode on the VMM's boot GDT and identity page tables, with
 * RDI = vCPU index and RSI = vCPU count. The runtime switches to its own page
 * tables, GDT, TSS and IDT (built in rt.c) and calls rt_entry(cpu, ncpus).
 *
 * CPL0 code on a PVM host runs in KVM's instruction emulator, so this file uses
 * only plain integer instructions (no int3/int n, no SSE/x87).
 */
#define KSTACK_SIZE 16384
#define MAX_CPUS 4

    .section .text.start, "ax"
    .code64
    .globl _start
_start:
    cli
    movabs $kstacks, %rsp
    mov %rdi, %rax
    inc %rax
    shl $14, %rax
    add %rax, %rsp
    movabs $pml4, %rax
    mov %rax, %cr3
    call rt_entry
1:  hlt
    jmp 1b

/* void rt_load_tables(u64 gdt_desc, u64 idt_desc, u16 tss_sel) */
    .text
    .globl rt_load_tables
rt_load_tables:
    lgdt (%rdi)
    lidt (%rsi)
    pushq $0x08
    movabs $2f, %rax
    push %rax
    lretq
2:  mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    ltr %dx
    ret

/* u64 enter_user(u64 rip, u64 rsp, u64 arg, u64 *save) : runs fn(arg) at CPL3
 * (via user_start) and returns what the user code passed to SYS_EXIT_USER. */
    .globl enter_user
enter_user:
    push %rbx
    push %rbp
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, (%rcx)
    pushq $0x1b            /* ss: user data, RPL3 */
    push %rsi              /* rsp */
    pushq $0x3002          /* rflags: IOPL=3, IF=0 */
    pushq $0x23            /* cs: user code, RPL3 */
    movabs $user_start, %rax
    push %rax
    mov %rdi, %r12         /* fn */
    mov %rdx, %rdi         /* arg */
    xor %eax, %eax
    xor %ebx, %ebx
    xor %ecx, %ecx
    xor %edx, %edx
    xor %ebp, %ebp
    xor %r8d, %r8d
    xor %r9d, %r9d
    xor %r10d, %r10d
    xor %r11d, %r11d
    xor %r13d, %r13d
    xor %r14d, %r14d
    xor %r15d, %r15d
    iretq

/* void resume_kernel(u64 saved_rsp, u64 ret) : abandon the trap stack and
 * return from enter_user with `ret`. */
    .globl resume_kernel
resume_kernel:
    mov %rdi, %rsp
    mov %rsi, %rax
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbp
    pop %rbx
    ret

/* Exception stubs: push a dummy error code where the CPU pushes none, then the
 * vector, then all GPRs; rt_trap(frame) may edit the frame. */
.macro ISR num, has_err
isr\num:
    .if \has_err == 0
    pushq $0
    .endif
    pushq $\num
    jmp isr_common
.endm
    ISR 0,0
    ISR 1,0
    ISR 2,0
    ISR 3,0
    ISR 4,0
    ISR 5,0
    ISR 6,0
    ISR 7,0
    ISR 8,1
    ISR 9,0
    ISR 10,1
    ISR 11,1
    ISR 12,1
    ISR 13,1
    ISR 14,1
    ISR 15,0
    ISR 16,0
    ISR 17,1
    ISR 18,0
    ISR 19,0
    ISR 20,0
    ISR 21,1
isr_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    call rt_trap
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp
    iretq

    .section .rodata
    .globl isr_table
    .align 8
isr_table:
    .quad isr0, isr1, isr2, isr3, isr4, isr5, isr6, isr7, isr8, isr9, isr10
    .quad isr11, isr12, isr13, isr14, isr15, isr16, isr17, isr18, isr19, isr20, isr21

/* CPL3 trampoline: R12 = fn, RDI = arg; fn's return value ends the user run. */
    .section .user.text, "ax"
    .globl user_start
user_start:
    call *%r12
    mov %rax, %rdi
    mov $1, %eax           /* SYS_EXIT_USER */
    ud2

/* Page tables: PML4 -> PDPT -> PD. PD[0] (0..2 MiB, kernel code) is a
 * supervisor 2 MiB page; PD[1] (2..4 MiB) points to a 4 KiB page table of user
 * pages; PD[2..511] are user 2 MiB pages. Identity map of the first 1 GiB. */
    .section .data
    .align 4096
    .globl pml4, pdpt, pd, pt_user
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x7
    .fill 511, 8, 0
pd:
    .quad 0x83
    .quad pt_user + 0x7
    .set i, 2
    .rept 510
    .quad (i << 21) | 0x87
    .set i, i + 1
    .endr
pt_user:
    .set i, 0
    .rept 512
    .quad 0x200000 + (i << 12) | 0x7
    .set i, i + 1
    .endr

    .section .bss
    .align 4096
    .globl kstacks, trapstacks
kstacks:
    .fill KSTACK_SIZE * MAX_CPUS, 1, 0
trapstacks:
    .fill KSTACK_SIZE * MAX_CPUS, 1, 0
    .globl user_stacks
user_stacks:
    .fill KSTACK_SIZE * MAX_CPUS, 1, 0
