//! `cargo xtask test | bench | soak | shaders | web | web-test | ci`: the project's entry points
//! (see README.md).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "xtask", about = "wflash project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand, Debug)]
enum Task {
    /// Print the adapter in use, run every test of the workspace, print the conformance summaries.
    Test,
    /// Run the benchmark (`wflash-bench`); every argument is passed through (try `-- --help`).
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Soak: 10,000 varied calls on one engine, resident memory at start and end (`wflash-soak`;
    /// arguments pass through, try `-- --help`).
    Soak {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Parse, validate and translate every shader variant with naga (no GPU needed).
    Shaders,
    /// Build the browser demo (wasm32 + WebGPU) and serve it on localhost.
    Web {
        #[arg(long, default_value_t = 8000)]
        port: u16,
    },
    /// Run the conformance slice and the demo page in headless Chromium on WebGPU (installs
    /// Chromium, the wasm target and a pinned wasm-bindgen-cli when missing).
    WebTest {
        /// Only the slice's cases A-B (1-based, inclusive), to chase a failure.
        #[arg(long)]
        cases: Option<String>,
    },
    /// What CI runs (`.ci/run` calls it): fmt check, clippy -D warnings, rustdoc -D warnings,
    /// `cargo package` of the published crates (built from the packaged files alone), the
    /// tests, the quick bench, the browser tests.
    Ci,
}

/// A failed step: its description and exit code.
type Failure = (String, u8);

fn workspace_root() -> PathBuf {
    // xtask/ sits directly under the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Environment variables a step runs with, beyond the inherited ones.
type Env = [(String, String)];

/// Runs `cargo <args>` in the workspace root, echoing it; fails with the command's exit code.
fn run_cargo(args: &[&str]) -> Result<(), Failure> {
    run_cargo_env(args, &[])
}

/// [`run_cargo`] with `env` added to the environment (and shown).
fn run_cargo_env(args: &[&str], env: &Env) -> Result<(), Failure> {
    let vars: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v} ")).collect();
    let shown = format!("{}cargo {}", vars.concat(), args.join(" "));
    eprintln!("xtask: $ {shown}");
    let start = Instant::now();
    let status = Command::new(cargo())
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(workspace_root())
        .status();
    let status = status.map_err(|e| (format!("{shown}: could not start cargo: {e}"), 1))?;
    eprintln!(
        "xtask: `{shown}` took {:.1} s",
        start.elapsed().as_secs_f64()
    );
    exit_status(&shown, status)
}

/// A finished step's status as a result: its exit code on failure.
fn exit_status(shown: &str, status: std::process::ExitStatus) -> Result<(), Failure> {
    if status.success() {
        Ok(())
    } else {
        // A signal-killed child has no code; report 1. Codes above 255 cannot be exit codes.
        let code = status
            .code()
            .map_or(1, |c| u8::try_from(c).unwrap_or(1).max(1));
        Err((format!("`{shown}` failed ({status})"), code))
    }
}

fn allow_no_gpu() -> bool {
    std::env::var("WFLASH_ALLOW_NO_GPU").is_ok_and(|v| v == "1")
}

fn test() -> Result<(), Failure> {
    let env = adapter_env()?;
    test_in(&env, &["--workspace"])
}

/// Prints the adapter `env` selects (a failure unless WFLASH_ALLOW_NO_GPU=1), then runs
/// `cargo test <selection>` there and prints the conformance summaries.
fn test_in(env: &Env, selection: &[&str]) -> Result<(), Failure> {
    if let Err((msg, code)) = run_bin("wflash-bench", &["--adapter".to_string()], env) {
        if !allow_no_gpu() {
            return Err((msg, code));
        }
        eprintln!("xtask: {msg}; continuing because WFLASH_ALLOW_NO_GPU=1");
    }
    let mut args = vec!["test"];
    args.extend_from_slice(selection);
    let result = run_cargo_env(&args, env);
    print_conformance_summaries();
    result
}

/// Every how many cases of each conformance grid CI's GL part runs (`WFLASH_GRID_SAMPLE`).
const GL_GRID_SAMPLE: &str = "12";

/// The grid tests CI's GL part runs a sample of (test-name filters): every path's forward,
/// backward, modifier and linear grids. Left to the Vulkan run: the other kernel family's grid
/// (the tiled family takes 100-300 s a case on GL llvmpipe) and those binaries' non-grid
/// tests (determinism, NaN propagation, long sequences: 8 minutes apiece there, and about the
/// kernels, which the Vulkan run covers, not the backend).
const GL_GRIDS: [&str; 10] = [
    "conformance_f32",
    "conformance_f16_packed",
    "conformance_bf16",
    "conformance_modifiers_every_path",
    "backward_f32",
    "backward_f16_packed",
    "backward_bf16",
    "backward_modifiers_every_path",
    "linear_conformance_grid",
    "linear_backward_grid",
];

/// The tests that race device work against a pipeline compile (the GL context lock they guard
/// is held through a compile): they need compiles that take real time, so they run with Mesa's
/// shader cache off.
const GL_COMPILE_RACES: [&str; 2] = [
    "device_work_on_other_threads_goes_on_while_a_compile_is_in_flight",
    "cached_pipelines_do_not_wait_behind_a_compile",
];

/// CI's GL part: the suite on Mesa's GL llvmpipe, what a machine without a Vulkan driver gets
/// (no shader-f16, no subgroups: the packed f16 path and the fallbacks). The compile races
/// ([`GL_COMPILE_RACES`]) run with Mesa's shader cache off, so every pipeline compiles for
/// real, as on a fresh machine; then, with the cache on in a fresh directory (the binaries
/// share many kernels), the rest of the API, reliability, merge and decode suites whole and
/// every `GL_GRID_SAMPLE`-th case of each grid in `GL_GRIDS`.
///
/// Every selection is `--workspace` with `--test` filters: `-p wflash-conformance` would
/// resolve the dependencies' features without burn's and rebuild wgpu (two minutes).
fn gl_part() -> Result<(), Failure> {
    let with = |vars: &[(&str, &str)]| {
        let mut env = runtime_dir_env();
        env.extend(
            [
                ("WGPU_BACKEND", "gl"),
                ("WFLASH_GRID_SAMPLE", GL_GRID_SAMPLE),
            ]
            .iter()
            .chain(vars)
            .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        env
    };
    let suites = |names: &[&'static str]| {
        let mut selection = vec!["--workspace"];
        for name in names {
            selection.extend(["--test", name]);
        }
        selection.push("--");
        selection
    };
    let mut races = suites(&["reliability"]);
    races.push("--exact");
    races.extend(GL_COMPILE_RACES);
    test_in(&with(&[("MESA_SHADER_CACHE_DISABLE", "true")]), &races)?;

    let cache = workspace_root().join("target/gl-shader-cache");
    // A fresh cache each run: what CI's fresh machine has.
    let _ = std::fs::remove_dir_all(&cache);
    let cache = cache.display().to_string();
    let env = with(&[("MESA_SHADER_CACHE_DIR", cache.as_str())]);
    let mut whole = suites(&["api", "reliability", "merge", "decode"]);
    for race in GL_COMPILE_RACES {
        whole.extend(["--skip", race]);
    }
    test_in(&env, &whole)?;
    let mut grids = suites(&["conformance", "backward", "linear"]);
    grids.extend(GL_GRIDS);
    test_in(&env, &grids)
}

/// Where the Vulkan loader finds lavapipe (Mesa's software Vulkan) once `mesa-vulkan-drivers`
/// is installed.
fn lavapipe_icd() -> PathBuf {
    PathBuf::from(format!(
        "/usr/share/vulkan/icd.d/lvp_icd.{}.json",
        std::env::consts::ARCH
    ))
}

/// The environment the tests and the bench run in: the adapter the suite is meant for.
///
/// `WGPU_BACKEND` set by the caller wins (`WGPU_BACKEND=gl` runs on GL). Otherwise, on Linux, a
/// reachable Vulkan adapter (a GPU's driver, or lavapipe) is used; where there is none, as on a
/// fresh machine without a GPU, lavapipe is installed (`mesa-vulkan-drivers`, when the user
/// may) and pinned, so the suite does not fall to Mesa's GL llvmpipe by accident. Elsewhere
/// (Metal, DX12) wgpu's own choice stands.
fn adapter_env() -> Result<Vec<(String, String)>, Failure> {
    let mut env = runtime_dir_env();
    if let Ok(backend) = std::env::var("WGPU_BACKEND")
        && !backend.is_empty()
    {
        eprintln!("xtask: WGPU_BACKEND={backend} is set: running on the adapter it selects");
        return Ok(env);
    }
    if !cfg!(target_os = "linux") {
        return Ok(env);
    }
    let vulkan = ("WGPU_BACKEND".to_string(), "vulkan".to_string());
    let mut probe_env = env.clone();
    probe_env.push(vulkan.clone());
    if adapter_reachable(&probe_env) {
        env.push(vulkan);
        return Ok(env);
    }
    let icd = lavapipe_icd();
    if !icd.exists() {
        install_lavapipe()?;
    }
    let icd = icd.display().to_string();
    eprintln!("xtask: no Vulkan adapter was reachable: pinning lavapipe ({icd})");
    env.push(("VK_ICD_FILENAMES".into(), icd.clone()));
    env.push(("VK_DRIVER_FILES".into(), icd));
    env.push(vulkan);
    Ok(env)
}

/// `XDG_RUNTIME_DIR` where the caller has none: Mesa's llvmpipe looks for one and logs
/// when it is missing.
fn runtime_dir_env() -> Vec<(String, String)> {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(_) => Vec::new(),
        None => vec![(
            "XDG_RUNTIME_DIR".into(),
            std::env::temp_dir().display().to_string(),
        )],
    }
}

/// Whether `wflash-bench --adapter` opens an adapter under `env` (its output is not shown).
fn adapter_reachable(env: &Env) -> bool {
    // Builds the bench first (shown: on a fresh clone it takes minutes), then probes quietly.
    if run_cargo(&[
        "build",
        "--quiet",
        "-p",
        "wflash-bench",
        "--bin",
        "wflash-bench",
    ])
    .is_err()
    {
        return false;
    }
    Command::new(cargo())
        .args([
            "run",
            "--quiet",
            "-p",
            "wflash-bench",
            "--bin",
            "wflash-bench",
            "--",
            "--adapter",
        ])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(workspace_root())
        .output()
        .is_ok_and(|out| out.status.success())
}

/// Installs `mesa-vulkan-drivers` with apt-get as root (directly, or through password-less
/// sudo); otherwise fails with the command to run.
fn install_lavapipe() -> Result<(), Failure> {
    apt_install(
        &["mesa-vulkan-drivers"],
        "no Vulkan adapter",
        " (or run on GL with WGPU_BACKEND=gl)",
    )
}

/// Installs Debian `packages` with apt-get as root (directly, or through password-less sudo),
/// saying `why`; otherwise fails with the command to run (and `otherwise`, another way out).
fn apt_install(packages: &[&str], why: &str, otherwise: &str) -> Result<(), Failure> {
    let manual = format!(
        "sudo apt-get update && sudo apt-get install -y {}",
        packages.join(" ")
    );
    let succeeds = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .is_ok_and(|out| out.status.success())
    };
    if !succeeds("apt-get", &["--version"]) {
        return Err((
            format!(
                "{why} and no apt-get: install {} with your package manager{otherwise}",
                packages.join(" ")
            ),
            1,
        ));
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.trim_ascii() == b"0");
    let prefix: &[&str] = if root {
        &[]
    } else if succeeds("sudo", &["-n", "true"]) {
        &["sudo", "-n"]
    } else {
        return Err((
            format!("{why}: install with `{manual}`, then run this again{otherwise}"),
            1,
        ));
    };
    let mut install = vec!["apt-get", "install", "-y", "-qq"];
    install.extend_from_slice(packages);
    for args in [&["apt-get", "update", "-qq"][..], &install[..]] {
        let mut command: Vec<&str> = prefix.to_vec();
        command.extend_from_slice(args);
        eprintln!("xtask: {why}: $ {}", command.join(" "));
        let status = Command::new(command[0])
            .args(&command[1..])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status();
        if !status.is_ok_and(|s| s.success()) {
            return Err((format!("`{}` failed; try `{manual}`", command.join(" ")), 1));
        }
    }
    Ok(())
}

/// Prints `target/conformance/*.txt`, the one-line summaries the conformance tests leave.
fn print_conformance_summaries() {
    let dir = workspace_root().join("target").join("conformance");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    if files.is_empty() {
        return;
    }
    files.sort();
    eprintln!("xtask: conformance summaries ({}):", dir.display());
    for file in files {
        if let Ok(text) = std::fs::read_to_string(&file) {
            for line in text.lines() {
                println!("  {line}");
            }
        }
    }
}

/// Where the browser build's tools (a pinned wasm-bindgen-cli) and output live.
fn web_dir() -> PathBuf {
    workspace_root().join("target").join("web")
}

/// The wasm-bindgen version the lock file holds: the CLI must be exactly it.
fn wasm_bindgen_version() -> Result<String, Failure> {
    let lock = std::fs::read_to_string(workspace_root().join("Cargo.lock"))
        .map_err(|e| (format!("reading Cargo.lock: {e}"), 1))?;
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line == "name = \"wasm-bindgen\""
            && let Some(version) = lines.next().and_then(|l| l.strip_prefix("version = "))
        {
            return Ok(version.trim_matches('"').to_string());
        }
    }
    Err(("Cargo.lock has no wasm-bindgen".into(), 1))
}

