//! Checking that greedy Medusa is lossless: every emitted token must be the base model's greedy
//! choice at its position.
//!
//! In exact arithmetic greedy Medusa reproduces greedy decoding token for token, and in f32 it
//! does in practice. In bf16 it cannot: a tree step multiplies 64 rows where a decode step
//! multiplies one, the two round differently, and where the top two logits are within a unit in
//! the last place or two, the paths can pick different tokens, after which the texts differ. So
//! outputs are scored teacher-forced: one forward over the prompt and the whole output gives, at
//! each position, the top logit and the logit of the token emitted there. A token passes when
//! its logit is within `tie_ulps` units in the last place (of the model's dtype) of the top one,
//! the unit taken at the position's largest logit magnitude: rounding moves every logit of a
//! row by about the same absolute amount (each is a product of the same hidden state, whose
//! error scales with its size), so a unit of the top logit itself would shrink the tolerance
//! to nothing where the top logit happens to be near zero. A bug in acceptance, the tree mask
//! or the KV-cache compaction emits tokens far below the top logit and fails; rounding does
//! not. Scoring plain greedy decoding the same way shows how far the teacher-forced forward and
//! the decode path are apart on their own.

use burn::tensor::{DType, Int, Tensor, TensorData, backend::Backend};
use kernels::FlashAttentionBackend;
use model::Llama;
use serde::Serialize;

use crate::{MedusaError, Result};

/// How far a token sequence is from greedy under one teacher-forced forward.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GreedyScore {
    /// Number of tokens scored (the whole output).
    pub tokens: usize,
    /// Tokens whose logit is below the top logit of their position.
    pub below_top: usize,
    /// Tokens more than the tolerance below the top logit.
    pub beyond_tolerance: usize,
    /// Largest top-logit minus token-logit.
    pub max_gap: f32,
    /// Largest gap in units in the last place of its position's largest logit magnitude, in
    /// the model's dtype (a maximum of its own: it may come from another token than
    /// `max_gap`).
    pub max_gap_ulps: f32,
    /// The largest logit magnitude (the unit's base) at the position of `max_gap_ulps`: how
    /// coarse the tolerance was where the output came closest to failing it.
    pub max_gap_magnitude: f32,
}

/// Whether a greedy output ends as greedy decoding would end it: no stop token before the last
/// position, and either a stop token last or exactly `max_new_tokens` tokens. Token scores do
/// not see an output that stops early or runs long; this does.
pub fn well_terminated(tokens: &[u32], stop_tokens: &[u32], max_new_tokens: usize) -> bool {
    let Some((last, before)) = tokens.split_last() else {
        return max_new_tokens == 0;
    };
    tokens.len() <= max_new_tokens
        && !before.iter().any(|t| stop_tokens.contains(t))
        && (stop_tokens.contains(last) || tokens.len() == max_new_tokens)
}

/// Mantissa bits of a float dtype (what one unit in the last place is relative to).
pub fn mantissa_bits(dtype: DType) -> i32 {
    match dtype {
        DType::BF16 => 7,
        DType::F16 => 10,
        DType::F64 => 52,
        _ => 23,
    }
}

/// One unit in the last place of `x` in a float format with `mantissa` bits (`x`'s binade
/// taken from its f32 exponent bits, so values just below a power of two stay in their binade;
/// subnormals count as the smallest normal binade).
pub fn ulp(x: f32, mantissa: i32) -> f32 {
    let binade = f32::from_bits(x.abs().to_bits() & 0x7f80_0000).max(f32::MIN_POSITIVE);
    binade * 2f32.powi(-mantissa)
}

/// Scores `tokens` (generated after `prompt`) teacher-forced, with a tolerance of `tie_ulps`
/// units in the last place of each position's largest logit magnitude. Reductions run on the
/// device; three floats per token come back.
pub fn greedy_score<B: FlashAttentionBackend>(
    model: &Llama<B>,
    prompt: &[u32],
    tokens: &[u32],
    tie_ulps: f32,
) -> Result<GreedyScore> {
    let n = tokens.len();
    if n == 0 {
        return Ok(GreedyScore::default());
    }
    if prompt.is_empty() {
        return Err(MedusaError::Check("empty prompt".into()));
    }
    let sequence: Vec<u32> = prompt.iter().chain(&tokens[..n - 1]).copied().collect();
    let logits = model.forward_full(&sequence)?;
    let [_, len, vocab] = logits.dims();
    // Row i predicts tokens[i]: the rows from the prompt's last position on.
    let rows = logits
        .slice([0..1, prompt.len() - 1..len, 0..vocab])
        .reshape([n, vocab]);
    let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [n, 1]), &rows.device());
    let chosen = host_f32(rows.clone().gather(1, ids))?;
    let top = host_f32(rows.clone().max_dim(1))?;
    // Over the finite logits: a masked (-inf) entry says nothing about the row's rounding.
    let abs = rows.abs();
    let magnitude = host_f32(abs.clone().mask_fill(abs.is_inf(), 0.0).max_dim(1))?;
    Ok(score_positions(
        &chosen,
        &top,
        &magnitude,
        mantissa_bits(model.dtype()),
        tie_ulps,
    ))
}

