//! What the kernel test binaries share: the runtime they run on, dtype rounding, the error
//! measure and the device's dtype support.

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use burn::tensor::{DType, Tensor, TensorData, backend::Backend};
use cubecl::Runtime as _;
use rand::{Rng, rngs::StdRng};

/// The CubeCL runtime the kernel tests run on: wgpu by default.
#[cfg(not(feature = "cuda"))]
pub mod runtime {
    pub use burn::backend::wgpu::{WgpuDevice as Device, WgpuRuntime as Runtime};
    /// Burn's bool element on wgpu.
    pub type BoolElem = u32;
    /// Burn's backend alias for this runtime (fused or not, following Burn's `fusion` feature).
    pub type Alias = burn::backend::Wgpu;
    pub const NAME: &str = "wgpu";
}

/// The CubeCL runtime the kernel tests run on: CUDA with `--features cuda`.
#[cfg(feature = "cuda")]
pub mod runtime {
    pub use cubecl::cuda::{CudaDevice as Device, CudaRuntime as Runtime};
    /// Burn's bool element on CUDA (`burn::backend::Cuda` uses `u8`).
    pub type BoolElem = u8;
    /// Burn's backend alias for this runtime (fused or not, following Burn's `fusion` feature).
    pub type Alias = burn::backend::Cuda;
    pub const NAME: &str = "cuda";
}

use runtime::{Device, Runtime};

pub fn round_f32(x: f32) -> f32 {
    x
}
pub fn round_f16(x: f32) -> f32 {
    burn::tensor::f16::from_f32(x).to_f32()
}
pub fn round_bf16(x: f32) -> f32 {
    burn::tensor::bf16::from_f32(x).to_f32()
}

/// Relative L2 error ‖out − reference‖ / ‖reference‖ (infinite when `out` has a NaN).
pub fn rel_l2(out: &[f32], reference: &[f64]) -> f64 {
    assert_eq!(out.len(), reference.len());
    let (mut num, mut den) = (0.0, 0.0);
    for (&o, &r) in out.iter().zip(reference) {
        num += (o as f64 - r).powi(2);
        den += r * r;
    }
    if num.is_nan() {
        return f64::INFINITY;
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Whether the test device supports `dtype`. On wgpu a missing half type skips the test (with a
/// note); on CUDA f16 and bf16 are required, so a missing one fails it.
pub fn supports(dtype: DType) -> bool {
    let client = Runtime::client(&Device::default());
    let ok = client
        .properties()
        .supports_type(cubecl::ir::StorageType::from(dtype));
    if cfg!(feature = "cuda") {
        assert!(ok, "the CUDA device does not support {dtype:?}");
    } else if !ok {
        println!(
            "skipping: the {} device does not support {dtype:?}",
            runtime::NAME
        );
    }
    ok
}

/// Uniform in [-1, 1) but never exactly zero (and non-zero after rounding to f16/bf16), rounded
/// with `round` to the tested dtype.
pub fn draw(rng: &mut StdRng, len: usize, round: fn(f32) -> f32) -> Vec<f32> {
    (0..len)
        .map(|_| {
            let v: f32 = rng.random_range(-1.0f32..1.0);
            let v = if v.abs() < 1e-3 { 0.5 } else { v };
            round(v)
        })
        .collect()
}

/// Host values as a device tensor of `shape` in `dtype`.
pub fn tensor<B: Backend, const D: usize>(
    data: &[f32],
    shape: [usize; D],
    dtype: DType,
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::<B, D>::from_data(TensorData::new(data.to_vec(), shape), device).cast(dtype)
}

/// A device tensor's values as f32 on the host.
pub fn read<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.cast(DType::F32).into_data().to_vec::<f32>().unwrap()
}

/// Fails with `what` when the relative L2 error of `got` against `expected` exceeds `tol`.
pub fn assert_close(what: &str, got: &[f32], expected: &[f64], tol: f64) {
    let err = rel_l2(got, expected);
    assert!(err <= tol, "{what}: rel L2 error {err:e} > {tol:e}");
}
