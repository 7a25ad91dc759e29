//! Picking a device at run time: CUDA when a driver and a GPU are present, else the CPU.
//!
//! Binaries are built with CUDA support everywhere (cudarc loads the driver lazily), so the
//! choice is made when they start. `BURN_DECODE_DEVICE=cpu|cuda` overrides the detection.

/// The kinds of device the binaries can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// The CPU.
    Cpu,
    /// An NVIDIA GPU through CUDA.
    Cuda,
}

/// CUDA if `BURN_DECODE_DEVICE=cuda`, the CPU if `=cpu`, else whether an NVIDIA driver is
/// loaded (`/proc/driver/nvidia/version` or `/dev/nvidiactl`) and, in builds with the `cuda`
/// feature, [`cuda_ready`] finds a GPU through it.
pub fn detect() -> DeviceKind {
    match std::env::var("BURN_DECODE_DEVICE").as_deref() {
        Ok("cpu") => return DeviceKind::Cpu,
        Ok("cuda") => return DeviceKind::Cuda,
        _ => {}
    }
    let driver = std::path::Path::new("/proc/driver/nvidia/version").exists()
        || std::path::Path::new("/dev/nvidiactl").exists();
    if driver && (cfg!(not(feature = "cuda")) || cuda_ready().is_ok()) {
        DeviceKind::Cuda
    } else {
        DeviceKind::Cpu
    }
}

/// The number of CUDA devices, or why none can be used: no driver library to load, a driver
/// that fails to initialise, no GPU, or a build without the `cuda` feature. Call it before
/// building a CUDA backend: that backend fails on a thread of its own, as a panic.
pub fn cuda_ready() -> Result<usize, String> {
    #[cfg(feature = "cuda")]
    {
        use cudarc::driver::{result, sys};
        // SAFETY: only tries to open the driver library (libloading); no CUDA call is made.
        if !unsafe { sys::is_culib_present() } {
            return Err(
                "the CUDA driver library (libcuda) cannot be loaded: no NVIDIA driver \
                        on this machine?"
                    .into(),
            );
        }
        result::init().map_err(|e| format!("the CUDA driver failed to initialise: {e:?}"))?;
        let count =
            result::device::get_count().map_err(|e| format!("counting CUDA devices: {e:?}"))?;
        if count < 1 {
            return Err("the CUDA driver reports no GPU".into());
        }
        Ok(count as usize)
    }
    #[cfg(not(feature = "cuda"))]
    Err("this build has no CUDA support (the `cuda` feature is off)".into())
}
