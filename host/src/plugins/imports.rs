//! Refusing a component whose imports the host does not provide, before
//! compiling it.
//!
//! Compiling a big component (an 18 MB Python or 12 MB JavaScript build)
//! takes seconds to tens of seconds, and wasmtime only checks imports
//! against the linker afterwards; reading the import section is a
//! millisecond. So the bytes are parsed first (`wasmparser`, which wasmtime
//! already uses) and an unknown interface is reported by name, with the
//! build change that drops it.

use wasmparser::{ComponentTypeRef, Encoding, Parser, Payload};

/// Interfaces the host links, by package, and the version range: WASI 0.2
/// (wasmtime-wasi's p2; any 0.2.x import is matched to it by semver),
/// sockets as traps (see `sandbox`), and the plugin interface. Not
/// `wasi:http`: its types share `wasi:io`'s stream resources, so stubs of
/// our own do not link, and a component importing it is refused here (see
/// [`HTTP_HINT`]).
const PROVIDED: &[(&str, &str, &[&str])] = &[
    (
        "wasi:cli",
        "0.2",
        &[
            "environment",
            "exit",
            "stdin",
            "stdout",
            "stderr",
            "terminal-input",
            "terminal-output",
            "terminal-stdin",
            "terminal-stdout",
            "terminal-stderr",
        ],
    ),
    ("wasi:clocks", "0.2", &["monotonic-clock", "wall-clock"]),
    ("wasi:io", "0.2", &["error", "poll", "streams"]),
    (
        "wasi:random",
        "0.2",
        &["random", "insecure", "insecure-seed"],
    ),
    ("wasi:filesystem", "0.2", &["types", "preopens"]),
    (
        "wasi:sockets",
        "0.2",
        &[
            "network",
            "instance-network",
            "ip-name-lookup",
            "tcp",
            "tcp-create-socket",
            "udp",
            "udp-create-socket",
        ],
    ),
    ("rulehook:plugin", "0.1", &["host", "types"]),
];

/// Why a component cannot be loaded, found before compiling it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    #[error(
        "plugin {plugin} is a core WebAssembly module, not a component; build it for wasm32-wasip2 (cargo build --target wasm32-wasip2), or wrap it with `wasm-tools component new`"
    )]
    CoreModule { plugin: String },
    #[error("plugin {plugin} is not a valid component: {reason}")]
    Malformed { plugin: String, reason: String },
    #[error("plugin {plugin} imports {import}, which the host does not provide ({hint})")]
    Unknown {
        plugin: String,
        import: String,
        hint: String,
    },
}