/// Builds the browser module: the wasm target and wasm-bindgen-cli (pinned to the lock file's
/// wasm-bindgen, under target/web/tools) when missing, `wflash-web` for wasm32 (release), its
/// JavaScript bindings into target/web/pkg. Returns that directory.
fn build_web() -> Result<PathBuf, Failure> {
    const TARGET: &str = "wasm32-unknown-unknown";
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l == TARGET)
        });
    if !installed.unwrap_or(false) {
        eprintln!("xtask: $ rustup target add {TARGET}");
        let added = Command::new("rustup")
            .args(["target", "add", TARGET])
            .status()
            .is_ok_and(|s| s.success());
        if !added {
            return Err((format!("`rustup target add {TARGET}` failed"), 1));
        }
    }
    let version = wasm_bindgen_version()?;
    let tools = web_dir().join("tools");
    let bindgen = tools.join("bin").join("wasm-bindgen");
    let current = Command::new(&bindgen)
        .arg("--version")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string());
    if current.as_deref().ok() != Some(&format!("wasm-bindgen {version}")) {
        // Not --locked: the CLI's own lock file pins versions this registry may lack.
        // --debug: the unoptimised build takes half the time (a minute on 2 cores) and still
        // binds the module in under a second.
        let root = tools.display().to_string();
        run_cargo(&[
            "install",
            "--debug",
            "wasm-bindgen-cli",
            "--version",
            &version,
            "--root",
            &root,
        ])?;
    }
    run_cargo(&[
        "build",
        "-p",
        "wflash-web",
        "--lib",
        "--target",
        TARGET,
        "--release",
    ])?;
    let wasm = workspace_root().join(format!("target/{TARGET}/release/wflash_web.wasm"));
    let pkg = web_dir().join("pkg");
    eprintln!("xtask: $ wasm-bindgen --target web {}", wasm.display());
    let status = Command::new(&bindgen)
        .args(["--target", "web", "--no-typescript", "--out-dir"])
        .arg(&pkg)
        .arg(&wasm)
        .status()
        .is_ok_and(|s| s.success());
    if !status {
        return Err(("wasm-bindgen failed".into(), 1));
    }
    Ok(pkg)
}

