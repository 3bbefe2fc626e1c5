//! The page executor against a synthetic vCPU (`complete`'s): identity-mapped
//! memory, one unmapped page, one page a hook watches.

use super::*;
use crate::vcpu::complete::tests::{Cpu, TRAPPED};

fn at(cpu: &mut Cpu, bytes: &[u8]) -> bool {
    let rip = cpu.regs.rip as usize;
    cpu.mem[rip..rip + bytes.len()].copy_from_slice(bytes);
    run(cpu, bytes)
}

#[test]
fn the_bench_loop_runs_here_with_its_flags() {
    // spin_hot: add rcx, rax; dec rax; jnz -8 (as the compiler may lay it out).
    let mut c = Cpu::new();
    (c.regs.rax, c.regs.rcx) = (2, 0);
    assert!(at(&mut c, &[0x48, 0x01, 0xc1])); // add rcx, rax
    assert_eq!((c.regs.rcx, c.regs.rip), (2, 0x1003));
    assert!(at(&mut c, &[0x48, 0xff, 0xc8])); // dec rax
    assert_eq!(c.regs.rax, 1);
    assert_eq!(c.regs.rflags & FLAG_ZF, 0);
    assert!(at(&mut c, &[0x75, 0xf8])); // jnz 0x1000
    assert_eq!(c.regs.rip, 0x1000);
    c.regs.rflags |= FLAG_CF;
    c.regs.rip = 0x1003;
    c.regs.rax = 1;
    assert!(at(&mut c, &[0x48, 0xff, 0xc8])); // dec rax -> 0
    assert_ne!(c.regs.rflags & FLAG_ZF, 0);
    assert_ne!(c.regs.rflags & FLAG_CF, 0, "DEC keeps CF");
    assert!(at(&mut c, &[0x75, 0xf8])); // not taken
    assert_eq!(c.regs.rip, 0x1008);
}

#[test]
fn arithmetic_flags_match_the_cpu() {
    // 0x7f + 1 (8-bit): OF, SF, AF; no CF.
    let (r, f) = arith(Mnemonic::Add, 0x7f, 1, 1);
    assert_eq!(r, 0x80);
    assert_eq!(f, FLAG_OF | FLAG_SF | FLAG_AF);
    // 0 - 1 (32-bit): CF, SF, AF, PF (0xff has eight ones).
    let (r, f) = arith(Mnemonic::Sub, 0, 1, 4);
    assert_eq!(r, 0xffff_ffff);
    assert_eq!(f, FLAG_CF | FLAG_SF | FLAG_AF | FLAG_PF);
    // xor eax, eax: ZF and PF only.
    assert_eq!(arith(Mnemonic::Xor, 5, 5, 4), (0, FLAG_ZF | FLAG_PF));
    assert!(condition(FLAG_SF, ConditionCode::l));
    assert!(!condition(FLAG_SF | FLAG_OF, ConditionCode::l));
}

#[test]
fn memory_stack_and_calls() {
    let mut c = Cpu::new();
    c.regs.rsp = 0x3000;
    c.regs.rbx = 0x2000;
    c.regs.rax = 0x1122_3344_5566_7788;
    assert!(at(&mut c, &[0x48, 0x89, 0x03])); // mov [rbx], rax
    assert_eq!(
        &c.mem[0x2000..0x2008],
        &0x1122_3344_5566_7788u64.to_le_bytes()
    );
    assert!(at(&mut c, &[0x8b, 0x0b])); // mov ecx, [rbx]
    assert_eq!(c.regs.rcx, 0x5566_7788, "a 32-bit load zero-extends");
    assert!(at(&mut c, &[0x0f, 0xb6, 0x53, 0x07])); // movzx edx, byte [rbx+7]
    assert_eq!(c.regs.rdx, 0x11);
    let rip = c.regs.rip;
    assert!(at(&mut c, &[0xe8, 0x10, 0x00, 0x00, 0x00])); // call +0x10
    assert_eq!((c.regs.rip, c.regs.rsp), (rip + 5 + 0x10, 0x2ff8));
    assert_eq!(&c.mem[0x2ff8..0x3000], &(rip + 5).to_le_bytes());
    assert!(at(&mut c, &[0xc3])); // ret
    assert_eq!((c.regs.rip, c.regs.rsp), (rip + 5, 0x3000));
    assert!(at(&mut c, &[0x53])); // push rbx
    assert!(at(&mut c, &[0x5e])); // pop rsi
    assert_eq!((c.regs.rsi, c.regs.rsp), (0x2000, 0x3000));
}

