//! Builds the bundled plugins (`plugins/*`) and the test plugins
//! (`tests/plugins/*`) as wasm32-wasip2 components, so a plain `cargo build`
//! or `cargo test` on a fresh clone has everything the binary and its tests
//! need.
//!
//! The bundled components are embedded in the binary (`include_bytes!` in
//! the generated `bundled.rs`); the test ones are only copied next to them,
//! for the integration tests and benches, which find the directory through
//! `RULEHOOK_WASM_DIR`.
//!
//! The plugins are built by a nested `cargo build --target wasm32-wasip2`
//! into `<target>/wasm-plugins`, a target directory of their own: it does
//! not contend for the outer build's lock and stays warm across debug and
//! release builds of the host.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";
const PROFILE: &str = "plugin";

struct Crate {
    /// The directory name: the plugin's name for the host (`select-fields`).
    name: String,
    package: String,
    bundled: bool,
}

fn main() {
    let host = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let root = host
        .parent()
        .expect("host/ sits in the workspace")
        .to_path_buf();
    let out = PathBuf::from(env("OUT_DIR"));
    // The workspace manifest holds the `plugin` profile and the shared
    // dependency versions, so a change there rebuilds the plugins too.
    for dir in [
        "plugins",
        "tests/plugins",
        "plugin-sdk",
        "Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }

    let mut crates = find(&root.join("plugins"), true);
    crates.extend(find(&root.join("tests/plugins"), false));
    ensure_target();

    // OUT_DIR is <target>/<profile>/build/rulehook-<hash>/out.
    let target_dir = out
        .ancestors()
        .nth(4)
        .map(|t| t.join("wasm-plugins"))
        .unwrap_or_else(|| root.join("target/wasm-plugins"));
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(&root)
        .args([
            "build",
            "--profile",
            PROFILE,
            "--target",
            TARGET,
            "--target-dir",
        ])
        .arg(&target_dir)
        .arg("--manifest-path")
        .arg(root.join("Cargo.toml"));
    for c in &crates {
        cmd.args(["-p", &c.package]);
    }
    // The outer build's flags and wrappers are meant for the host target
    // (and `cargo clippy` sets a wrapper that would lint the guests too).
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("run cargo to build the plugins");
    if !status.success() {
        panic!(
            "building the plugins for {TARGET} failed (see the errors above); \
             `cargo build --profile {PROFILE} --target {TARGET} -p <plugin>` reproduces it"
        );
    }

    let built = target_dir.join(TARGET).join(PROFILE);
    let wasm_dir = out.join("wasm");
    std::fs::create_dir_all(&wasm_dir).expect("create OUT_DIR/wasm");
    let mut bundled = String::from(
        "/// Plugins shipped inside the binary: (name, component bytes).\n\
         pub static BUNDLED: &[(&str, &[u8])] = &[\n",
    );
    for c in &crates {
        let file = built.join(format!("{}.wasm", c.package.replace('-', "_")));
        let copy = wasm_dir.join(format!("{}.wasm", c.name));
        std::fs::copy(&file, &copy)
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", file.display(), copy.display()));
        if c.bundled {
            writeln!(
                bundled,
                "    ({:?}, include_bytes!({:?})),",
                c.name,
                copy.display().to_string()
            )
            .unwrap();
        }
    }
    bundled.push_str("];\n");
    std::fs::write(out.join("bundled.rs"), bundled).expect("write bundled.rs");
    println!("cargo:rustc-env=RULEHOOK_WASM_DIR={}", wasm_dir.display());
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("cargo sets {name} for build scripts"))
}

/// The plugin crates directly under `dir`, with their package names.
fn find(dir: &Path, bundled: bool) -> Vec<Crate> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let manifest = entry.path().join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else {
            continue;
        };
        let package = text
            .lines()
            .skip_while(|l| l.trim() != "[package]")
            .find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == "name").then(|| v.trim().trim_matches('"').to_string())
            })
            .unwrap_or_else(|| panic!("{} has no package name", manifest.display()));
        out.push(Crate {
            name: entry.file_name().to_string_lossy().into_owned(),
            package,
            bundled,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Installs the wasm32-wasip2 standard library when it is missing, so a
/// fresh machine needs no manual step.
fn ensure_target() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if let Some(sysroot) = sysroot
        && Path::new(&sysroot)
            .join("lib/rustlib")
            .join(TARGET)
            .exists()
    {
        return;
    }
    let ok = Command::new("rustup")
        .args(["target", "add", TARGET])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        panic!(
            "the {TARGET} target is not installed and `rustup target add {TARGET}` failed; \
             install it and build again"
        );
    }
}
