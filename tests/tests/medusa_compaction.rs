//! Greedy Medusa on the CubeCL backend (wgpu; lavapipe on a CPU-only machine) gives exactly
//! the greedy autoregressive output in f32 on the real SmolLM2, over steps that accept several
//! speculated tokens: there the KV rows of the accepted path move into place through
//! `kernels::cache_gather`'s in-place kernel (the CPU backends run its reference), and the
//! tree's q/k/v rows go through the one-launch RoPE + cache write.

use burn::backend::wgpu::{CubeBackend, WgpuRuntime};
use medusa::{MedusaDecoder, MedusaTree};
use model::{Llama, LoadOptions, Message, Tokenizer};
use tests::{decode_both, default_model_dir, untrained_heads};

type Cube = CubeBackend<WgpuRuntime, f32, i32, u32>;

#[test]
fn medusa_on_cubecl_accepts_several_tokens_and_stays_exact() {
    let dir = default_model_dir();
    let device = Default::default();
    let model = Llama::<Cube>::load(&dir, &LoadOptions::default(), &device).unwrap();
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    // Untrained heads copy the base LM head: each guesses the current next token again, so the
    // tree's first-choice chain accepts where the text repeats a token, as this prompt's digits
    // do (the tokenizer splits digits; seen: steps accepting 2 and 3 speculated tokens).
    let heads = untrained_heads(&model, 4);
    // The paper's 63-node tree: its depth-1 nodes [0]..[9] come first, so a step accepting two
    // or more speculated tokens commits nodes 0, 1 and one past 10: rows that must move down in
    // the cache (a pure chain would keep them in place and move nothing).
    let tree = MedusaTree::named_or_json("mc_sim_7b_63", 4).unwrap();
    let decoder = MedusaDecoder::new(&model, &heads, tree).unwrap();
    let prompt = "Write the number one followed by forty zeros, in digits only.";
    let ids = tokenizer.encode_chat(&[Message::user(prompt)]).unwrap();
    let (ar, md) = decode_both(&model, &decoder, &ids, 24, &[], |_| {});
    eprintln!(
        "{:?}; accepted per step {:?}",
        tokenizer.decode(&ar),
        md.accept_lengths
    );
    assert_eq!(md.tokens, ar);
    assert!(
        md.accept_lengths.iter().any(|&a| a >= 2),
        "no step accepted two speculated tokens (so no KV row moved): {:?}",
        md.accept_lengths
    );
}
