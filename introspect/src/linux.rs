//! Linux awareness from the kernel's own BTF: no profile to generate. The
//! offsets of the few fields `ps` needs are read from the `.BTF` section of the
//! kernel the guest runs, never hard-coded; the task list is then walked in
//! guest memory from `init_task`, every step bounded (the guest may have
//! corrupted it).

use btf_rs::{Btf, Type};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LinuxError {
    #[error("the kernel's BTF cannot be read: {0}")]
    Btf(String),
    #[error("BTF has no {0}")]
    Missing(String),
    #[error("guest memory at {0:#x} cannot be read")]
    Unreadable(u64),
    #[error("the task list does not come back to init_task within {0} tasks")]
    Unterminated(usize),
}

/// Byte offsets of what `ps` reads, from BTF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// `task_struct.tasks` (a `list_head`: `next` first).
    pub tasks: u64,
    pub pid: u64,
    pub comm: u64,
    /// `task_struct.__state` (`state` before 5.14).
    pub state: u64,
    pub mm: u64,
    /// `mm_struct.pgd`.
    pub pgd: u64,
    /// `module.list` and `module.name` (for `lsmod`).
    pub module_list: u64,
    pub module_name: u64,
}

/// Upper bound on the tasks walked (a list that does not close is reported).
pub const MAX_TASKS: usize = 1 << 16;

impl Layout {
    /// The offsets, from the raw `.BTF` section of a vmlinux.
    pub fn from_btf(bytes: &[u8]) -> Result<Layout, LinuxError> {
        let btf = Btf::from_bytes(bytes).map_err(|e| LinuxError::Btf(e.to_string()))?;
        let task = |f: &str| field(&btf, "task_struct", f);
        Ok(Layout {
            tasks: task("tasks")?,
            pid: task("pid")?,
            comm: task("comm")?,
            state: task("__state").or_else(|_| task("state"))?,
            mm: task("mm")?,
            pgd: field(&btf, "mm_struct", "pgd")?,
            module_list: field(&btf, "module", "list")?,
            module_name: field(&btf, "module", "name")?,
        })
    }
}

/// The byte offset of `name` in struct `of`, looking into anonymous struct
/// and union members as C does.
fn field(btf: &Btf, of: &str, name: &str) -> Result<u64, LinuxError> {
    let missing = || LinuxError::Missing(format!("{of}.{name}"));
    let types = btf.resolve_types_by_name(of).map_err(|_| missing())?;
    let s = types
        .iter()
        .find_map(|t| match t {
            Type::Struct(s) if !s.members.is_empty() => Some(s),
            _ => None,
        })
        .ok_or_else(missing)?;
    find_member(btf, &s.members, name, 0).ok_or_else(missing)
}

fn find_member(btf: &Btf, members: &[btf_rs::Member], name: &str, base: u64) -> Option<u64> {
    for m in members {
        let at = base + m.bit_offset() as u64 / 8;
        let n = btf.resolve_name(m).unwrap_or_default();
        if n == name {
            return Some(at);
        }
        if n.is_empty() {
            let inner = match btf.resolve_chained_type(m).ok()? {
                Type::Struct(s) | Type::Union(s) => s.members,
                _ => continue,
            };
            if let Some(off) = find_member(btf, &inner, name, at) {
                return Some(off);
            }
        }
    }
    None
}

/// One task, as `ps` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    /// The `task_struct`'s address.
    pub addr: u64,
    pub pid: i32,
    pub comm: String,
    pub state: u32,
    /// The physical address of its page tables (None: a kernel thread, which
    /// borrows whichever it runs on).
    pub cr3: Option<u64>,
}

impl Task {
    /// The one-letter state `ps` prints.
    pub fn state_letter(&self) -> char {
        match self.state {
            0 => 'R',
            s if s & 0x402 == 0x402 => 'I',
            s if s & 1 != 0 => 'S',
            s if s & 2 != 0 => 'D',
            s if s & 0xc != 0 => 'T',
            _ => '?',
        }
    }
}

impl std::fmt::Display for Task {
    /// `comm[pid]`, as events and alerts name the current task.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{}]", self.comm, self.pid)
    }
}

/// The task a vCPU runs: the per-CPU `current_task` (at `current_task_off`
/// from the vCPU's GS base, which is the per-CPU base while it runs kernel
/// code).
pub fn current(
    layout: &Layout,
    current_task_off: u64,
    gs_base: u64,
    page_offset: u64,
    read: ReadVirt,
) -> Result<Task, LinuxError> {
    let at = gs_base.wrapping_add(current_task_off);
    let mut b = [0u8; 8];
    if !read(at, &mut b) {
        return Err(LinuxError::Unreadable(at));
    }
    let task = u64::from_le_bytes(b);
    let u64_at = |a: u64| {
        let mut b = [0u8; 8];
        read(a, &mut b)
            .then(|| u64::from_le_bytes(b))
            .ok_or(LinuxError::Unreadable(a))
    };
    one(layout, task, page_offset, read, &u64_at)
}

