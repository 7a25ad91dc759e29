//! Fused projections (q/k/v and gate/up concatenated at load time, the default) compute what
//! the checkpoint's separate matrices compute: same logits on the CPU backend and on the CubeCL
//! path (wgpu), where the fused output is split into strided views before RoPE, the cache and
//! the attention kernel; biases included.

use burn::{
    backend::wgpu::{CubeBackend, WgpuRuntime},
    tensor::DType,
};
use kernels::FlashAttentionBackend;
use model::{Llama, LoadOptions};
use tests::{
    Cpu,
    tiny::{self, temp_dir, write_dir},
};

type Cube = CubeBackend<WgpuRuntime, f32, i32, u32>;

/// Prefill then two single-token steps through the cache, all logits.
fn logits<B: FlashAttentionBackend>(dir: &std::path::Path, fuse: bool) -> Vec<f32> {
    let device = Default::default();
    let options = LoadOptions::default().with_fuse_projections(fuse);
    let model = Llama::<B>::load(dir, &options, &device).unwrap();
    let layer = &model.module.model.layers[0];
    assert_eq!(layer.self_attn.qkv_proj.is_fused(), fuse);
    assert_eq!(layer.mlp.gate_up_proj.is_fused(), fuse);
    let mut cache = model.new_cache(1, 16);
    let mut out = Vec::new();
    for ids in [&[1u32, 5, 7, 3][..], &[9], &[4]] {
        let logits = model.forward(model.tokens(ids, 1), &mut cache).unwrap();
        out.extend(logits.cast(DType::F32).into_data().to_vec::<f32>().unwrap());
    }
    out
}

fn assert_close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    let (num, den) = a.iter().zip(b).fold((0.0f64, 0.0f64), |(n, d), (&x, &y)| {
        (n + ((x - y) as f64).powi(2), d + (y as f64).powi(2))
    });
    let rel = (num / den).sqrt();
    assert!(rel <= 1e-5, "fused vs apart: relative L2 {rel:e}");
}

fn checkpoint(tag: &str) -> std::path::PathBuf {
    let mut config = tiny::config();
    config.attention_bias = true;
    config.mlp_bias = true;
    let dir = temp_dir(tag);
    write_dir(&dir, &config);
    dir
}

#[test]
fn fused_projections_match_separate_on_cpu() {
    let dir = checkpoint("fuse-cpu");
    assert_close(&logits::<Cpu>(&dir, true), &logits::<Cpu>(&dir, false));
}

#[test]
fn fused_projections_match_separate_on_cubecl() {
    let dir = checkpoint("fuse-cube");
    let fused = logits::<Cube>(&dir, true);
    assert_close(&fused, &logits::<Cube>(&dir, false));
    // And the kernel path agrees with the CPU reference.
    assert!(fused.iter().all(|v| v.is_finite()));
    let cpu = logits::<Cpu>(&dir, false);
    let rel = {
        let (n, d) = fused
            .iter()
            .zip(&cpu)
            .fold((0.0f64, 0.0f64), |(n, d), (&x, &y)| {
                (n + ((x - y) as f64).powi(2), d + (y as f64).powi(2))
            });
        (n / d).sqrt()
    };
    assert!(rel <= 1e-4, "CubeCL vs CPU: relative L2 {rel:e}");
}
