//! wflash in the browser.
//!
//! On wasm32 this crate is the module the page in `web/` loads: wasm-bindgen exports that open
//! an engine on the browser's WebGPU adapter (`adapter`), run one attention call of the
//! visitor's choosing and judge it against the f64 reference (`run_demo`), and run the
//! conformance slice (`run_suite`). Natively it is the binary `wflash-web`, which serves the
//! page and drives headless Chromium through it (`cargo xtask web`, `cargo xtask web-test`).

#[cfg(target_arch = "wasm32")]
mod demo;
#[cfg(target_arch = "wasm32")]
mod engines;
#[cfg(target_arch = "wasm32")]
mod suite;

#[cfg(target_arch = "wasm32")]
pub use demo::{adapter, run_demo};
#[cfg(target_arch = "wasm32")]
pub use suite::run_suite;