/// Names the task the vCPU being handled runs (`comm[pid]`), for the engine's
/// events and alerts: at CPL0 only, where GS holds the per-CPU base.
pub fn task_namer(layout: Layout, current_task_off: u64) -> crate::engine::TaskNamer {
    Box::new(move |g| {
        let s = g.sregs();
        if s.cpl() != 0 {
            return None;
        }
        let read = |a: u64, buf: &mut [u8]| {
            crate::integrity::read(g, a, buf.len() as u64)
                .map(|v| buf.copy_from_slice(&v))
                .is_some()
        };
        // The comm and pid are all a name needs: no page-table base.
        current(&layout, current_task_off, s.gs_base, 0, &read)
            .ok()
            .map(|t| t.to_string())
    })
}

/// A loaded module: its `struct module`'s address and its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    pub addr: u64,
    pub name: String,
}

/// Every module on the kernel's `modules` list (at `head`), bounded as the
/// task walk is.
pub fn modules(layout: &Layout, head: u64, read: ReadVirt) -> Result<Vec<Module>, LinuxError> {
    let next_of = |a: u64| {
        let mut b = [0u8; 8];
        read(a, &mut b)
            .then(|| u64::from_le_bytes(b))
            .ok_or(LinuxError::Unreadable(a))
    };
    let mut out: Vec<Module> = vec![];
    let mut link = next_of(head)?;
    while link != head {
        let addr = link.wrapping_sub(layout.module_list);
        if out.len() >= MAX_TASKS || out.iter().any(|m| m.addr == addr) {
            return Err(LinuxError::Unterminated(out.len()));
        }
        // MODULE_NAME_LEN is 56 on 64-bit kernels.
        let mut name = [0u8; 56];
        let at = addr.wrapping_add(layout.module_name);
        if !read(at, &mut name) {
            return Err(LinuxError::Unreadable(at));
        }
        let len = name.iter().position(|&c| c == 0).unwrap_or(name.len());
        out.push(Module {
            addr,
            name: String::from_utf8_lossy(&name[..len]).into_owned(),
        });
        link = next_of(link)?;
    }
    Ok(out)
}

/// Reads `buf.len()` bytes of guest-virtual memory at an address.
pub type ReadVirt<'a> = &'a dyn Fn(u64, &mut [u8]) -> bool;

/// Every task on the list that starts at `init_task`; `page_offset` is the
/// start of the kernel's direct map (`page_offset_base`), to turn a `pgd`
/// into CR3.
pub fn tasks(
    layout: &Layout,
    init_task: u64,
    page_offset: u64,
    read: ReadVirt,
) -> Result<Vec<Task>, LinuxError> {
    let u64_at = |a: u64| {
        let mut b = [0u8; 8];
        read(a, &mut b)
            .then(|| u64::from_le_bytes(b))
            .ok_or(LinuxError::Unreadable(a))
    };
    let mut out = vec![];
    let mut task = init_task;
    loop {
        out.push(one(layout, task, page_offset, read, &u64_at)?);
        let next = u64_at(task.wrapping_add(layout.tasks))?;
        task = next.wrapping_sub(layout.tasks);
        if task == init_task {
            return Ok(out);
        }
        if out.len() >= MAX_TASKS || out.iter().any(|t| t.addr == task) {
            return Err(LinuxError::Unterminated(out.len()));
        }
    }
}