#[test]
fn what_a_hook_must_see_or_the_cpu_must_fault_on_is_left_alone() {
    let mut c = Cpu::new();
    c.regs.rbx = TRAPPED;
    let before = c.regs;
    assert!(
        !at(&mut c, &[0x48, 0x89, 0x03]),
        "a write to a watched page"
    );
    assert!(!at(&mut c, &[0x48, 0x8b, 0x03]), "a read of it");
    c.regs.rbx = 0x5000;
    assert!(!at(&mut c, &[0x48, 0x89, 0x03]), "an unmapped page");
    assert!(!at(&mut c, &[0xf0, 0x48, 0x01, 0x03]), "a LOCKed write");
    assert!(!at(&mut c, &[0x0f, 0xa2]), "cpuid: not a common form");
    assert!(
        !at(&mut c, &[0x88, 0xe0]),
        "mov al, ah: a high-byte register"
    );
    assert!(!at(&mut c, &[0x8e, 0xd8]), "mov ds, ax: a segment load");
    assert!(!at(&mut c, &[0x0f, 0x22, 0xd8]), "mov cr3, rax");
    c.regs.rbx = before.rbx;
    assert_eq!(c.regs.rip, before.rip, "nothing moved");
}

#[test]
fn rip_relative_operands_address_from_the_next_instruction() {
    let mut c = Cpu::new();
    c.mem[0x2000..0x2004].copy_from_slice(&0x1234_5678u32.to_le_bytes());
    // mov eax, [rip + 0xffa] at 0x1000 (6 bytes): 0x1006 + 0xffa = 0x2000.
    assert!(at(&mut c, &[0x8b, 0x05, 0xfa, 0x0f, 0x00, 0x00]));
    assert_eq!(c.regs.rax, 0x1234_5678);
}

#[test]
fn a_completed_instruction_clears_the_resume_flag() {
    // RF set (an IRET back to a breakpoint's instruction): once that one
    // completes, the next instruction's code breakpoint must fire again.
    let mut c = Cpu::new();
    c.regs.rflags |= FLAG_RF;
    assert!(at(&mut c, &[0x48, 0xff, 0xc8])); // dec rax
    assert_eq!(c.regs.rflags & FLAG_RF, 0);
    c.regs.rflags |= FLAG_RF;
    c.regs.rflags &= !FLAG_ZF;
    assert!(at(&mut c, &[0x75, 0x10])); // jnz, taken
    assert_eq!(c.regs.rflags & FLAG_RF, 0);
}

#[test]
fn rep_stos_fills_plain_memory_at_once_and_stops_before_a_hooked_page() {
    // rep stosq over 0x2000..0x3000 (two aligned halves), RAX = pattern.
    let mut c = Cpu::new();
    (c.regs.rdi, c.regs.rcx, c.regs.rax) = (0x2000, 0x200, 0x0101_0101_0101_01aa);
    assert!(at(&mut c, &[0xf3, 0x48, 0xab]));
    assert!(
        c.mem[0x2000..0x3000]
            .chunks(8)
            .all(|q| q == 0x0101_0101_0101_01aau64.to_le_bytes())
    );
    assert_eq!((c.regs.rdi, c.regs.rcx, c.regs.rip), (0x3000, 0, 0x1003));
    // rep stosb running into an unmapped page: the mapped part is done, the
    // rest is left (RIP stays on the instruction, which faults again).
    let mut c = Cpu::new();
    (c.regs.rdi, c.regs.rcx, c.regs.rax) = (0x4ff0, 0x20, 0x55);
    assert!(at(&mut c, &[0xf3, 0xaa]));
    assert_eq!((c.regs.rdi, c.regs.rcx, c.regs.rip), (0x5000, 0x10, 0x1000));
    assert!(c.mem[0x4ff0..0x5000].iter().all(|b| *b == 0x55));
    // Downward (DF set), or starting on a page a hook watches: not here.
    let mut c = Cpu::new();
    (c.regs.rdi, c.regs.rcx, c.regs.rflags) = (0x2000, 4, 2 | (1 << 10));
    assert!(!at(&mut c, &[0xf3, 0xaa]));
    let mut c = Cpu::new();
    (c.regs.rdi, c.regs.rcx) = (TRAPPED, 4);
    assert!(!at(&mut c, &[0xf3, 0xaa]));
}
