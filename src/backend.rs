//! Backend choice at run time: `--device flex|wgpu|cuda` maps to a Burn [`Device`]; a backend
//! not compiled into this binary is an error that says which cargo feature to build with.
//!
//! Try it: `rewire forward models/tiny-sd --device wgpu ...` (needs `--features wgpu`).

use burn::tensor::Device;

/// Errors raised while choosing a device.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(
        "backend `{name}` is not compiled into this rewire\n  hint: rebuild with `cargo build --release --features {name}`"
    )]
    NotCompiled { name: String },
    #[error("unknown device `{name}`\n  hint: use one of: flex (CPU, default), wgpu, cuda")]
    Unknown { name: String },
}

/// The backends this build was compiled with.
pub fn compiled() -> Vec<&'static str> {
    let mut v = Vec::new();
    if cfg!(feature = "flex") {
        v.push("flex");
    }
    if cfg!(feature = "wgpu") {
        v.push("wgpu");
    }
    if cfg!(feature = "cuda") {
        v.push("cuda");
    }
    v
}

/// Parses a device name (`flex`, `cpu` as an alias of flex, `wgpu`, `cuda`, `cuda:N`).
pub fn device(name: &str) -> Result<Device, BackendError> {
    let not = || BackendError::NotCompiled {
        name: name.split(':').next().unwrap_or(name).to_string(),
    };
    match name {
        "flex" | "cpu" => {
            #[cfg(feature = "flex")]
            return Ok(Device::flex());
            #[cfg(not(feature = "flex"))]
            return Err(not());
        }
        "wgpu" => {
            #[cfg(feature = "wgpu")]
            return Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice));
            #[cfg(not(feature = "wgpu"))]
            return Err(not());
        }
        n if n == "cuda" || n.starts_with("cuda:") => {
            #[cfg(feature = "cuda")]
            {
                let idx: usize = n
                    .strip_prefix("cuda:")
                    .map(|s| s.parse().unwrap_or(0))
                    .unwrap_or(0);
                return Ok(Device::cuda(idx));
            }
            #[cfg(not(feature = "cuda"))]
            return Err(not());
        }
        _ => Err(BackendError::Unknown {
            name: name.to_string(),
        }),
    }
}

/// The default device: the first compiled of flex, wgpu, cuda.
pub fn default_device() -> Result<Device, BackendError> {
    let first = compiled().first().copied().unwrap_or("flex");
    device(first)
}