fn one(
    l: &Layout,
    task: u64,
    page_offset: u64,
    read: ReadVirt,
    u64_at: &dyn Fn(u64) -> Result<u64, LinuxError>,
) -> Result<Task, LinuxError> {
    let mut word = [0u8; 4];
    let mut comm = [0u8; 16];
    let read_at =
        |a: u64, buf: &mut [u8]| read(a, buf).then_some(()).ok_or(LinuxError::Unreadable(a));
    read_at(task + l.pid, &mut word)?;
    let pid = i32::from_le_bytes(word);
    read_at(task + l.state, &mut word)?;
    let state = u32::from_le_bytes(word);
    read_at(task + l.comm, &mut comm)?;
    let len = comm.iter().position(|&c| c == 0).unwrap_or(comm.len());
    let mm = u64_at(task + l.mm)?;
    let cr3 = match mm {
        0 => None,
        mm => Some(u64_at(mm + l.pgd)?.wrapping_sub(page_offset)),
    };
    Ok(Task {
        addr: task,
        pid,
        comm: String::from_utf8_lossy(&comm[..len]).into_owned(),
        state,
        cr3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const L: Layout = Layout {
        tasks: 0x10,
        pid: 0x20,
        comm: 0x30,
        state: 0x08,
        mm: 0x40,
        pgd: 0x50,
        module_list: 0x8,
        module_name: 0x18,
    };

    struct Mem(HashMap<u64, u8>);

    impl Mem {
        fn put(&mut self, a: u64, bytes: &[u8]) {
            for (i, b) in bytes.iter().enumerate() {
                self.0.insert(a + i as u64, *b);
            }
        }
        fn read(&self, a: u64, buf: &mut [u8]) -> bool {
            for (i, b) in buf.iter_mut().enumerate() {
                match self.0.get(&(a + i as u64)) {
                    Some(v) => *b = *v,
                    None => return false,
                }
            }
            true
        }
    }

    fn task(m: &mut Mem, at: u64, pid: i32, comm: &str, next: u64, mm: u64) {
        m.put(at + L.pid, &pid.to_le_bytes());
        m.put(at + L.state, &1u32.to_le_bytes());
        let mut c = [0u8; 16];
        c[..comm.len()].copy_from_slice(comm.as_bytes());
        m.put(at + L.comm, &c);
        m.put(at + L.tasks, &(next + L.tasks).to_le_bytes());
        m.put(at + L.mm, &mm.to_le_bytes());
    }

    #[test]
    fn the_task_list_is_walked_from_init_task_with_cr3_from_mm() {
        let mut m = Mem(HashMap::new());
        task(&mut m, 0x1000, 0, "swapper/0", 0x2000, 0);
        task(&mut m, 0x2000, 1, "init", 0x1000, 0x9000);
        m.put(0x9000 + L.pgd, &0xffff_8880_0123_4000u64.to_le_bytes());
        let r = |a: u64, b: &mut [u8]| m.read(a, b);
        let t = tasks(&L, 0x1000, 0xffff_8880_0000_0000, &r).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(
            (t[0].pid, t[0].comm.as_str(), t[0].cr3),
            (0, "swapper/0", None)
        );
        assert_eq!((t[1].pid, t[1].cr3), (1, Some(0x123_4000)));
        assert_eq!(t[1].state_letter(), 'S');
    }

    #[test]
    fn a_list_that_loops_elsewhere_or_points_nowhere_is_an_error_not_a_hang() {
        let mut m = Mem(HashMap::new());
        task(&mut m, 0x1000, 0, "swapper/0", 0x2000, 0);
        task(&mut m, 0x2000, 1, "a", 0x3000, 0);
        task(&mut m, 0x3000, 2, "b", 0x2000, 0);
        let r = |a: u64, b: &mut [u8]| m.read(a, b);
        assert_eq!(tasks(&L, 0x1000, 0, &r), Err(LinuxError::Unterminated(3)));
        let mut m = Mem(HashMap::new());
        task(&mut m, 0x1000, 0, "swapper/0", 0x7000, 0);
        let r = |a: u64, b: &mut [u8]| m.read(a, b);
        assert!(matches!(
            tasks(&L, 0x1000, 0, &r),
            Err(LinuxError::Unreadable(_))
        ));
    }

    #[test]
    fn the_current_task_is_found_through_the_per_cpu_base() {
        let mut m = Mem(HashMap::new());
        task(&mut m, 0x1000, 7, "kworker", 0x1000, 0);
        m.put(0x5000 + 0x40, &0x1000u64.to_le_bytes());
        let r = |a: u64, b: &mut [u8]| m.read(a, b);
        let t = current(&L, 0x40, 0x5000, 0, &r).unwrap();
        assert_eq!(t.to_string(), "kworker[7]");
        assert!(current(&L, 0x40, 0x9000, 0, &r).is_err());
    }

    #[test]
    fn modules_are_listed_from_the_list_head_and_an_empty_list_is_empty() {
        let mut m = Mem(HashMap::new());
        // head at 0x100 -> ext4 (0x2000) -> loop (0x3000) -> head
        m.put(0x100, &(0x2000u64 + L.module_list).to_le_bytes());
        m.put(
            0x2000 + L.module_list,
            &(0x3000u64 + L.module_list).to_le_bytes(),
        );
        m.put(0x3000 + L.module_list, &0x100u64.to_le_bytes());
        for (at, name) in [(0x2000u64, "ext4"), (0x3000, "loop")] {
            let mut n = [0u8; 56];
            n[..name.len()].copy_from_slice(name.as_bytes());
            m.put(at + L.module_name, &n);
        }
        let r = |a: u64, b: &mut [u8]| m.read(a, b);
        let names: Vec<String> = modules(&L, 0x100, &r)
            .unwrap()
            .into_iter()
            .map(|x| x.name)
            .collect();
        assert_eq!(names, ["ext4", "loop"]);
        let mut e = Mem(HashMap::new());
        e.put(0x100, &0x100u64.to_le_bytes());
        let r = |a: u64, b: &mut [u8]| e.read(a, b);
        assert_eq!(modules(&L, 0x100, &r), Ok(vec![]));
    }

    #[test]
    fn garbage_btf_is_an_error() {
        assert!(Layout::from_btf(b"not btf").is_err());
    }
}
