//! One wflash engine per burn device, on that device's own wgpu device and queue.

use std::sync::Mutex;

use burn::tensor::Device;

use crate::{Error, Result};

/// Registered engines. A handful of devices at most: a list, compared with burn's device
/// equality (which ignores the autodiff setting, so one entry serves both).
static ENGINES: Mutex<Vec<(Device, wflash::Engine)>> = Mutex::new(Vec::new());

/// Creates burn's wgpu device and a wflash engine on the same wgpu device and queue, and
/// registers the engine for it. Returns burn's device (call `.autodiff()` on it to train).
///
/// burn picks the adapter (its default device); call this before anything else uses burn's
/// default wgpu device, since burn's runtime cannot be initialised twice.
pub fn init(options: wflash::EngineOptions) -> Result<Device> {
    let (device, setup) = Device::wgpu_options()
        .init_with_setup()
        .map_err(|e| Error::Device(e.to_string()))?;
    let engine = wflash::Engine::from_device(setup.device, setup.queue, options)?;
    register(&device, engine);
    Ok(device)
}

/// Registers `engine` for burn's `device`; the engine must be on the device's own wgpu
/// device and queue (burn's `Device::wgpu_options().setup(...)` with the handles the engine
/// was made from, or [`wflash::Engine::from_device`] on the handles burn returned). Replaces
/// an engine registered before for the device.
pub fn register(device: &Device, engine: wflash::Engine) {
    let mut engines = ENGINES.lock().unwrap_or_else(|e| e.into_inner());
    engines.retain(|(d, _)| d != device);
    engines.push((device.clone(), engine));
}

/// The engine registered for `device`.
pub fn engine(device: &Device) -> Result<wflash::Engine> {
    let engines = ENGINES.lock().unwrap_or_else(|e| e.into_inner());
    engines
        .iter()
        .find(|(d, _)| d == device)
        .map(|(_, e)| e.clone())
        .ok_or_else(|| Error::NoEngine {
            device: format!("{device:?}"),
        })
}
