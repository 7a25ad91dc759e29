//! The Medusa heads' residual blocks computed together (`MedusaHeads::forward_stacked`, what a
//! decoding step runs) against each head's own blocks (`MedusaHeads::forward`, through
//! `kernels::linear`), on the CPU (Flex) and on a CubeCL backend (wgpu), where the stacked
//! path's product is Burn's broadcast batched matmul. The decoding tests use untrained heads,
//! whose blocks are zero and would hide a wrong product; here every block is a fresh random
//! draw, two per head, with own and with shared vocabulary projections.

use burn::{
    backend::wgpu::{CubeBackend, WgpuRuntime},
    module::Param,
    tensor::{Distribution, Tensor, backend::Backend},
};
use kernels::LinearBackend;
use medusa::{MedusaConfig, MedusaHeads};
use model::llama::Proj;
use tests::Cpu;

type Cube = CubeBackend<WgpuRuntime, f32, i32, u32>;

fn random<B: Backend>(shape: [usize; 2], std: f64, device: &B::Device) -> Tensor<B, 2> {
    Tensor::random(shape, Distribution::Normal(0.0, std), device)
}

/// `num_heads` heads of two random blocks each over hidden size `h` and a `vocab`-wide base LM
/// head (weights drawn at `scale`, biases at `bias_std`): per `share_lm_head` (false, then
/// true), the logits of `forward` and of `forward_stacked`, flattened.
fn both_paths<B: LinearBackend>(
    device: &B::Device,
    num_heads: usize,
    h: usize,
    vocab: usize,
    scale: f64,
    bias_std: f64,
) -> Vec<(Vec<f32>, Vec<f32>)> {
    let base = Proj {
        weight: Param::from_tensor(random::<B>([h, vocab], scale, device)),
        bias: None,
    };
    [false, true]
        .into_iter()
        .map(|share_lm_head| {
            let config = MedusaConfig {
                num_heads,
                num_layers: 2,
                hidden_size: h,
                vocab_size: vocab,
                share_lm_head,
            };
            let mut heads = MedusaHeads::init(&config, &base);
            for head in &mut heads.heads {
                for block in &mut head.blocks {
                    block.linear.weight = Param::from_tensor(random([h, h], scale, device));
                    block.linear.bias = Some(Param::from_tensor(
                        random([1, h], bias_std, device).reshape([h]),
                    ));
                }
                if let Some(p) = &mut head.lm_head {
                    p.weight = Param::from_tensor(random([h, vocab], scale, device));
                }
            }
            let hidden = random::<B>([1, h], 1.0, device).reshape([1, 1, h]);
            let want = heads
                .forward(hidden.clone(), &base)
                .into_data()
                .to_vec()
                .unwrap();
            let stacked = heads.stack_blocks().expect("uniform blocks with biases");
            let got = heads.forward_stacked(&stacked, hidden, &base);
            assert_eq!(got.dims(), [num_heads, vocab]);
            (want, got.into_data().to_vec().unwrap())
        })
        .collect()
}

#[test]
fn stacked_blocks_match_the_heads_on_the_cpu() {
    for (share_lm_head, (want, got)) in
        [false, true]
            .into_iter()
            .zip(both_paths::<Cpu>(&Default::default(), 3, 16, 40, 0.3, 0.3))
    {
        let max_err = want
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(max_err < 1e-4, "share_lm_head {share_lm_head}: {max_err}");
    }
}

#[test]
fn stacked_blocks_match_the_heads_on_wgpu() {
    // SmolLM2's hidden size.
    let h = 576;
    let scale = 1.0 / (h as f64).sqrt();
    for (share_lm_head, (want, got)) in [false, true].into_iter().zip(both_paths::<Cube>(
        &Default::default(),
        4,
        h,
        1000,
        scale,
        0.5,
    )) {
        let norm = want.iter().map(|v| v * v).sum::<f32>().sqrt();
        let diff = want
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f32>()
            .sqrt();
        assert!(
            diff / norm < 1e-5,
            "share_lm_head {share_lm_head}: relative L2 error {}",
            diff / norm
        );
    }
}

#[test]
fn blocks_without_a_bias_are_not_stacked() {
    let device = Default::default();
    let (h, vocab) = (16, 40);
    let base = Proj {
        weight: Param::from_tensor(random::<Cpu>([h, vocab], 0.3, &device)),
        bias: None,
    };
    let config = MedusaConfig {
        num_heads: 2,
        num_layers: 1,
        hidden_size: h,
        vocab_size: vocab,
        share_lm_head: false,
    };
    let mut heads = MedusaHeads::init(&config, &base);
    heads.heads[1].blocks[0].linear.bias = None;
    assert!(heads.stack_blocks().is_none());
}
