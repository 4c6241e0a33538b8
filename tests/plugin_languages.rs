//! Plugins in JavaScript, TypeScript and Python, built from the templates
//! `rulehook plugin new --lang js|ts|python` writes, with the real pinned
//! toolchains (`plugin-sdk/toolchains/`, installed by `.ci/run` into
//! `target/plugin-toolchains/`), and run through the real binary: `plugin
//! run` and a server delivering to a receiver.
//!
//! Besides each template as generated, a probe (the template's project with
//! its source replaced) reads the clocks and random numbers and can throw or
//! spin on request, to show what the sandbox gives an interpreter.
//!
//! Built components are kept in `target/plugin-language-builds/HASH/`,
//! HASH being that of the project's files and the toolchain pins, so a run rebuilds only what changed; the
//! host's compile cache is the tests' shared one (`support::plugin_cache`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::support::receiver::{Answer, Receiver};
use crate::support::server::{Server, setup};
use crate::support::{TempDir, repo, rulehook, stdout, wait_for};

/// Waiting for the server: its start compiles the components unless the
/// cache has them (an 18 MB Python component takes tens of seconds here).
const T: Duration = Duration::from_secs(300);
/// A toolchain command (a build, the template's native tests).
const TOOL_BOUND: Duration = Duration::from_secs(600);

/// 2020-01-01T00:00:00Z, the wall clock every plugin sees.
const FIXED_MS: i64 = 1_577_836_800_000;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Lang {
    Js,
    Ts,
    Python,
}

impl Lang {
    fn flag(self) -> &'static str {
        match self {
            Lang::Js => "js",
            Lang::Ts => "ts",
            Lang::Python => "python",
        }
    }

    /// The directory whose programs the build finds first on its PATH.
    fn toolchain_bin(self) -> PathBuf {
        install_toolchains();
        let root = repo().join("target/plugin-toolchains");
        let (bin, tool) = match self {
            Lang::Js | Lang::Ts => (root.join("js/node_modules/.bin"), "componentize-qjs"),
            Lang::Python => (root.join("python/bin"), "componentize-py"),
        };
        assert!(
            bin.join(tool).exists(),
            "{tool} is not installed in {}: the {self:?} plugin tests build with the pinned \
             toolchains; install them with `bash plugin-sdk/toolchains/install.sh` (.ci/run \
             does; it needs node and npm, python3 with venv, and the npm and PyPI registries)",
            bin.display()
        );
        bin
    }
}

/// Runs `plugin-sdk/toolchains/install.sh` once per test run, so `cargo test
/// --workspace` works on a machine where `.ci/run` never ran: it installs the
/// pinned versions when they are missing or changed and is a no-op (a stamp
/// check) otherwise. A failure is left to [`Lang::toolchain_bin`]'s assert,
/// which says what is needed.
fn install_toolchains() {
    static ONCE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let status = Command::new("bash")
            .arg(repo().join("plugin-sdk/toolchains/install.sh"))
            .stdin(Stdio::null())
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("plugin-sdk/toolchains/install.sh failed ({status:?})");
        }
    });
}

