/* multiboot: a multiboot v1 kernel (a.out-kludge header, so any ELF class loads).
 * Entered in 32-bit protected mode with paging off (EAX = 0x2BADB002, EBX = the
 * multiboot information), it switches to long mode itself and calls mb_main. */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS ((1 << 0) | (1 << 1) | (1 << 16))

    .section .multiboot, "ax"
    .code32
    .align 4
mb_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
    .long mb_header
    .long __image_start
    .long __edata
    .long __end
    .long mb_entry32

    .globl mb_entry32
mb_entry32:
    cli
    mov %eax, mb_magic
    mov %ebx, mb_info
    mov $mb_stack_top, %esp
    mov $mb_pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax              /* PAE */
    mov %eax, %cr4
    mov $0xC0000080, %ecx       /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax        /* PG | PE */
    mov %eax, %cr0
    lgdt mb_gdt_desc
    ljmp $0x08, $mb_entry64

    .code64
mb_entry64:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    movabs $mb_stack_top, %rsp
    movl mb_magic, %edi
    movl mb_info, %esi
    call mb_main
1:  hlt
    jmp 1b

    .section .data
    .align 4096
    /* Identity-mapped with U/S=1 everywhere, as many small kernels do: the U/S
     * bit then says nothing about the CPL code runs at (hbreak must still take
     * kernel code). */
mb_pml4:
    .quad mb_pdpt + 0x7
    .fill 511, 8, 0
mb_pdpt:
    .quad mb_pd + 0x7
    .fill 511, 8, 0
mb_pd:
    .set i, 0
    .rept 512
    .quad (i << 21) | 0x87
    .set i, i + 1
    .endr
    .align 16
mb_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
mb_gdt_desc:
    .word 23
    .quad mb_gdt
mb_magic: .long 0
mb_info: .long 0

    .section .bss
    .align 16
    .fill 16384, 1, 0
mb_stack_top:
