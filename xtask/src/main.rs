//! `cargo xtask test | bench | soak | shaders | ci`: the project's entry points (see README.md).

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
    /// What CI runs (`.ci/run` calls it): fmt check, clippy -D warnings, rustdoc -D warnings,
    /// `cargo package` of the published crates (built from the packaged files alone), the
    /// tests, the quick bench.
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

/// Runs `cargo <args>` in the workspace root, echoing it; fails with the command's exit code.
fn run_cargo(args: &[&str]) -> Result<(), Failure> {
    let shown = format!("cargo {}", args.join(" "));
    eprintln!("xtask: $ {shown}");
    let start = Instant::now();
    let status = Command::new(cargo())
        .args(args)
        .current_dir(workspace_root())
        .status();
    let status = status.map_err(|e| (format!("{shown}: could not start cargo: {e}"), 1))?;
    eprintln!(
        "xtask: `{shown}` took {:.1} s",
        start.elapsed().as_secs_f64()
    );
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
    if let Err((msg, code)) = run_bin("wflash-bench", &["--adapter".to_string()]) {
        if !allow_no_gpu() {
            return Err((msg, code));
        }
        eprintln!("xtask: {msg}; continuing because WFLASH_ALLOW_NO_GPU=1");
    }
    let result = run_cargo(&["test", "--workspace"]);
    print_conformance_summaries();
    result
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

fn bench(args: &[String]) -> Result<(), Failure> {
    // The dev profile builds dependencies at opt-level 2 and wflash-bench at 3 (workspace
    // Cargo.toml), so the bench shares one build with the tests instead of a second, release one.
    run_bin("wflash-bench", args)
}

/// `cargo run` of a binary of the bench crate with `args`.
fn run_bin(bin: &str, args: &[String]) -> Result<(), Failure> {
    let mut cargo_args = vec!["run", "--quiet", "-p", "wflash-bench", "--bin", bin, "--"];
    cargo_args.extend(args.iter().map(String::as_str));
    run_cargo(&cargo_args)
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
    run_cargo(&[
        "package",
        "-p",
        "wflash-ref",
        "-p",
        "wflash",
        "--allow-dirty",
    ])?;
    test()?;
    bench(&[
        "--quick".into(),
        "--json".into(),
        "target/bench-quick.json".into(),
    ])?;
    eprintln!("xtask: ci passed in {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}

/// `cargo doc` of the workspace's own crates with rustdoc warnings as errors.
fn doc() -> Result<(), Failure> {
    let flags = std::env::var("RUSTDOCFLAGS").unwrap_or_default();
    let shown = "RUSTDOCFLAGS=-D warnings cargo doc --workspace --no-deps";
    eprintln!("xtask: $ {shown}");
    let status = Command::new(cargo())
        .args(["doc", "--workspace", "--no-deps"])
        .env("RUSTDOCFLAGS", format!("{flags} -D warnings"))
        .current_dir(workspace_root())
        .status()
        .map_err(|e| (format!("{shown}: could not start cargo: {e}"), 1))?;
    if status.success() {
        Ok(())
    } else {
        Err((format!("`{shown}` failed ({status})"), 1))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Test => test(),
        Task::Bench { args } => bench(&args),
        Task::Soak { args } => run_bin("wflash-soak", &args),
        Task::Shaders => run_cargo(&["test", "-p", "wflash", "--test", "shader_validation"]),
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