/// Runs `program args` in `dir` with the toolchain first on PATH, within
/// [`TOOL_BOUND`], and panics with its output if it fails.
fn tool(lang: Lang, dir: &Path, program: &str, args: &[&str]) -> String {
    let path = std::env::join_paths(std::iter::once(lang.toolchain_bin()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .expect("PATH entries join");
    let out_file = dir.join(".tool-output");
    let log = std::fs::File::create(&out_file).expect("create the output file");
    let mut child = Command::new(program)
        .args(args)
        .current_dir(dir)
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone the file"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("{program} does not start ({e}); is it installed?"));
    let deadline = Instant::now() + TOOL_BOUND;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the tool") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{program} {args:?} did not finish within {TOOL_BOUND:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = std::fs::read_to_string(&out_file).unwrap_or_default();
    let _ = std::fs::remove_file(&out_file);
    assert!(
        status.success(),
        "{program} {args:?} in {} failed ({status}):\n{output}",
        dir.display()
    );
    output
}

/// A project from `rulehook plugin new NAME --lang L`, with `replace`
/// (path, text) written over its files.
fn project(dir: &TempDir, name: &str, lang: Lang, replace: &[(&str, &str)]) -> PathBuf {
    let out = rulehook(&[
        "plugin",
        "new",
        name,
        "--lang",
        lang.flag(),
        "--dir",
        dir.path().to_str().expect("utf-8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let root = dir.path().join(name);
    for (path, text) in replace {
        std::fs::write(root.join(path), text).expect("write the replaced file");
    }
    root
}

/// The files of a project, by relative path (for the build cache key).
fn files(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read the project") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path
                    .strip_prefix(root)
                    .expect("inside")
                    .display()
                    .to_string();
                out.insert(rel, std::fs::read(&path).expect("read a project file"));
            }
        }
    }
    out
}

/// One build at a time: two at once would only share the two cores, and two
/// tests asking for the same component wait for the first build of it.
static BUILDING: Mutex<()> = Mutex::new(());

/// Builds the project at `root` with the template's own build command and
/// returns the component, from `target/plugin-language-builds/` when the
/// same files (and toolchain pins) were built before.
fn build(root: &Path, name: &str, lang: Lang) -> PathBuf {
    build_with(root, name, lang, None)
}

/// [`build`] with `command` (program, arguments) instead of the template's
/// own build command; it must write `NAME.wasm` in the project.
fn build_with(root: &Path, name: &str, lang: Lang, command: Option<(&str, &[&str])>) -> PathBuf {
    let mut hash = Sha256::new();
    if let Some((program, args)) = command {
        hash.update(format!("{program} {args:?}").as_bytes());
    }
    for pins in ["package-lock.json", "requirements.txt"] {
        hash.update(
            std::fs::read(repo().join("plugin-sdk/toolchains").join(pins)).expect("pin file"),
        );
    }
    for (path, bytes) in files(root) {
        hash.update(path.as_bytes());
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(&bytes);
    }
    let key: String = hash.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // NAME.wasm in a directory per key: the host names a plugin after its
    // file, and the messages the tests expect name the plugin.
    let cache = repo().join("target/plugin-language-builds").join(&key);
    let cached = cache.join(format!("{name}.wasm"));
    let _one = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    if cached.exists() {
        return cached;
    }
    match (command, lang) {
        (Some((program, args)), _) => tool(lang, root, program, args),
        (None, Lang::Js | Lang::Ts) => tool(lang, root, "npm", &["run", "build"]),
        (None, Lang::Python) => tool(lang, root, "./build.sh", &[]),
    };
    std::fs::create_dir_all(&cache).expect("create the build cache");
    // Copied under another name and renamed, so an interrupted copy is
    // never taken for a build.
    let part = cache.join(format!("{name}.wasm.part"));
    std::fs::copy(root.join(format!("{name}.wasm")), &part).expect("the build wrote NAME.wasm");
    std::fs::rename(&part, &cached).expect("rename into the cache");
    cached
}

fn event(id: &str, event_type: &str) -> Value {
    json!({"id": id, "event_type": event_type, "entity_type": "story",
        "scope": {"sharedspace_id": 1001, "workspace_id": 1002},
        "user": {"id": "1001", "email": "admin@example.com"},
        "entity": {"id": "77", "name": "Checkout page", "story_points": 5}})
}

/// `rulehook plugin run` as JSON, with `rule` as the rule name.
fn plugin_run(plugin: &Path, event: &Value, config: &Value, rule: &str) -> Value {
    plugin_run_with(plugin, event, config, rule, &[])
}

fn plugin_run_with(
    plugin: &Path,
    event: &Value,
    config: &Value,
    rule: &str,
    extra: &[&str],
) -> Value {
    let dir = TempDir::new("lang-run");
    let event_file = dir.write("event.json", &event.to_string());
    let config = config.to_string();
    let mut args = vec![
        "plugin",
        "run",
        plugin.to_str().expect("utf-8"),
        "--event",
        event_file.to_str().expect("utf-8"),
        "--config",
        &config,
        "--rule",
        rule,
        "--format",
        "json",
    ];
    args.extend_from_slice(extra);
    let out = rulehook(&args);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            stdout(&out),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn messages(run: &Value) -> Vec<String> {
    run["logs"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|l| format!("[{}] {}", l["level"].as_str().unwrap_or(""), l["message"]))
                .collect()
        })
        .unwrap_or_default()
}

/// What each template does as generated: `source` added last, the
/// `skip_types` skipped with the reason, a misspelt key refused naming it,
/// one debug line per call; and its native tests pass.
fn template_behaves(lang: Lang) {
    let name = format!("tpl-{}", lang.flag());
    let dir = TempDir::new(&name);
    let root = project(&dir, &name, lang, &[]);
    let component = build(&root, &name, lang);

    let sent = plugin_run(&component, &event("tpl-1", "create"), &json!({}), "r");
    assert_eq!(sent["outcome"], "send", "{sent}");
    let payload = sent["payload"].as_object().expect("an object");
    assert_eq!(
        payload.keys().next_back().map(String::as_str),
        Some("source")
    );
    assert_eq!(sent["payload"]["source"], "rulehook");
    assert_eq!(sent["payload"]["event_id"], "tpl-1");
    assert_eq!(
        messages(&sent),
        ["[debug] \"rule r: create of story tpl-1\""],
        "{sent}"
    );

    let skipped = plugin_run(
        &component,
        &event("tpl-2", "delete"),
        &json!({"skip_types": ["delete"]}),
        "r",
    );
    assert_eq!(skipped["outcome"], "skip", "{skipped}");
    assert_eq!(
        skipped["reason"],
        "event type `delete` is listed in skip_types"
    );

    let refused = plugin_run(
        &component,
        &event("tpl-3", "create"),
        &json!({"skip_type": ["delete"]}),
        "r",
    );
    assert_eq!(refused["outcome"], "invalid-config", "{refused}");
    let error = refused["error"].as_str().unwrap_or_default();
    assert!(error.contains("skip_type: unknown key"), "{refused}");

    // The native test route the README gives.
    match lang {
        Lang::Js | Lang::Ts => {
            let out = tool(lang, &root, "npm", &["test"]);
            assert!(
                out.contains("# pass 4") && out.contains("# fail 0"),
                "{out}"
            );
        }
        Lang::Python => {
            // The bindings the tests import (a cached build did not write
            // them; componentize-py will not write over a directory).
            let _ = std::fs::remove_dir_all(root.join("bindings"));
            tool(
                lang,
                &root,
                "componentize-py",
                &[
                    "--wit-path",
                    "wit",
                    "--world",
                    "transform",
                    "bindings",
                    "bindings",
                ],
            );
            let out = tool(lang, &root, "pytest", &["-q", "-p", "no:cacheprovider"]);
            assert!(out.contains("4 passed"), "{out}");
        }
    }
}

#[test]
fn javascript_template_builds_runs_and_tests() {
    template_behaves(Lang::Js);
}

#[test]
fn typescript_template_builds_runs_and_tests() {
    template_behaves(Lang::Ts);
}

#[test]
fn python_template_builds_runs_and_tests() {
    template_behaves(Lang::Python);
}

/// The JavaScript probe: the clock and random numbers it sees, a thrown
/// Error on `boom`, an endless loop on `spin`.
const JS_PROBE: &str = r#"
import { log } from 'rulehook:plugin/host@0.1.0';

export function validateConfig(config) {}

export function transform(ctx, payload, config) {
  const cfg = JSON.parse(config) ?? {};
  if (cfg.boom) throw new Error(`boom: ${ctx.eventId} went wrong`);
  if (cfg.spin) { for (;;) {} }
  log('info', `probe ${ctx.eventId}`);
  const body = JSON.parse(payload);
  body.probe = {
    now: Date.now(),
    iso: new Date().toISOString(),
    random: [Math.random(), Math.random()],
  };
  return { tag: 'send', val: JSON.stringify(body) };
}
"#;

/// The Python probe: the clocks (a sleep included) and random numbers it
/// sees, what `print` writes, an exception on `boom`, a loop on `spin`.
const PY_PROBE: &str = r#"
import json
import os
import random
import time

import wit_world
from wit_world.imports import host
from wit_world.imports.types import Outcome_Send


class WitWorld(wit_world.WitWorld):
    def validate_config(self, config):
        pass

    def transform(self, ctx, payload, config):
        cfg = json.loads(config) or {}
        if cfg.get("boom"):
            raise ValueError(f"boom: {ctx.event_id} went wrong")
        if cfg.get("spin"):
            while True:
                pass
        print(f"probe {ctx.event_id} on stdout")
        host.log(host.Level.INFO, f"probe {ctx.event_id}")
        body = json.loads(payload)
        start = time.monotonic()
        time.sleep(2)
        body["probe"] = {
            "time": time.time(),
            "slept": time.monotonic() - start,
            "urandom": os.urandom(8).hex(),
            "random": random.random(),
        }
        return Outcome_Send(json.dumps(body))
"#;

fn js_probe(dir: &TempDir) -> PathBuf {
    let root = project(dir, "js-probe", Lang::Js, &[("src/index.js", JS_PROBE)]);
    build(&root, "js-probe", Lang::Js)
}

fn py_probe(dir: &TempDir) -> PathBuf {
    let root = project(dir, "py-probe", Lang::Python, &[("app.py", PY_PROBE)]);
    build(&root, "py-probe", Lang::Python)
}

#[test]
fn javascript_sees_a_fixed_clock_and_repeatable_random_and_its_errors_are_readable() {
    let dir = TempDir::new("js-probe");
    let component = js_probe(&dir);
    let ev = event("js-1", "create");
    let first = plugin_run(&component, &ev, &json!({}), "r");
    assert_eq!(first["outcome"], "send", "{first}");
    let probe = &first["payload"]["probe"];
    assert_eq!(probe["now"], FIXED_MS, "{first}");
    assert_eq!(probe["iso"], "2020-01-01T00:00:00.000Z");
    let random: Vec<f64> = serde_json::from_value(probe["random"].clone()).expect("numbers");
    assert!(
        random.iter().all(|r| (0.0..1.0).contains(r)) && random[0] != random[1],
        "{random:?}"
    );
    assert_eq!(messages(&first), ["[info] \"probe js-1\""]);
    // Another process, the same event: the same bytes.
    let second = plugin_run(&component, &ev, &json!({}), "r");
    assert_eq!(first["payload"].to_string(), second["payload"].to_string());

    let thrown = plugin_run(&component, &ev, &json!({"boom": true}), "r");
    assert_eq!(thrown["outcome"], "error", "{thrown}");
    assert_eq!(
        thrown["error"], "plugin js-probe returned an error: boom: js-1 went wrong",
        "{thrown}"
    );
    let spun = plugin_run(&component, &ev, &json!({"spin": true}), "r");
    assert_eq!(
        spun["error"], "plugin js-probe timed out after 50 ms",
        "{spun}"
    );
}

#[test]
fn python_sees_a_fixed_clock_and_seeded_random_and_its_tracebacks_are_readable() {
    let dir = TempDir::new("py-probe");
    let component = py_probe(&dir);
    let ev = event("py-1", "create");
    let first = plugin_run(&component, &ev, &json!({}), "r");
    assert_eq!(first["outcome"], "send", "{first}");
    let probe = &first["payload"]["probe"];
    assert_eq!(probe["time"], json!(FIXED_MS as f64 / 1000.0), "{first}");
    // The sleep moved the virtual clock on by its length, without waiting.
    let slept = probe["slept"].as_f64().expect("a number");
    assert!((2.0..2.001).contains(&slept), "{first}");
    assert_eq!(
        messages(&first),
        // What the call printed follows its log() lines.
        ["[info] \"probe py-1\"", "[info] \"probe py-1 on stdout\""],
        "{first}"
    );
    let second = plugin_run(&component, &ev, &json!({}), "r");
    assert_eq!(first["payload"].to_string(), second["payload"].to_string());
    // os.urandom is seeded from the call's input: another event, other bytes.
    let other = plugin_run(&component, &event("py-2", "create"), &json!({}), "r");
    assert_ne!(probe["urandom"], other["payload"]["probe"]["urandom"]);

    let raised = plugin_run(&component, &ev, &json!({"boom": true}), "r");
    assert_eq!(raised["outcome"], "error", "{raised}");
    let error = raised["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("plugin py-probe trapped: ")
            && error.contains("Traceback (most recent call last):")
            && error.contains("ValueError: boom: py-1 went wrong"),
        "{raised}"
    );
    let spun = plugin_run(&component, &ev, &json!({"spin": true}), "r");
    assert_eq!(
        spun["error"], "plugin py-probe timed out after 50 ms",
        "{spun}"
    );
}

/// The server runs the same components: the receiver gets what `plugin run`
/// printed (the fixed clock included), and an exception fails the delivery
/// with its message on the record.
#[test]
fn the_server_delivers_what_plugin_run_shows_and_records_plugin_exceptions() {
    let build_dir = TempDir::new("lang-serve-build");
    let js = js_probe(&build_dir);
    let py = py_probe(&build_dir);
    let ts_root = project(&build_dir, "tpl-ts", Lang::Ts, &[]);
    let ts = build(&ts_root, "tpl-ts", Lang::Ts);

    let rx = Receiver::start(vec![Answer::status(200)]);
    let rule = |name: &str, plugin: &str, config: &str, path: &str| {
        format!(
            "  - name: {name}\n    events: [create]\n    plugins: [{{name: {plugin}, config: {config}}}]\n    webhook: {{url: \"{}\"}}\n",
            rx.url(path)
        )
    };
    let rules = [
        "rules:\n".to_string(),
        rule("js", "js-probe", "{}", "/js"),
        rule("py", "py-probe", "{}", "/py"),
        rule("ts", "tpl-ts", "{skip_types: [delete]}", "/ts"),
        rule("js-boom", "js-probe", "{boom: true}", "/never"),
        rule("py-boom", "py-probe", "{boom: true}", "/never"),
    ]
    .concat();
    let (dir, config) = setup(
        "lang-serve",
        &rules,
        &format!("plugins_dir: plugins\nhttp_ports: [{}]\n", rx.addr.port()),
    );
    std::fs::create_dir_all(dir.path().join("plugins")).expect("plugins dir");
    for (name, file) in [("js-probe", &js), ("py-probe", &py), ("tpl-ts", &ts)] {
        std::fs::copy(file, dir.path().join(format!("plugins/{name}.wasm"))).expect("copy");
    }
    let server = Server::start(&dir, &config);
    let ev = event("serve-1", "create");
    let r = server.post_event(&ev);
    assert_eq!(r.status, 202, "{}", r.text());

    let got = rx.wait_for(3, T);
    let at = |path: &str| {
        got.iter()
            .find(|g| g.path == path)
            .unwrap_or_else(|| panic!("nothing at {path}"))
            .json()
    };
    for (path, plugin, rule) in [("/js", &js, "js"), ("/py", &py, "py")] {
        let shown = plugin_run(plugin, &ev, &json!({}), rule);
        assert_eq!(at(path)["probe"], shown["payload"]["probe"], "{path}");
    }
    assert_eq!(at("/js")["probe"]["now"], FIXED_MS);
    assert_eq!(at("/ts")["source"], "rulehook");

    for (rule, reason) in [
        (
            "js-boom",
            "plugin js-probe returned an error: boom: serve-1 went wrong",
        ),
        ("py-boom", "ValueError: boom: serve-1 went wrong"),
    ] {
        let failed = wait_for(T, "the failed delivery's record", || {
            let list = server.deliveries(&format!("rule={rule}"));
            (list.len() == 1 && list[0]["state"] == "failed").then(|| list[0].clone())
        });
        let why = failed["reason"].as_str().unwrap_or_default();
        assert!(why.contains(reason), "{rule}: {why:?} lacks {reason:?}");
    }
    drop(server);
}

/// The JavaScript template `name` built with StarlingMonkey
/// (`componentize-js`) and `flags`. It reads the WIT through a sandbox that
/// sees only the working directory, so the path must be relative.
fn starlingmonkey(dir: &TempDir, name: &str, flags: &[&str]) -> PathBuf {
    let root = project(dir, name, Lang::Js, &[]);
    let out = format!("{name}.wasm");
    let mut args = vec!["src/index.js", "--wit", "wit", "--world-name", "transform"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--out", &out]);
    build_with(&root, name, Lang::Js, Some(("componentize-js", &args)))
}

/// A StarlingMonkey component (`componentize-js`) of the JavaScript
/// template's source: as built by default it imports `wasi:http` and is
/// refused at once, naming the interface and the flags; built with them it
/// runs like the QuickJS one.
#[test]
fn starlingmonkey_is_refused_with_the_flag_by_default_and_runs_with_it() {
    let dir = TempDir::new("sm");
    let default = starlingmonkey(&dir, "sm-default", &[]);
    let refused = rulehook(&[
        "plugin",
        "run",
        default.to_str().expect("utf-8"),
        "--event",
        dir.write("event.json", &event("sm-1", "create").to_string())
            .to_str()
            .expect("utf-8"),
    ]);
    let text = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{text}");
    assert!(
        text.contains("plugin sm-default imports wasi:http/")
            && text.contains("which the host does not provide (plugins have no network access")
            && text.contains("--disable http fetch-event"),
        "{text}"
    );

    let flagged = starlingmonkey(&dir, "sm", &["--disable", "http", "fetch-event"]);
    // StarlingMonkey's first calls start its engine; a debug build on a
    // loaded machine needs more than the default 50 ms, as a rule's entry
    // for it would set.
    let sent = plugin_run_with(
        &flagged,
        &event("sm-2", "create"),
        &json!({}),
        "r",
        &["--timeout", "1s"],
    );
    assert_eq!(sent["outcome"], "send", "{sent}");
    assert_eq!(sent["payload"]["source"], "rulehook");
    assert_eq!(
        messages(&sent),
        ["[debug] \"rule r: create of story sm-2\""]
    );
}
