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
/// loaded (`/proc/driver/nvidia/version` or `/dev/nvidiactl`).
pub fn detect() -> DeviceKind {
    match std::env::var("BURN_DECODE_DEVICE").as_deref() {
        Ok("cpu") => return DeviceKind::Cpu,
        Ok("cuda") => return DeviceKind::Cuda,
        _ => {}
    }
    let driver = std::path::Path::new("/proc/driver/nvidia/version").exists()
        || std::path::Path::new("/dev/nvidiactl").exists();
    if driver {
        DeviceKind::Cuda
    } else {
        DeviceKind::Cpu
    }
}
