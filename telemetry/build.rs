//! Records the git commit and the compiler of this build for `clustermesh_build_info`:
//! `unknown` outside a git checkout or without git.

use std::path::Path;
use std::process::Command;

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
}

fn main() {
    let commit =
        output("git", &["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let rustc = output(&rustc, &["--version"])
        .and_then(|v| v.split_whitespace().nth(1).map(str::to_owned))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=CLUSTERMESH_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=CLUSTERMESH_RUSTC_VERSION={rustc}");
    // A new commit reruns this: HEAD moves, or the branch it names does (a loose ref, or
    // packed-refs). Only files that exist are named: Cargo reruns on every build for a
    // missing one.
    println!("cargo:rerun-if-changed=build.rs");
    let (Some(git_dir), Some(common_dir)) = (
        output("git", &["rev-parse", "--absolute-git-dir"]),
        output(
            "git",
            &["rev-parse", "--path-format=absolute", "--git-common-dir"],
        ),
    ) else {
        return;
    };
    let mut watched = vec![
        format!("{git_dir}/HEAD"),
        format!("{common_dir}/packed-refs"),
    ];
    if let Some(head_ref) = output("git", &["symbolic-ref", "-q", "HEAD"]) {
        watched.push(format!("{common_dir}/{head_ref}"));
    }
    for path in watched.iter().filter(|p| Path::new(p).exists()) {
        println!("cargo:rerun-if-changed={path}");
    }
}