/// `cargo xtask web`: builds the demo and serves it until interrupted.
fn web(port: u16) -> Result<(), Failure> {
    let pkg = build_web()?.display().to_string();
    let port = port.to_string();
    run_web_bin(&["serve", "--pkg", &pkg, "--port", &port])
}

/// `cargo run` of the browser crate's native binary (its server and Chromium driver).
fn run_web_bin(args: &[&str]) -> Result<(), Failure> {
    let mut cargo_args = vec![
        "run",
        "--quiet",
        "-p",
        "wflash-web",
        "--bin",
        "wflash-web",
        "--",
    ];
    cargo_args.extend_from_slice(args);
    run_cargo(&cargo_args)
}

/// `cargo xtask web-test`: Chromium and ChromeDriver from Debian when missing, the browser
/// build, then the conformance slice and the demo in headless Chromium on WebGPU (screenshot
/// and log in target/web-test).
fn web_test(cases: Option<&str>) -> Result<(), Failure> {
    let (chromium, driver) = ("/usr/bin/chromium", "/usr/bin/chromedriver");
    if !Path::new(chromium).exists() || !Path::new(driver).exists() {
        apt_install(
            &["chromium", "chromium-driver"],
            "no Chromium for the browser tests",
            "",
        )?;
    }
    let pkg = build_web()?.display().to_string();
    let out = workspace_root().join("target").join("web-test");
    let out = out.display().to_string();
    let mut args = vec![
        "test",
        "--pkg",
        &pkg,
        "--out",
        &out,
        "--chromium",
        chromium,
        "--chromedriver",
        driver,
    ];
    if let Some(cases) = cases {
        args.extend(["--cases", cases]);
    }
    run_web_bin(&args)
}