/// Checks every top-level import of `bytes` against what the host links.
pub fn check(plugin: &str, bytes: &[u8]) -> Result<(), ImportError> {
    let malformed = |e: wasmparser::BinaryReaderError| ImportError::Malformed {
        plugin: plugin.to_string(),
        reason: e.to_string(),
    };
    // Nested modules and components have imports of their own, satisfied
    // inside the component; only depth 1 (the outer component) counts.
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.map_err(malformed)? {
            Payload::Version { encoding, .. } => {
                if depth == 0 && encoding == Encoding::Module {
                    return Err(ImportError::CoreModule {
                        plugin: plugin.to_string(),
                    });
                }
                depth += 1;
            }
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(reader) if depth == 1 => {
                for import in reader {
                    let import = import.map_err(malformed)?;
                    // A type a world `use`s (`context`, `outcome`) is
                    // imported by name but needs no definition.
                    if matches!(import.ty, ComponentTypeRef::Type(_)) {
                        continue;
                    }
                    let name = import.name.name;
                    if let Some(hint) = unprovided(name) {
                        return Err(ImportError::Unknown {
                            plugin: plugin.to_string(),
                            import: name.to_string(),
                            hint,
                        });
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Why `wasi:http` is refused and how to build without it. StarlingMonkey
/// (componentize-js) imports it by default for `fetch`, and its flags are
/// the fix most integrators need; `--disable http` alone keeps
/// `wasi:http/types` for the fetch event.
const HTTP_HINT: &str = "plugins have no network access; JavaScript built with componentize-js imports it unless built with `--disable http fetch-event` (or build with componentize-qjs --sync, which never imports it); otherwise drop the dependency that makes HTTP requests";

/// `None` when the host provides `import`; else what to change in the build.
fn unprovided(import: &str) -> Option<String> {
    let (path, version) = import.split_once('@').unwrap_or((import, ""));
    let (package, interface) = path.split_once('/').unwrap_or((path, ""));
    if package == "wasi:http" {
        return Some(HTTP_HINT.to_string());
    }
    let known = PROVIDED.iter().find(|(p, _, _)| *p == package);
    let Some((_, series, interfaces)) = known else {
        return Some(match package.split_once(':') {
            Some(("wasi", _)) => format!(
                "it offers only {}; for JavaScript built with componentize-js, `--disable` followed by the features (`stdio random clocks http fetch-event`) leaves out optional WASI interfaces; otherwise drop the dependency that needs {package}",
                offered()
            ),
            _ => format!(
                "it offers only {}; a plugin's world is rulehook:plugin/transform (plugin-sdk/wit), so build against that WIT",
                offered()
            ),
        });
    };
    let in_series = version == *series || version.starts_with(&format!("{series}."));
    if !in_series {
        return Some(match package {
            "rulehook:plugin" => format!(
                "it speaks rulehook:plugin@{series}.x; rebuild the plugin against the WIT in this rulehook's plugin-sdk/wit"
            ),
            _ => format!(
                "it speaks {package}@{series}.x (WASI preview 2); build for wasm32-wasip2 / WASI 0.2"
            ),
        });
    }
    if interfaces.contains(&"*") || interfaces.contains(&interface) {
        return None;
    }
    Some(format!(
        "{package}@{series} here has {}; build against WASI 0.2 as wasmtime 48 defines it",
        interfaces.join(", ")
    ))
}

fn offered() -> String {
    let names: Vec<String> = PROVIDED
        .iter()
        .map(|(p, v, _)| format!("{p}@{v}"))
        .collect();
    names.join(", ")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use wasm_encoder::{
        Component, ComponentImportSection, ComponentTypeRef, ComponentTypeSection, InstanceType,
    };

    /// A component that only imports `name`, an instance with one function
    /// `call: func()`: hand-made, so a test needs no toolchain.
    pub(crate) fn importing(name: &str) -> Vec<u8> {
        let mut instance = InstanceType::new();
        let no_params: [(&str, wasm_encoder::ComponentValType); 0] = [];
        instance.ty().function().params(no_params).result(None);
        instance.export("call", ComponentTypeRef::Func(0));
        let mut types = ComponentTypeSection::new();
        types.instance(&instance);
        let mut imports = ComponentImportSection::new();
        imports.import(name, ComponentTypeRef::Instance(0));
        let mut component = Component::new();
        component.section(&types).section(&imports);
        component.finish()
    }

    #[test]
    fn provided_interfaces_pass_at_any_compatible_version() {
        for name in [
            "wasi:cli/environment@0.2.0",
            "wasi:io/streams@0.2.12",
            "wasi:sockets/tcp@0.2.0",
            "rulehook:plugin/host@0.1.0",
        ] {
            assert_eq!(check("p", &importing(name)), Ok(()), "{name}");
        }
    }

    #[test]
    fn every_bundled_and_test_plugin_passes() {
        // Real components also import the types their world `use`s.
        let dir = std::path::Path::new(env!("RULEHOOK_WASM_DIR"));
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let bytes = std::fs::read(entry.path()).unwrap();
            assert_eq!(check("p", &bytes), Ok(()), "{}", entry.path().display());
            seen += 1;
        }
        assert!(seen >= 10, "only {seen} components in {}", dir.display());
    }

    #[test]
    fn an_unknown_interface_is_named_with_the_build_change() {
        let err = check("kv", &importing("wasi:keyvalue/store@0.2.0-draft")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(
                "plugin kv imports wasi:keyvalue/store@0.2.0-draft, which the host does not provide"
            ),
            "{text}"
        );
        assert!(text.contains("--disable"), "{text}");
        for http in ["wasi:http/types@0.2.10", "wasi:http/outgoing-handler@0.2.0"] {
            let err = check("sm", &importing(http)).unwrap_err().to_string();
            assert!(
                err.contains(&format!("imports {http}, which the host does not provide (plugins have no network access"))
                    && err.contains("--disable http fetch-event"),
                "{err}"
            );
        }
        let err = check("old", &importing("rulehook:plugin/host@0.2.0")).unwrap_err();
        assert!(
            err.to_string()
                .contains("rebuild the plugin against the WIT"),
            "{err}"
        );
        let err = check("p3", &importing("wasi:clocks/monotonic-clock@0.3.0")).unwrap_err();
        assert!(err.to_string().contains("wasm32-wasip2"), "{err}");
        let err = check("own", &importing("acme:tools/thing")).unwrap_err();
        assert!(
            err.to_string().contains("rulehook:plugin/transform"),
            "{err}"
        );
    }

    #[test]
    fn core_modules_and_garbage_are_refused_by_kind() {
        let module = wasm_encoder::Module::new().finish();
        assert_eq!(
            check("m", &module),
            Err(ImportError::CoreModule { plugin: "m".into() })
        );
        assert!(matches!(
            check("g", b"not wasm at all"),
            Err(ImportError::Malformed { .. })
        ));
    }
}
