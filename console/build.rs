//! Marks the tests whose tools this machine lacks (`/dev/kvm`, gdb, lldb, tmux, jq,
//! Debian's kernel package unpacked by `.ci/run` under `target/linux`) as ignored, so they show as not run instead of as passed. Under `CI=true`
//! nothing is ignored: a missing tool must fail the tests loudly there.

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

fn main() {
    println!("cargo::rerun-if-env-changed=CI");
    println!("cargo::rerun-if-env-changed=PATH");
    println!("cargo::rerun-if-changed=/dev/kvm");
    let linux = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/linux");
    println!("cargo::rerun-if-changed={}", linux.display());
    let kernel = linux.join("boot").read_dir().is_ok_and(|mut d| {
        d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-")))
    });
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let have = [
        ("no_kvm", std::path::Path::new("/dev/kvm").exists()),
        ("no_gdb", on_path("gdb")),
        ("no_lldb", on_path("lldb")),
        ("no_tmux", on_path("tmux")),
        ("no_jq", on_path("jq")),
        ("no_linux", kernel),
    ];
    for (cfg, present) in have {
        println!("cargo::rustc-check-cfg=cfg({cfg})");
        if !ci && !present {
            println!("cargo::rustc-cfg={cfg}");
        }
    }
}
