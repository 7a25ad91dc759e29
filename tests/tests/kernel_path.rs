//! The real model with the CubeCL attention kernel (wgpu runtime; lavapipe on a CPU-only
//! machine) against transformers: prefill through the tiled kernel, decode steps through the
//! split-KV kernel, Medusa's tree through the masked path.

use burn::{
    backend::wgpu::{CubeBackend, WgpuRuntime},
    tensor::DType,
};
use medusa::{AcceptMode, DecodeConfig, MedusaDecoder, MedusaTree};
use model::{GenerationConfig, Llama, LoadOptions, generate, generate::last_logits};
use tests::{default_model_dir, fixture};

type Cube = CubeBackend<WgpuRuntime, f32, i32, u32>;

#[test]
fn real_model_on_cubecl_kernel_matches_transformers() {
    let dir = default_model_dir();
    let device = Default::default();
    let model = Llama::<Cube>::load(&dir, &LoadOptions::default(), &device).unwrap();
    let reference = fixture("smollm2_reference.json");
    let case = &reference["chat"][0];
    let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
    let top5: Vec<u32> = serde_json::from_value(case["top5_ids"].clone()).unwrap();
    let top1: f64 = case["top5_logits"][0].as_f64().unwrap();
    let greedy: Vec<u32> = serde_json::from_value(case["greedy_ids"].clone()).unwrap();

    let logits: Vec<f32> = last_logits(model.forward_full(&ids).unwrap())
        .cast(DType::F32)
        .into_data()
        .to_vec()
        .unwrap();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    assert_eq!(
        order[..5].iter().map(|&i| i as u32).collect::<Vec<_>>(),
        top5
    );
    assert!((logits[order[0]] as f64 - top1).abs() / top1.abs() <= 1e-3);

    let n = 8;
    let out = generate(
        &model,
        &ids,
        &GenerationConfig {
            max_new_tokens: n,
            ..Default::default()
        },
        |_| {},
    )
    .unwrap();
    assert_eq!(out.tokens, greedy[..n]);

    let heads = tests::untrained_heads(&model, 2);
    let tree = MedusaTree::new(&[vec![0], vec![1], vec![0, 0], vec![0, 1], vec![1, 0]], 2).unwrap();
    let decoder = MedusaDecoder::new(&model, &heads, tree).unwrap();
    let md = decoder
        .generate(
            &ids,
            &DecodeConfig {
                max_new_tokens: n,
                stop_tokens: vec![],
                mode: AcceptMode::Greedy,
            },
            |_| {},
        )
        .unwrap();
    assert_eq!(md.tokens, greedy[..n]);
}
