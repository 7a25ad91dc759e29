//! The Medusa heads' residual blocks computed together (`MedusaHeads::forward_stacked`, what a
//! decoding step runs) against each head's own blocks (`MedusaHeads::forward`, through
//! `kernels::linear`) on a CubeCL backend (wgpu), where the stacked path's product is Burn's
//! broadcast batched matmul. The decoding tests use untrained heads, whose blocks are zero and
//! would hide a wrong product; here every block is a fresh random draw, two per head, at
//! SmolLM2's hidden size.

use burn::{
    backend::wgpu::{CubeBackend, WgpuRuntime},
    module::Param,
    tensor::{Distribution, Tensor},
};
use medusa::{MedusaConfig, MedusaHeads};
use model::llama::Proj;

type Cube = CubeBackend<WgpuRuntime, f32, i32, u32>;

#[test]
fn stacked_blocks_match_the_heads_on_wgpu() {
    let device = Default::default();
    let (h, vocab) = (576, 1000);
    let scale = 1.0 / (h as f64).sqrt();
    let random = |shape: [usize; 2], std: f64| {
        Tensor::<Cube, 2>::random(shape, Distribution::Normal(0.0, std), &device)
    };
    let base = Proj {
        weight: Param::from_tensor(random([h, vocab], scale)),
        bias: None,
    };
    for share_lm_head in [false, true] {
        let config = MedusaConfig {
            num_heads: 4,
            num_layers: 2,
            hidden_size: h,
            vocab_size: vocab,
            share_lm_head,
        };
        let mut heads = MedusaHeads::init(&config, &base);
        for head in &mut heads.heads {
            for block in &mut head.blocks {
                block.linear.weight = Param::from_tensor(random([h, h], scale));
                block.linear.bias = Some(Param::from_tensor(random([1, h], 0.5).reshape([h])));
            }
            if let Some(p) = &mut head.lm_head {
                p.weight = Param::from_tensor(random([h, vocab], scale));
            }
        }
        let hidden = random([1, h], 1.0).reshape([1, 1, h]);
        let want: Vec<f32> = heads
            .forward(hidden.clone(), &base)
            .into_data()
            .to_vec()
            .unwrap();
        let stacked = heads.stack_blocks().expect("uniform blocks with biases");
        let got = heads.forward_stacked(&stacked, hidden, &base);
        assert_eq!(got.dims(), [4, vocab]);
        let got: Vec<f32> = got.into_data().to_vec().unwrap();
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