fn bench(args: &[String]) -> Result<(), Failure> {
    // The dev profile builds dependencies at opt-level 2 and wflash-bench at 3 (workspace
    // Cargo.toml), so the bench shares one build with the tests instead of a second, release one.
    run_bin("wflash-bench", args, &adapter_env()?)
}

/// Cargo's target folder: `CARGO_TARGET_DIR`, or the workspace's `target`.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

/// Runs a program cargo built, with `args` and `env` added, echoing it; fails with its exit
/// code.
fn run_program(program: &Path, args: &[&str], env: &Env) -> Result<(), Failure> {
    let vars: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v} ")).collect();
    let shown = format!("{}{} {}", vars.concat(), program.display(), args.join(" "));
    eprintln!("xtask: $ {shown}");
    let start = Instant::now();
    let status = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(workspace_root())
        .status()
        .map_err(|e| (format!("{shown}: could not start: {e}"), 1))?;
    eprintln!(
        "xtask: `{shown}` took {:.1} s",
        start.elapsed().as_secs_f64()
    );
    exit_status(&shown, status)
}

/// `cargo run` of a binary of the bench crate with `args` and `env`.
fn run_bin(bin: &str, args: &[String], env: &Env) -> Result<(), Failure> {
    let mut cargo_args = vec!["run", "--quiet", "-p", "wflash-bench", "--bin", bin, "--"];
    cargo_args.extend(args.iter().map(String::as_str));
    run_cargo_env(&cargo_args, env)
}

