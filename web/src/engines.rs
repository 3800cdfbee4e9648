//! The page's engines, opened once each: the harness's two kinds
//! (`wflash_conformance::harness_options`): the adapter's own f16 path, and the packed one.

use std::cell::RefCell;

use wasm_bindgen::JsValue;
use wflash::Engine;
use wflash_conformance::Path;

thread_local! {
    static ENGINES: RefCell<[Option<Engine>; 2]> = const { RefCell::new([None, None]) };
}

/// The engine the harness runs `path` on, opened on first use.
pub(crate) async fn engine(path: Path) -> Result<Engine, JsValue> {
    let slot = usize::from(path == Path::F16Packed);
    if let Some(engine) = ENGINES.with_borrow(|e| e[slot].clone()) {
        return Ok(engine);
    }
    let engine = Engine::new(wflash_conformance::harness_options(path, None))
        .await
        .map_err(js_error)?;
    // What escapes the engine's error scopes goes to the console, where the driver's log
    // (chromedriver --enable-chrome-logs) shows it.
    engine
        .device()
        .on_uncaptured_error(std::sync::Arc::new(|err: wflash::wgpu::Error| {
            console_error(&format!("wflash: uncaptured WebGPU error: {err}"));
        }));
    // Each pipeline build, so a build that takes the browser's GPU process down is named.
    engine.on_pipeline_build(|label| console_log(&format!("wflash: building {label}")));
    ENGINES.with_borrow_mut(|e| e[slot] = Some(engine.clone()));
    Ok(engine)
}

/// An error as the page's JavaScript sees it (a rejected promise with this message).
pub(crate) fn js_error(e: impl std::fmt::Display) -> JsValue {
    JsValue::from_str(&e.to_string())
}

/// `console.error(message)`.
pub(crate) fn console_error(message: &str) {
    console_call("error", message);
}

/// `console.log(message)`.
pub(crate) fn console_log(message: &str) {
    console_call("log", message);
}

fn console_call(method: &str, message: &str) {
    let console = js_sys::Reflect::get(&js_sys::global(), &JsValue::from_str("console"));
    let error = (console.as_ref().ok())
        .and_then(|c| js_sys::Reflect::get(c, &JsValue::from_str(method)).ok());
    if let (Ok(console), Some(method)) = (console, error)
        && let Some(method) = wasm_bindgen::JsCast::dyn_ref::<js_sys::Function>(&method)
    {
        let _ = method.call1(&console, &JsValue::from_str(message));
    }
}
