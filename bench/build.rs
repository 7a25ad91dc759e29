//! Stamps the binary with the commit it was built from: the report must name the code that
//! produced its numbers, which is not the checkout it happens to run in (binaries are carried to
//! GPU machines).

use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!("cargo:rustc-env=BENCH_BUILD_COMMIT={commit}");
    // Rebuild the stamp when HEAD moves (a commit, a checkout). Uncommitted edits are not
    // tracked: stamp release binaries from a clean tree.
    // Only existing paths: for a missing one cargo reruns the script on every build.
    println!("cargo:rerun-if-changed=build.rs");
    for path in ["../.git/HEAD", "../.git/refs/heads", "../.git/packed-refs"] {
        if std::path::Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
