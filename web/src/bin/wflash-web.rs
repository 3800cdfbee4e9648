//! `wflash-web serve | test`: serves the demo page (web/page, and the wasm module that
//! `cargo xtask web` builds into --pkg) on localhost, and tests it in headless Chromium through
//! chromedriver: the conformance slice (`/?suite`), then the demo (a click on "run", the
//! result checked, a screenshot saved).

#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
fn main() -> std::process::ExitCode {
    native::main()
}

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, ExitCode, Stdio};
    use std::time::{Duration, Instant};

    use clap::{Parser, Subcommand};
    use fantoccini::{Client, ClientBuilder, Locator};
    use serde_json::json;

    #[derive(Parser, Debug)]
    #[command(name = "wflash-web", about = "serve and test wflash's browser page")]
    struct Cli {
        #[command(subcommand)]
        task: Task,
    }

    #[derive(Subcommand, Debug)]
    enum Task {
        /// Serve the page on localhost until interrupted.
        Serve {
            /// The wasm-bindgen output (wflash_web.js and its .wasm).
            #[arg(long)]
            pkg: PathBuf,
            #[arg(long, default_value_t = 8000)]
            port: u16,
        },
        /// Run the conformance slice and the demo in headless Chromium.
        Test {
            #[arg(long)]
            pkg: PathBuf,
            /// Where the screenshot and the slice's log go.
            #[arg(long)]
            out: PathBuf,
            #[arg(long, default_value = "/usr/bin/chromium")]
            chromium: String,
            #[arg(long, default_value = "/usr/bin/chromedriver")]
            chromedriver: String,
            /// Run only the slice's cases A-B (1-based, inclusive), to chase a failure.
            #[arg(long)]
            cases: Option<String>,
            /// Skip the slice: only the demo.
            #[arg(long)]
            demo_only: bool,
            /// The demo's form preset, as an address query (`seq=2048&heads=8&causal=0`).
            #[arg(long, default_value = "")]
            demo_query: String,
            /// Give up on the slice after this many minutes.
            #[arg(long, default_value_t = 45)]
            minutes: u64,
        },
    }

    pub fn main() -> ExitCode {
        let cli = Cli::parse();
        let result = match cli.task {
            Task::Serve { pkg, port } => serve(&pkg, port).map(|(server, addr)| {
                println!("wflash-web: serving http://{addr}/ (Ctrl-C to stop)");
                serve_forever(server, &pkg);
            }),
            Task::Test {
                pkg,
                out,
                chromium,
                chromedriver,
                cases,
                demo_only,
                demo_query,
                minutes,
            } => {
                let pages = Pages {
                    cases: cases.filter(|_| !demo_only),
                    suite: !demo_only,
                    demo_query,
                };
                test(&pkg, &out, &chromium, &chromedriver, &pages, minutes)
            }
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("wflash-web: {err}");
                ExitCode::FAILURE
            }
        }
    }

    /// The page's own files.
    fn page_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("page")
    }

    fn serve(pkg: &Path, port: u16) -> Result<(tiny_http::Server, String), String> {
        if !pkg.join("wflash_web.js").is_file() {
            return Err(format!(
                "{} has no wflash_web.js: build it first (`cargo xtask web`)",
                pkg.display()
            ));
        }
        let server = tiny_http::Server::http(("127.0.0.1", port))
            .map_err(|e| format!("listening on port {port}: {e}"))?;
        let addr = server.server_addr().to_string();
        Ok((server, addr))
    }

    /// Answers requests: /pkg/… from `pkg`, everything else from the page's directory.
    fn serve_forever(server: tiny_http::Server, pkg: &Path) {
        let page = page_dir();
        for request in server.incoming_requests() {
            let url = request.url().split('?').next().unwrap_or("/").to_string();
            let file = match url.strip_prefix("/pkg/") {
                Some(rest) => pkg.join(rest),
                None if url == "/" => page.join("index.html"),
                None => page.join(url.trim_start_matches('/')),
            };
            // Only plain names under the two directories.
            let response = match std::fs::read(&file) {
                Ok(bytes) if !url.contains("..") => {
                    let mime = match file.extension().and_then(|e| e.to_str()) {
                        Some("html") => "text/html; charset=utf-8",
                        Some("js") => "text/javascript",
                        Some("css") => "text/css",
                        Some("wasm") => "application/wasm",
                        _ => "application/octet-stream",
                    };
                    let header = tiny_http::Header::from_bytes("Content-Type", mime)
                        .expect("a valid header");
                    tiny_http::Response::from_data(bytes).with_header(header)
                }
                _ => tiny_http::Response::from_data(b"not found".to_vec()).with_status_code(404),
            };
            let _ = request.respond(response);
        }
    }

    /// chromedriver, killed when dropped.
    struct Driver(Child);

    impl Drop for Driver {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn free_port() -> Result<u16, String> {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).map_err(|e| e.to_string())?;
        Ok(listener.local_addr().map_err(|e| e.to_string())?.port())
    }

    /// What `test` runs.
    struct Pages {
        /// The slice's cases A-B, or all.
        cases: Option<String>,
        /// Whether the slice runs at all.
        suite: bool,
        /// The demo's form preset.
        demo_query: String,
    }

    fn test(
        pkg: &Path,
        out: &Path,
        chromium: &str,
        chromedriver: &str,
        pages: &Pages,
        minutes: u64,
    ) -> Result<(), String> {
        std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
        let (server, addr) = serve(pkg, 0)?;
        let pkg_dir = pkg.to_path_buf();
        std::thread::spawn(move || serve_forever(server, &pkg_dir));
        let driver_port = free_port()?;
        let _driver = Driver(
            Command::new(chromedriver)
                .arg(format!("--port={driver_port}"))
                // Chromium's own log (the GPU process's messages among them), for a failure.
                .arg("--enable-chrome-logs")
                .arg(format!(
                    "--log-path={}",
                    out.join("chromedriver.log").display()
                ))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("starting {chromedriver}: {e}"))?,
        );
        let profile = out.join("chromium-profile");
        let _ = std::fs::remove_dir_all(&profile);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async {
            let client = connect(driver_port, chromium, &profile).await?;
            let limit = Duration::from_secs(minutes * 60);
            let mut outcome = Ok(());
            if pages.suite {
                outcome = run_suite_page(&client, &addr, out, pages.cases.as_deref(), limit).await;
            }
            if outcome.is_ok() {
                outcome = run_demo_page(&client, &addr, out, &pages.demo_query).await;
            }
            let _ = client.close().await;
            outcome
        })
    }

    /// A WebDriver session on headless Chromium with WebGPU on SwiftShader (the flags that
    /// make headless Chromium offer a software WebGPU adapter; the network ones keep it from
    /// calling out of a closed machine).
    async fn connect(port: u16, chromium: &str, profile: &Path) -> Result<Client, String> {
        let args = [
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--enable-unsafe-webgpu".into(),
            "--enable-unsafe-swiftshader".into(),
            "--use-webgpu-adapter=swiftshader".into(),
            "--enable-features=Vulkan".into(),
            // SwiftShader compiles the CPU-adapter kernels for longer than the watchdog allows.
            "--disable-gpu-watchdog".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-quic".into(),
            "--window-size=1100,1400".into(),
            format!("--user-data-dir={}", profile.display()),
        ];
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({ "binary": chromium, "args": args }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let url = format!("http://127.0.0.1:{port}");
        // chromedriver takes a moment to listen.
        let start = Instant::now();
        loop {
            match ClientBuilder::new(connector.clone())
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(client) => return Ok(client),
                Err(err) if start.elapsed() > Duration::from_secs(30) => {
                    return Err(format!("no WebDriver session at {url}: {err}"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }

    /// The value of `expr` (a JavaScript expression) in the page.
    async fn eval(client: &Client, expr: &str) -> Result<serde_json::Value, String> {
        client
            .execute(&format!("return {expr};"), vec![])
            .await
            .map_err(|e| format!("evaluating `{expr}`: {e}"))
    }

    async fn text(client: &Client, id: &str) -> Result<String, String> {
        let value = eval(
            client,
            &format!("document.getElementById('{id}').textContent"),
        )
        .await?;
        Ok(value.as_str().unwrap_or_default().to_string())
    }

    /// Waits until `expr` is a string other than those in `pending`, and returns it.
    async fn wait_for_status(
        client: &Client,
        expr: &str,
        pending: &[&str],
        limit: Duration,
        mut progress: impl AsyncFnMut() -> Result<(), String>,
    ) -> Result<String, String> {
        let start = Instant::now();
        loop {
            let status = eval(client, expr).await?;
            let status = status.as_str().unwrap_or("").to_string();
            progress().await?;
            if !status.is_empty() && !pending.contains(&status.as_str()) {
                return Ok(status);
            }
            if start.elapsed() > limit {
                return Err(format!(
                    "`{expr}` still `{status}` after {} s",
                    limit.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The document's status: "ready" once the page has opened its engine.
    const BODY_STATUS: &str = "document.body.dataset.status || ''";

    /// The conformance slice (`/?suite`), its log printed as it grows.
    async fn run_suite_page(
        client: &Client,
        addr: &str,
        out: &Path,
        cases: Option<&str>,
        limit: Duration,
    ) -> Result<(), String> {
        // The conformance slice, its log printed as it grows.
        let suite_query = cases.map_or("suite".to_string(), |c| format!("suite={c}"));
        client
            .goto(&format!("http://{addr}/?{suite_query}"))
            .await
            .map_err(|e| e.to_string())?;
        let body = "document.body.dataset.status || ''";
        let ready =
            wait_for_status(client, body, &[], Duration::from_secs(120), async || Ok(())).await?;
        println!("wflash-web: {}", text(client, "adapter").await?);
        if ready != "ready" {
            return Err(format!("the page did not open an engine ({ready})"));
        }
        let mut printed = 0;
        let suite = wait_for_status(
            client,
            "document.getElementById('suite').dataset.status || ''",
            &["running"],
            limit,
            async || {
                let log = text(client, "suite-log").await?;
                for line in log.lines().skip(printed) {
                    println!("  {line}");
                    printed += 1;
                }
                Ok(())
            },
        )
        .await?;
        let log = text(client, "suite-log").await?;
        std::fs::write(out.join("suite.log"), &log).map_err(|e| e.to_string())?;
        let summary = text(client, "suite-summary").await?;
        println!("wflash-web: conformance slice: {summary}");
        if suite != "pass" {
            return Err(format!("the conformance slice did not pass ({suite})"));
        }
        Ok(())
    }

    /// The demo: the call the form holds (`query` presets it), run by a click as a visitor
    /// would; its verdict and time checked, a screenshot saved.
    async fn run_demo_page(
        client: &Client,
        addr: &str,
        out: &Path,
        query: &str,
    ) -> Result<(), String> {
        client
            .goto(&format!("http://{addr}/?{query}"))
            .await
            .map_err(|e| e.to_string())?;
        let ready = wait_for_status(
            client,
            BODY_STATUS,
            &[],
            Duration::from_secs(120),
            async || Ok(()),
        )
        .await?;
        println!("wflash-web: demo page: {}", text(client, "adapter").await?);
        if ready != "ready" {
            return Err(format!("the demo page did not open an engine ({ready})"));
        }
        client
            .find(Locator::Id("run"))
            .await
            .map_err(|e| e.to_string())?
            .click()
            .await
            .map_err(|e| e.to_string())?;
        let status = wait_for_status(
            client,
            "document.getElementById('result').dataset.status",
            &["idle", "running"],
            Duration::from_secs(600),
            async || Ok(()),
        )
        .await?;
        let screenshot = client.screenshot().await.map_err(|e| e.to_string())?;
        let shot = out.join("demo.png");
        std::fs::write(&shot, screenshot).map_err(|e| e.to_string())?;
        let (time, gflops, error, verdict) = (
            text(client, "time").await?,
            text(client, "gflops").await?,
            text(client, "error").await?,
            text(client, "verdict").await?,
        );
        println!(
            "wflash-web: demo: {} | first call {} | median {time} | {gflops} GFLOP/s | error \
             {error} | {verdict} (screenshot {})",
            text(client, "case").await?,
            text(client, "first").await?,
            shot.display()
        );
        if status != "pass" || !time.ends_with("runs)") {
            return Err(format!("the demo did not pass ({status}: {verdict})"));
        }
        Ok(())
    }
}