/// Scores positions from their emitted token's logit (`chosen`), top logit (`top`) and largest
/// logit magnitude (`magnitude`), with a tolerance of `tie_ulps` units in the last place of the
/// magnitude in a format with `mantissa` bits.
pub fn score_positions(
    chosen: &[f32],
    top: &[f32],
    magnitude: &[f32],
    mantissa: i32,
    tie_ulps: f32,
) -> GreedyScore {
    let mut score = GreedyScore {
        tokens: chosen.len(),
        ..Default::default()
    };
    for ((&c, &t), &m) in chosen.iter().zip(top).zip(magnitude) {
        let gap = t - c;
        let unit = ulp(m, mantissa);
        score.below_top += usize::from(gap > 0.0);
        // A NaN logit counts as beyond the tolerance, and so does a gap under a magnitude that
        // is not finite (its unit would excuse any gap; `greedy_score` passes finite ones).
        score.beyond_tolerance +=
            usize::from(gap.is_nan() || (gap > 0.0 && (!m.is_finite() || gap > tie_ulps * unit)));
        score.max_gap = score.max_gap.max(gap);
        if gap / unit > score.max_gap_ulps {
            score.max_gap_ulps = gap / unit;
            score.max_gap_magnitude = m;
        }
    }
    score
}

fn host_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f32>> {
    t.cast(DType::F32)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| MedusaError::Check(format!("reading scores: {e:?}")))
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use model::{GenerationConfig, LlamaConfig, LoadOptions, generate, generate::last_logits};

    use super::*;

    #[test]
    fn ulps_follow_the_dtype() {
        assert_eq!(ulp(20.0, mantissa_bits(DType::BF16)), 0.125);
        assert_eq!(ulp(-20.0, mantissa_bits(DType::BF16)), 0.125);
        assert_eq!(ulp(1.0, mantissa_bits(DType::F16)), 2f32.powi(-10));
        assert_eq!(ulp(1.5, mantissa_bits(DType::F32)), f32::EPSILON);
        // Just below a power of two: the lower binade (log2 would round up to 4).
        let below_16 = f32::from_bits(16f32.to_bits() - 1);
        assert_eq!(ulp(below_16, mantissa_bits(DType::BF16)), 0.0625);
        assert_eq!(ulp(16.0, mantissa_bits(DType::BF16)), 0.125);
    }

    /// The unit is the row's largest logit magnitude, not the top logit: a 0.29 gap under a top
    /// logit of 1.5 (37 bf16 ulps of 1.5, the size of a gap that failed an H200 run) passes in
    /// a row whose logits reach -20 (2.3 ulps of 20); a whole logit below the top does not.
    #[test]
    fn tolerance_scales_with_the_row() {
        let bf16 = mantissa_bits(DType::BF16);
        let near = score_positions(&[1.5 - 0.2890625], &[1.5], &[20.0], bf16, 4.0);
        assert_eq!((near.below_top, near.beyond_tolerance), (1, 0), "{near:?}");
        assert_eq!((near.max_gap_ulps, near.max_gap_magnitude), (2.3125, 20.0));
        let far = score_positions(&[0.5, 3.0], &[1.5, 3.0], &[20.0, 20.0], bf16, 4.0);
        assert_eq!((far.tokens, far.below_top, far.beyond_tolerance), (2, 1, 1));
        assert_eq!(far.max_gap, 1.0);
        let nan = score_positions(&[f32::NAN], &[1.5], &[20.0], bf16, 4.0);
        assert_eq!(nan.beyond_tolerance, 1);
        let inf = score_positions(&[1.0, 1.5], &[1.5, 1.5], &[f32::INFINITY; 2], bf16, 4.0);
        assert_eq!((inf.below_top, inf.beyond_tolerance), (1, 1), "{inf:?}");
    }

    #[test]
    fn termination_follows_greedy_decoding() {
        let stop = [2];
        assert!(well_terminated(&[5, 6, 2], &stop, 8), "stopped");
        assert!(well_terminated(&[5, 6, 7], &stop, 3), "ran to the limit");
        assert!(
            !well_terminated(&[5, 6, 7], &stop, 8),
            "stopped early without a stop token"
        );
        assert!(
            !well_terminated(&[5, 2, 7], &stop, 3),
            "ran past a stop token"
        );
        assert!(!well_terminated(&[5, 6, 7, 8], &stop, 3), "ran long");
        assert!(well_terminated(&[], &stop, 0) && !well_terminated(&[], &stop, 4));
    }

    /// Greedy tokens pass and a token swapped for the one the model ranks lowest fails: the
    /// check tells a decoding bug from rounding.
    #[test]
    fn greedy_score_tells_greedy_from_not() {
        let config = LlamaConfig::from_json(
            r#"{"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 128}"#,
        )
        .unwrap();
        let device = Default::default();
        let model = Llama::<Flex>::random(config, 7, &LoadOptions::default(), &device).unwrap();
        let prompt = [3, 14, 15, 92, 65];
        let config = GenerationConfig {
            max_new_tokens: 12,
            ..Default::default()
        };
        let tokens = generate(&model, &prompt, &config, |_| {}).unwrap().tokens;
        assert_eq!(tokens.len(), 12);
        let greedy = greedy_score(&model, &prompt, &tokens, 64.0).unwrap();
        assert_eq!(greedy.tokens, 12);
        assert_eq!(greedy.beyond_tolerance, 0, "{greedy:?}");

        let mut wrong = tokens.clone();
        let context: Vec<u32> = prompt.iter().chain(&tokens[..6]).copied().collect();
        let logits = host_f32(last_logits(model.forward_full(&context).unwrap())).unwrap();
        let lowest = (0..logits.len())
            .min_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap();
        wrong[6] = lowest as u32;
        let score = greedy_score(&model, &prompt, &wrong, 64.0).unwrap();
        assert!(score.beyond_tolerance >= 1, "{score:?}");
        assert!(
            score.max_gap > 0.0 && score.max_gap_ulps > 64.0,
            "{score:?}"
        );
        assert!(greedy_score(&model, &[], &tokens, 4.0).is_err());
    }
}
