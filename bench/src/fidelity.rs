//! The model on this backend against Hugging Face transformers' outputs (the committed
//! fixtures of `scripts/make_fixtures.py`), in f32 and bf16: same prompt tokens, same top-5
//! next-token ids, top-1 logit close, same 20-token greedy continuation (bf16 may diverge late;
//! where it does is reported).

use std::fmt::Write as _;

use anyhow::Result;
use burn::tensor::DType;
use kernels::FlashAttentionBackend;
use model::{
    GenerationConfig, Llama, LoadOptions, Message, Tokenizer, generate, generate::last_logits,
};
use serde::Serialize;

const FIXTURE: &str = include_str!("../../tests/fixtures/smollm2_reference.json");

#[derive(Debug, Clone, Serialize)]
pub struct FidelityCase {
    pub dtype: String,
    pub prompt: String,
    pub input_ids_match: bool,
    pub top5_match: bool,
    pub top1_logit: f64,
    pub top1_logit_reference: f64,
    pub top1_rel_err: f64,
    pub greedy_match: bool,
    /// First position where the greedy continuation differs from transformers'.
    pub first_divergence: Option<usize>,
}

pub fn run<B: FlashAttentionBackend>(
    dir: &std::path::Path,
    device: &B::Device,
) -> Result<Vec<FidelityCase>> {
    let reference: serde_json::Value = serde_json::from_str(FIXTURE)?;
    let tokenizer = Tokenizer::from_dir(dir)?;
    let mut out = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        let model = Llama::<B>::load(dir, &LoadOptions::default().with_dtype(dtype), device)?;
        for case in reference["chat"].as_array().expect("chat cases") {
            let prompt = case["prompt"].as_str().unwrap_or_default();
            let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone())?;
            let top5: Vec<u32> = serde_json::from_value(case["top5_ids"].clone())?;
            let top5_logits: Vec<f64> = serde_json::from_value(case["top5_logits"].clone())?;
            let greedy: Vec<u32> = serde_json::from_value(case["greedy_ids"].clone())?;
            let ours_ids = tokenizer.encode_chat(&[Message::user(prompt)])?;
            let logits: Vec<f32> = last_logits(model.forward_full(&ids)?)
                .cast(DType::F32)
                .into_data()
                .to_vec()
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let mut order: Vec<usize> = (0..logits.len()).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
            let ours_top5: Vec<u32> = order[..5].iter().map(|&i| i as u32).collect();
            let config = GenerationConfig {
                max_new_tokens: greedy.len(),
                ..Default::default()
            };
            let continuation = generate(&model, &ids, &config, |_| {})?.tokens;
            let first_divergence = continuation.iter().zip(&greedy).position(|(a, b)| a != b);
            let top1 = logits[order[0]] as f64;
            out.push(FidelityCase {
                dtype: crate::kernel::dtype_name(dtype).into(),
                prompt: prompt.into(),
                input_ids_match: ours_ids == ids,
                top5_match: ours_top5 == top5,
                top1_logit: top1,
                top1_logit_reference: top5_logits[0],
                top1_rel_err: (top1 - top5_logits[0]).abs() / top5_logits[0].abs(),
                greedy_match: first_divergence.is_none(),
                first_divergence,
            });
        }
    }
    Ok(out)
}

pub fn markdown(cases: &[FidelityCase], device: &str, source: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Fidelity against transformers on {device}\n");
    let _ = writeln!(
        s,
        "Reference: {source}. Each prompt is chat-formatted; top-5 ids and the top-1 logit are at the last prompt position; the continuation is 20 greedy tokens.\n"
    );
    let _ = writeln!(
        s,
        "| dtype | prompt | ids | top-5 | top-1 logit (ours / ref, rel. err) | greedy 20 |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for c in cases {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.4} / {:.4} ({:.1e}) | {} |",
            c.dtype,
            c.prompt,
            if c.input_ids_match { "equal" } else { "DIFFER" },
            if c.top5_match { "equal" } else { "DIFFER" },
            c.top1_logit,
            c.top1_logit_reference,
            c.top1_rel_err,
            match c.first_divergence {
                None => "equal".to_string(),
                Some(i) => format!("diverges at token {i}"),
            }
        );
    }
    s
}
