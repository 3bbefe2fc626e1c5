//! A kernel's symbols from files: a System.map the user gives or that sits
//! beside the kernel (`System.map-VERSION`, or Debian's debug package tree),
//! else the image itself (ELF symbols or Linux's kallsyms tables).

use std::path::{Path, PathBuf};

use super::kallsyms;
use super::symbols::Symbols;

/// A System.map larger than this is refused unread (Debian's is ~5 MB).
const MAX_MAP: u64 = 256 << 20;

/// Reads a System.map file (at most `MAX_MAP` bytes).
pub fn read_map(path: &Path) -> Result<Symbols, String> {
    let limit = format!("{} MiB, not a System.map", MAX_MAP >> 20);
    let text = crate::files::read_bounded(path, MAX_MAP, &limit)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    kallsyms::parse_system_map(&String::from_utf8_lossy(&text))
        .map(Symbols::from_entries)
        .ok_or_else(|| {
            format!(
                "{}: not a System.map (lines of \"ADDRESS TYPE NAME\"; Debian's placeholder names the -dbg package that has the real one)",
                path.display()
            )
        })
}

/// The System.map files that may belong to the kernel at `kernel`, nearest
/// first: beside it, then in an unpacked Debian debug package beside its
/// `boot/` directory.
fn candidates(kernel: &Path) -> Vec<PathBuf> {
    let dir = kernel.parent().unwrap_or(Path::new("."));
    let name = kernel.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let version = name
        .strip_prefix("vmlinuz-")
        .or_else(|| name.strip_prefix("vmlinux-"));
    let mut out = vec![];
    if let Some(v) = version {
        out.push(dir.join(format!("System.map-{v}")));
        out.push(dir.join(format!("../usr/lib/debug/boot/System.map-{v}")));
    }
    out.push(dir.join("System.map"));
    out
}

/// The first real System.map beside the kernel at `kernel`, if any.
pub fn find_map(kernel: &Path) -> Option<(PathBuf, Symbols)> {
    candidates(kernel)
        .into_iter()
        .filter(|p| p.is_file())
        .find_map(|p| read_map(&p).ok().map(|s| (p, s)))
}

/// The symbols a run of `image` (its bytes) uses: a `--symbols` map, else a
/// map beside the kernel, else the image's own (ELF symbols, or a Linux
/// kernel's kallsyms tables).
pub fn for_image(image: &str, bytes: &[u8], map: Option<&Path>) -> Result<Symbols, String> {
    if let Some(m) = map {
        return read_map(m);
    }
    if let Some((_, s)) = find_map(Path::new(image)) {
        return Ok(s);
    }
    let vmlinux =
        vmiscope_vmm::loader::vmlinux(bytes, 1 << 30).map_err(|e| format!("{image}: {e}"))?;
    Ok(match vmlinux {
        Some(v) => super::linux_symbols(&v),
        None => Symbols::parse(bytes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endless_or_huge_map_is_refused_without_reading_it_all() {
        let e = read_map(Path::new("/dev/zero")).err().unwrap().to_string();
        assert!(e.contains("larger than"), "{e}");
        let e = read_map(Path::new("/nonexistent/map"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("cannot read"), "{e}");
    }

    #[test]
    fn maps_are_looked_for_beside_the_kernel_and_in_the_debug_tree() {
        let c = candidates(Path::new("/x/boot/vmlinuz-6.1.0-57-cloud-amd64"));
        assert_eq!(c[0], Path::new("/x/boot/System.map-6.1.0-57-cloud-amd64"));
        assert_eq!(
            c[1],
            Path::new("/x/boot/../usr/lib/debug/boot/System.map-6.1.0-57-cloud-amd64")
        );
    }
}