fn ci() -> Result<(), Failure> {
    let start = Instant::now();
    run_cargo(&["fmt", "--all", "--check"])?;
    run_cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    doc()?;
    // Builds each crate from its packaged files alone: what crates.io and docs.rs would get.
    // --allow-dirty: the check is of the package's contents, whatever the checkout's state.
    // The packaged crates build outside this workspace's profiles, so nothing of that build is
    // reused later: it gets its own target folder, removed afterwards to spare CI's disk.
    let verify_dir = workspace_root().join("target").join("package-verify");
    run_cargo(&[
        "package",
        "-p",
        "wflash-ref",
        "-p",
        "wflash",
        "--allow-dirty",
        "--target-dir",
        &verify_dir.display().to_string(),
    ])?;
    std::fs::remove_dir_all(&verify_dir)
        .map_err(|e| (format!("removing {}: {e}", verify_dir.display()), 1))?;
    let env = adapter_env()?;
    test_in(&env, &["--workspace"])?;
    // The burn example trains to its loss threshold with burn's attention and with wflash's
    // (it fails otherwise). The workspace's test build above built it (`cargo test` builds the
    // examples); `cargo run -p wflash-burn` would resolve features for that crate alone and
    // rebuild wgpu and burn's kernels (5 minutes on a 2-core machine).
    run_program(
        &target_dir().join("debug/examples/copy_task"),
        &["--steps", "150"],
        &env,
    )?;
    gl_part()?;
    let quick = ["--quick", "--json", "target/bench-quick.json"].map(String::from);
    run_bin("wflash-bench", &quick, &env)?;
    web_test(None)?;
    // The browser build's own lints (the wasm32-only code is invisible to the native clippy).
    run_cargo(&[
        "clippy",
        "-p",
        "wflash-web",
        "-p",
        "wflash",
        "-p",
        "wflash-conformance",
        "--target",
        "wasm32-unknown-unknown",
        "--",
        "-D",
        "warnings",
    ])?;
    eprintln!("xtask: ci passed in {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}

/// `cargo doc` of the workspace's own crates with rustdoc warnings as errors.
fn doc() -> Result<(), Failure> {
    let flags = std::env::var("RUSTDOCFLAGS").unwrap_or_default();
    let flags = format!("{flags} -D warnings").trim_start().to_string();
    run_cargo_env(
        &["doc", "--workspace", "--no-deps"],
        &[("RUSTDOCFLAGS".into(), flags)],
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Test => test(),
        Task::Bench { args } => bench(&args),
        Task::Soak { args } => adapter_env().and_then(|env| run_bin("wflash-soak", &args, &env)),
        Task::Shaders => run_cargo(&["test", "-p", "wflash", "--test", "shader_validation"]),
        Task::Web { port } => web(port),
        Task::WebTest { cases } => web_test(cases.as_deref()),
        Task::Ci => ci(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err((msg, code)) => {
            eprintln!("xtask: {msg}");
            ExitCode::from(code)
        }
    }
}
