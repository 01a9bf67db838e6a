//! Compiles the eBPF C sources with clang (`-target bpf`, BTF-defined maps) into OUT_DIR.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo"));
    let source = manifest.join("c/clustermesh.bpf.c");
    let include = manifest.join("include");
    println!("cargo:rerun-if-changed={}", source.display());
    println!(
        "cargo:rerun-if-changed={}",
        include.join("clustermesh.h").display()
    );
    println!("cargo:rerun-if-env-changed=CLANG");

    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    if Command::new(&clang).arg("--version").output().is_err() {
        fail(&format!(
            "`{clang}` was not found. The eBPF programs are compiled with clang: install the \
             Debian packages `clang` and `llvm` (scripts/deps does)"
        ));
    }
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        fail(
            "the libbpf headers (/usr/include/bpf/bpf_helpers.h) are missing: install the \
             Debian package `libbpf-dev` (scripts/deps does)",
        );
    }
    let arch = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("aarch64") => ("aarch64-linux-gnu", "arm64"),
        _ => ("x86_64-linux-gnu", "x86"),
    };
    let object = out.join("clustermesh.bpf.o");
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg(format!("-D__TARGET_ARCH_{}", arch.1))
        .arg(format!("-I{}", include.display()))
        .arg(format!("-I/usr/include/{}", arch.0))
        .arg("-c")
        .arg(&source)
        .arg("-o")
        .arg(&object)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => fail(&format!(
            "clang failed to compile {} ({s})",
            source.display()
        )),
        Err(e) => fail(&format!("running clang failed: {e}")),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1);
}
