//! Building what a run needs from the command line: the image bytes, the VM
//! configuration and the engine (policies, exceptions, journal). Shared by batch
//! mode, the console, scripts, gdb and bench.

use crate::error::Error;

use vmiscope_introspect::policy;
use vmiscope_introspect::{Engine, Exceptions};
use vmiscope_monitor::{Introspection, OsKnowledge, policy_env};
use vmiscope_vmm::{Module, Vm, VmConfig};

use crate::cli::RunArgs;
use vmiscope_monitor::journal::{JournalFile, RunInfo};

/// Reads a file that must fit in `mem_mib` MiB of guest RAM; a larger one (or an
/// endless one, `/dev/zero`) is refused after reading one byte past the limit,
/// not read whole.
fn read_bounded(path: &std::path::Path, mem_mib: u64) -> std::io::Result<Vec<u8>> {
    let limit = mem_mib.min(vmiscope_vmm::config::MAX_MEM_MIB) << 20;
    let what = format!("the guest's {} MiB of RAM (--mem)", limit >> 20);
    vmiscope_monitor::files::read_bounded(path, limit, &what)
}

/// An exception list larger than this is refused unread (HVMI's whole
/// Windows and Linux list is well under 1 MiB of JSON).
const MAX_EXCEPTIONS: u64 = 16 << 20;

/// The image named `name` (built-in, or a file that fits in `mem_mib` MiB) and
/// the vCPUs it is meant for.
pub fn load_image(name: &str, mem_mib: u64) -> Result<(Vec<u8>, u32), Error> {
    if let Some(i) = vmiscope_images::find(name) {
        return Ok((i.elf.to_vec(), i.vcpus));
    }
    match read_bounded(std::path::Path::new(name), mem_mib) {
        Ok(b) => Ok((b, 1)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err((format!(
            "no built-in image or file named `{name}` (see `vmiscope images`)"
        ))
        .into()),
        Err(e) => Err(format!("cannot read {name}: {e}").into()),
    }
}

/// The address of `symbol` in the built-in image `image` (caps' probes and
/// the benchmarks patch and hook our own images at their link addresses).
pub fn image_symbol(image: &str, symbol: &str) -> Option<u64> {
    let img = vmiscope_images::find(image)?;
    vmiscope_monitor::Symbols::parse(img.elf).get(symbol)
}

pub fn config(a: &RunArgs, default_vcpus: u32) -> Result<VmConfig, Error> {
    let mut modules = Vec::new();
    for m in &a.modules {
        let data = read_bounded(m, a.mem)
            .map_err(|e| format!("cannot read module {}: {e}", m.display()))?;
        modules.push(Module {
            name: m.display().to_string(),
            data,
        });
    }
    let initrd = match &a.initrd {
        Some(p) => Some(
            read_bounded(p, a.mem)
                .map_err(|e| format!("cannot read initrd {}: {e}", p.display()))?,
        ),
        None => None,
    };
    let timeout = match a.timeout {
        Some(t) => Some(
            crate::commands::seconds(t)
                .ok_or("--timeout must be a number of seconds above 0 and at most 1e9")?,
        ),
        None => None,
    };
    Ok(VmConfig {
        vcpus: a.vcpus.unwrap_or(default_vcpus),
        mem_mib: a.mem,
        irqchip: !a.no_irqchip,
        hypercall_quirk: a.hypercall_quirk,
        timeout,
        cmdline: a.cmdline.clone(),
        modules,
        initrd,
        linux_own_decompressor: a.own_decompressor,
        // The process makes one run: every signal since it started ends it.
        signals_seen: Some(0),
        ..VmConfig::default()
    })
}

/// What a journal's header says about this run.
pub fn run_info(a: &RunArgs, shared: &vmiscope_vmm::VmShared) -> RunInfo {
    RunInfo {
        image: a.image.clone(),
        vcpus: shared.vcpu_count(),
        mem_mib: a.mem,
        policies: a
            .protect
            .as_deref()
            .and_then(|l| policy::parse_list(l).ok())
            .unwrap_or_default()
            .iter()
            .map(|p| p.name().to_string())
            .collect(),
        host: shared.host().name().to_string(),
    }
}

/// What the monitor knows of the OS in `image` (its bytes), built in `vm`:
/// the symbols of a `--symbols` map, else of a map beside the kernel, else the
/// kernel's own; a Linux kernel's BTF layout.
pub fn os(a: &RunArgs, image: &[u8], vm: &mut Vm) -> Result<OsKnowledge, Error> {
    use vmiscope_monitor::os::maps;
    let map = match &a.symbols {
        Some(map) => Some(maps::read_map(map)?),
        None => maps::find_map(std::path::Path::new(&a.image)).map(|(p, s)| {
            crate::errln!("[vmiscope] symbols from {}", p.display());
            s
        }),
    };
    let slides = vmiscope_monitor::os::may_slide(a.own_decompressor, image, &a.cmdline);
    let vmlinux = vm.take_vmlinux();
    Ok(OsKnowledge::read(image, vmlinux.as_deref(), map, slides))
}

/// The engine as the options ask for it, for the VM `shared` describes and
/// the OS `os` (its symbols name addresses; a Linux guest's BTF names the
/// current task), and the journal file when `--journal` asks for one (the
/// front end writes its end).
pub fn engine(
    a: &RunArgs,
    shared: &std::sync::Arc<vmiscope_vmm::VmShared>,
    os: OsKnowledge,
) -> Result<(Introspection, Option<JournalFile>), Error> {
    let symbols = os.symbols();
    let mut e = Engine::new();
    if let (Some(Ok(layout)), Some(current)) = (os.linux(), symbols.get("current_task")) {
        e.set_task_namer(vmiscope_introspect::linux::task_namer(*layout, current));
    }
    e.set_log_only(a.log_only);
    let names = symbols.clone();
    e.set_symbolizer(Box::new(move |addr| {
        vmiscope_monitor::journal::symbol_of(&names, addr)
    }));
    if let Some(p) = &a.exceptions {
        let text = vmiscope_monitor::files::read_bounded(p, MAX_EXCEPTIONS, "16 MiB")
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .map_err(|err| format!("cannot read {}: {err}", p.display()))?;
        *e.exceptions_mut() =
            Exceptions::parse(&text).map_err(|err| format!("{}: {err}", p.display()))?;
    }
    let (wanted, named) = match &a.protect {
        Some(list) => {
            let named = list.split(',').filter(|n| n.trim() != "all");
            (
                policy::parse_list(list)?,
                policy::parse_list(&named.collect::<Vec<_>>().join(","))?,
            )
        }
        None => (vec![], vec![]),
    };
    let journal = match &a.journal {
        Some(p) => {
            let j = JournalFile::create(p, &run_info(a, shared), symbols, Some(shared.clone()))
                .map_err(|err| format!("cannot create {}: {err}", p.display()))?;
            e.set_journal(Box::new(j.clone()));
            Some(j)
        }
        None => None,
    };
    let env = policy_env(symbols, a.mem << 20);
    let (policies, warning) = vmiscope_monitor::os::usable_policies(&os, &env, &wanted, &named);
    if let Some(w) = warning {
        crate::errln!("[vmiscope] {w}");
    }
    // Refused before the run: a policy with nothing valid to protect would
    // install nothing and look on silently.
    env.check(&policies)?;
    Ok((Introspection::new(e, policies, env).with_os(os), journal))
}
