//! The Medusa-1 objective: head `k` (1-based) reads the hidden state at position `t` and predicts
//! the token at `t + 1 + k` (the base LM head predicts `t + 1`); the loss is
//! `Σ_k λ^(k−1) · CE_k` with `λ = 0.8`, counted only where the target is a response token.
//!
//! `CE_k` is against the response token itself (hard labels), or, with soft labels, the KL
//! divergence from the base model's own distribution for that token: the softmax of the base LM
//! head at position `t + k`, which is what predicts token `t + 1 + k`. The Medusa paper uses
//! such a distillation loss for the backbone in Medusa-2 (section 2.3.2); here it is offered
//! for the heads: they learn the whole ranking the model would make, not only its top choice,
//! which is more signal per position than a one-hot target when the data are few.

use burn::tensor::{
    DType, Int, Tensor, TensorData,
    activation::{log_softmax, softmax},
    backend::Backend,
};
use medusa::{MedusaHead, MedusaHeads};
use model::llama::Proj;
use model::{Llama, Result};

use crate::data::Example;

/// A batch of examples laid out for the backbone (right-padded tokens) and for the heads (the
/// positions they read and, per offset, the token they must predict there).
///
/// Right padding is harmless to a causal model: real positions never see the pad tokens after
/// them, and pad positions are never selected.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadBatch {
    /// Number of sequences (rows of `tokens`).
    pub batch: usize,
    /// Longest sequence of the batch.
    pub len: usize,
    /// `[batch, len]` row-major token ids, 0-padded.
    pub tokens: Vec<i64>,
    /// Selected positions as flat indices `row * len + t`: those where at least one offset has a
    /// response token to predict.
    pub rows: Vec<i64>,
    /// Target offsets: `1` is the base LM head, `1 + k` Medusa head `k`.
    pub offsets: Vec<usize>,
    /// `[offsets, rows]`: the token at `t + offset`, or 0 where there is none.
    pub targets: Vec<i64>,
    /// `[offsets, rows]`: 1 where the target exists and is a response token.
    pub mask: Vec<f32>,
    /// Valid targets per offset (the sums of `mask`).
    pub counts: Vec<usize>,
}

impl HeadBatch {
    /// Lays out `examples` for targets at `offsets` (e.g. `2..=K + 1` to train `K` heads).
    pub fn new(examples: &[&Example], offsets: &[usize]) -> Self {
        let batch = examples.len();
        let len = examples.iter().map(|e| e.len()).max().unwrap_or(0);
        let (lo, hi) = (
            *offsets.iter().min().expect("at least one offset"),
            *offsets.iter().max().expect("at least one offset"),
        );
        let mut tokens = vec![0i64; batch * len];
        let mut rows = Vec::new();
        let mut per_offset: Vec<Vec<(i64, f32)>> = vec![Vec::new(); offsets.len()];
        for (r, e) in examples.iter().enumerate() {
            let seq: Vec<u32> = e.tokens().collect();
            for (t, &id) in seq.iter().enumerate() {
                tokens[r * len + t] = id as i64;
            }
            // Targets must be response tokens: t + offset in [prompt, seq).
            let (p, n) = (e.prompt.len(), seq.len());
            let first = p.saturating_sub(hi);
            let last = n.saturating_sub(lo + 1);
            if n <= lo {
                continue;
            }
            for t in first..=last {
                rows.push((r * len + t) as i64);
                for (j, &o) in offsets.iter().enumerate() {
                    let target = t + o;
                    per_offset[j].push(if target >= p && target < n {
                        (seq[target] as i64, 1.0)
                    } else {
                        (0, 0.0)
                    });
                }
            }
        }
        let counts = per_offset
            .iter()
            .map(|v| v.iter().filter(|(_, m)| *m > 0.0).count())
            .collect();
        let (targets, mask) = per_offset.into_iter().flatten().unzip();
        Self {
            batch,
            len,
            tokens,
            rows,
            offsets: offsets.to_vec(),
            targets,
            mask,
            counts,
        }
    }

    /// Number of selected positions (`rows.len()`), the heads' batch dimension.
    pub fn num_rows(&self) -> usize {
        self.rows.len()
    }

    /// The same batch with the sequence length rounded up to a multiple of `multiple` and the
    /// number of selected rows up to a power of two (at least `multiple`; 0 or 1: unchanged).
    /// Extra rows read position 0 with mask 0, so the loss is the same; what changes is that
    /// batches come in few distinct shapes.
    ///
    /// Why: on CUDA every new shape costs kernel compilation and autotuning (seconds each), and
    /// without buckets nearly every batch of variable-length examples has a new shape. The
    /// backbone sees `[batch, len]` (a handful of length buckets); the heads see `[rows, ·]`,
    /// whose count varies most, hence the coarser power-of-two buckets (at most 2x the work of
    /// the heads, cheap next to a compilation).
    pub fn padded(self, multiple: usize) -> Self {
        if multiple <= 1 {
            return self;
        }
        let len = self.len.div_ceil(multiple).max(1) * multiple;
        let n = self.num_rows();
        let rows_out = n.next_power_of_two().max(multiple);
        let mut tokens = vec![0i64; self.batch * len];
        for r in 0..self.batch {
            tokens[r * len..r * len + self.len]
                .copy_from_slice(&self.tokens[r * self.len..(r + 1) * self.len]);
        }
        let old_len = self.len.max(1) as i64;
        let mut rows: Vec<i64> = self
            .rows
            .iter()
            .map(|&i| (i / old_len) * len as i64 + i % old_len)
            .collect();
        rows.resize(rows_out, 0);
        let mut targets = Vec::with_capacity(self.offsets.len() * rows_out);
        let mut mask = Vec::with_capacity(self.offsets.len() * rows_out);
        for j in 0..self.offsets.len() {
            targets.extend_from_slice(&self.targets[j * n..(j + 1) * n]);
            targets.resize((j + 1) * rows_out, 0);
            mask.extend_from_slice(&self.mask[j * n..(j + 1) * n]);
            mask.resize((j + 1) * rows_out, 0.0);
        }
        Self {
            len,
            tokens,
            rows,
            targets,
            mask,
            ..self
        }
    }

    /// Flat indices of the positions whose base-model distribution is the soft target of offset
    /// index `j`: `t + offset - 1` for row `t` (same sequence, since the target exists there),
    /// or the row itself where there is no target (masked out anyway).
    pub fn teacher_rows(&self, j: usize) -> Vec<i64> {
        let n = self.num_rows();
        let shift = self.offsets[j] as i64 - 1;
        self.rows
            .iter()
            .zip(&self.mask[j * n..(j + 1) * n])
            .map(|(&r, &m)| if m > 0.0 { r + shift } else { r })
            .collect()
    }

    /// Targets of offset index `j` as a `[rows]` tensor.
    pub fn targets_tensor<B: Backend>(&self, j: usize, device: &B::Device) -> Tensor<B, 1, Int> {
        let n = self.num_rows();
        let data = self.targets[j * n..(j + 1) * n].to_vec();
        Tensor::from_data(TensorData::new(data, [n]), device)
    }

    /// Mask of offset index `j` as a `[rows]` tensor.
    pub fn mask_tensor<B: Backend>(&self, j: usize, device: &B::Device) -> Tensor<B, 1> {
        let n = self.num_rows();
        let data = self.mask[j * n..(j + 1) * n].to_vec();
        Tensor::from_data(TensorData::new(data, [n]), device)
    }
}

/// Final-norm hidden states of every position of the batch, `[batch * len, hidden]` (flat
/// indices as in [`HeadBatch::rows`]), computed by the frozen backbone (no autodiff).
pub fn backbone_hidden<B: kernels::FlashAttentionBackend>(
    model: &Llama<B>,
    batch: &HeadBatch,
) -> Result<Tensor<B, 2>> {
    let device = model.device();
    let tokens = Tensor::<B, 2, Int>::from_data(
        TensorData::new(batch.tokens.clone(), [batch.batch, batch.len]),
        device,
    );
    let mut cache = model.new_cache(batch.batch, batch.len);
    let hidden = model.forward_hidden(tokens, &mut cache, None)?;
    let [b, n, h] = hidden.dims();
    Ok(hidden.reshape([b * n, h]))
}

/// `hidden`'s rows at flat indices `rows`, in f32.
pub fn select_rows<B: Backend>(hidden: Tensor<B, 2>, rows: &[i64]) -> Tensor<B, 2> {
    let device = hidden.device();
    let rows =
        Tensor::<B, 1, Int>::from_data(TensorData::new(rows.to_vec(), [rows.len()]), &device);
    hidden.select(0, rows).cast(DType::F32)
}

/// Final-norm hidden states of the selected positions, `[rows, hidden]` in f32, computed by the
/// frozen backbone (no autodiff).
pub fn backbone_rows<B: kernels::FlashAttentionBackend>(
    model: &Llama<B>,
    batch: &HeadBatch,
) -> Result<Tensor<B, 2>> {
    Ok(select_rows(backbone_hidden(model, batch)?, &batch.rows))
}

/// Soft targets of each Medusa head (offset indices `0..K` of a batch laid out with offsets
/// `2..=K + 1`): the base model's next-token distribution `[rows, vocab]` at
/// [`HeadBatch::teacher_rows`], from the backbone's hidden states of every position and the
/// base LM head (f32).
pub fn teacher_probs<B: kernels::LinearBackend>(
    hidden: Tensor<B, 2>,
    batch: &HeadBatch,
    base: &Proj<B>,
) -> Vec<Tensor<B, 2>> {
    (0..batch.offsets.len())
        .map(|j| {
            let rows = select_rows(hidden.clone(), &batch.teacher_rows(j));
            softmax(base.forward(rows), 1)
        })
        .collect()
}

/// Logits `[rows, vocab]` of one Medusa head; `base` (the base model's LM head) serves heads
/// without their own vocabulary projection.
pub fn head_logits<B: kernels::LinearBackend>(
    head: &MedusaHead<B>,
    hidden: Tensor<B, 2>,
    base: &Proj<B>,
) -> Tensor<B, 2> {
    let x = head.blocks.iter().fold(hidden, |x, block| block.forward(x));
    head.lm_head.as_ref().unwrap_or(base).forward(x)
}

/// Mean cross-entropy of `logits` against `targets` over the positions where `mask` is 1
/// (`count` of them).
pub fn masked_cross_entropy<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    mask: Tensor<B, 1>,
    count: usize,
) -> Tensor<B, 1> {
    let [n, _] = logits.dims();
    let picked = log_softmax(logits, 1)
        .gather(1, targets.reshape([n, 1]))
        .reshape([n]);
    -(picked * mask).sum() / count.max(1) as f64
}

/// Mean KL divergence `Σ p (ln p − ln q)` from the distributions `probs` (`[rows, vocab]`,
/// rows summing to 1) to `softmax(logits)`, over the positions where `mask` is 1 (`count` of
/// them). It is the cross-entropy against `probs` less their entropy (a constant for the
/// heads: same gradients), so it reads as 0 at a perfect match whatever the teacher's
/// uncertainty, and equals [`masked_cross_entropy`] when each row of `probs` is one-hot.
pub fn masked_soft_cross_entropy<B: Backend>(
    logits: Tensor<B, 2>,
    probs: Tensor<B, 2>,
    mask: Tensor<B, 1>,
    count: usize,
) -> Tensor<B, 1> {
    let [n, _] = logits.dims();
    // 0 · ln 0 = 0: the clamp only keeps the log finite where p is 0.
    let entropy_terms = probs.clone() * probs.clone().clamp_min(1e-30).log();
    let per_row = (entropy_terms - log_softmax(logits, 1) * probs)
        .sum_dim(1)
        .reshape([n]);
    (per_row * mask).sum() / count.max(1) as f64
}

/// The Medusa-1 loss of a batch laid out with offsets `2..=K + 1`: returns the weighted total
/// (a scalar, to back-propagate) and each head's cross-entropy `[K]` against the response
/// tokens, or its KL divergence from `teachers` (one `[rows, vocab]` distribution per head, see
/// [`teacher_probs`]) when given. `base` is the LM head of heads that share it.
pub fn medusa_loss<B: kernels::LinearBackend>(
    heads: &MedusaHeads<B>,
    base: &Proj<B>,
    hidden: Tensor<B, 2>,
    batch: &HeadBatch,
    decay: f64,
    teachers: Option<Vec<Tensor<B, 2>>>,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let device = hidden.device();
    let per_head: Vec<Tensor<B, 1>> = heads
        .heads
        .iter()
        .enumerate()
        .map(|(k, head)| {
            debug_assert_eq!(batch.offsets[k], k + 2);
            let logits = head_logits(head, hidden.clone(), base);
            let mask = batch.mask_tensor(k, &device);
            match &teachers {
                Some(t) => masked_soft_cross_entropy(logits, t[k].clone(), mask, batch.counts[k]),
                None => masked_cross_entropy(
                    logits,
                    batch.targets_tensor(k, &device),
                    mask,
                    batch.counts[k],
                ),
            }
        })
        .collect();
    let total = per_head
        .iter()
        .enumerate()
        .map(|(k, ce)| ce.clone() * decay.powi(k as i32))
        .reduce(|a, b| a + b)
        .expect("at least one head");
    (total, Tensor::cat(per_head, 0))
}

/// Rank of each target among `logits`' entries (`[rows]`): the number of strictly larger
/// logits, so the target is in the top-`k` exactly when its rank is below `k`.
pub fn target_ranks<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> Tensor<B, 1, Int> {
    let [n, v] = logits.dims();
    let target_logit = logits.clone().gather(1, targets.reshape([n, 1]));
    logits
        .greater(target_logit.expand([n, v]))
        .int()
        .sum_dim(1)
        .reshape([n])
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    fn example(prompt: &[u32], response: &[u32]) -> Example {
        Example {
            id: "x".into(),
            prompt: prompt.to_vec(),
            response: response.to_vec(),
        }
    }

    #[test]
    fn targets_are_response_tokens_at_t_plus_offset() {
        // prompt 10 11 12 | response 20 21 22 23
        let a = example(&[10, 11, 12], &[20, 21, 22, 23]);
        let b = example(&[30], &[40, 41]);
        let batch = HeadBatch::new(&[&a, &b], &[2, 3]);
        assert_eq!((batch.batch, batch.len), (2, 7));
        assert_eq!(&batch.tokens[7..10], &[30, 40, 41]);
        assert_eq!(&batch.tokens[10..], &[0; 4]);
        // Sequence a: t from 3 - 3 = 0 to 7 - 3 = 4; sequence b: t = 0 only (n = 3).
        assert_eq!(batch.rows, vec![0, 1, 2, 3, 4, 7]);
        let n = batch.num_rows();
        // Offset 2 (head 1): t=0 -> token 2 is prompt (masked), t=1 -> 20, ..., t=4 -> 23.
        assert_eq!(&batch.targets[..n], &[0, 20, 21, 22, 23, 41]);
        assert_eq!(&batch.mask[..n], &[0.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
        // Offset 3 (head 2): t=0 -> 20, ..., t=3 -> 23, t=4 -> beyond the end.
        assert_eq!(&batch.targets[n..], &[20, 21, 22, 23, 0, 0]);
        assert_eq!(&batch.mask[n..], &[1.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
        assert_eq!(batch.counts, vec![5, 4]);
    }

    #[test]
    fn padding_keeps_rows_targets_and_counts() {
        let a = example(&[10, 11, 12], &[20, 21, 22, 23]);
        let b = example(&[30], &[40, 41]);
        let exact = HeadBatch::new(&[&a, &b], &[2, 3]);
        let padded = exact.clone().padded(4);
        assert_eq!((padded.len, padded.num_rows()), (8, 8));
        // Rows go to a power of two, at least the multiple.
        assert_eq!(exact.clone().padded(16).num_rows(), 16);
        let many = HeadBatch::new(&[&a, &b, &a, &b], &[2, 3]);
        assert_eq!((many.num_rows(), many.padded(2).num_rows()), (12, 16));
        let (n, m) = (exact.num_rows(), padded.num_rows());
        for i in 0..n {
            let (e, p) = (exact.rows[i] as usize, padded.rows[i] as usize);
            assert_eq!(exact.tokens[e], padded.tokens[p], "row {i}");
            assert_eq!(
                (e / exact.len, e % exact.len),
                (p / padded.len, p % padded.len)
            );
            for j in 0..2 {
                assert_eq!(exact.targets[j * n + i], padded.targets[j * m + i]);
                assert_eq!(exact.mask[j * n + i], padded.mask[j * m + i]);
            }
        }
        for j in 0..2 {
            assert!(
                padded.mask[j * m + n..(j + 1) * m]
                    .iter()
                    .all(|&v| v == 0.0)
            );
        }
        assert_eq!(padded.counts, exact.counts);
        assert_eq!(exact.clone().padded(0), exact);
    }

    #[test]
    fn teacher_rows_shift_by_offset_minus_one() {
        let a = example(&[10, 11, 12], &[20, 21, 22, 23]);
        let b = example(&[30], &[40, 41]);
        let batch = HeadBatch::new(&[&a, &b], &[2, 3]);
        // Offset 2: row t reads position t + 1 where a target exists, else stays.
        assert_eq!(batch.teacher_rows(0), vec![0, 2, 3, 4, 5, 8]);
        // Offset 3: t + 2; the last row of a has no target.
        assert_eq!(batch.teacher_rows(1), vec![2, 3, 4, 5, 4, 7]);
    }

    #[test]
    fn soft_cross_entropy_generalises_the_hard_one() {
        let device = Default::default();
        let logits = Tensor::<Flex, 2>::from_floats([[2.0, 1.0, 0.0], [0.5, 0.0, 3.0]], &device);
        let targets = Tensor::<Flex, 1, Int>::from_ints([1, 2], &device);
        let one_hot = Tensor::<Flex, 2>::from_floats([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], &device);
        let mask = Tensor::<Flex, 1>::from_floats([1.0, 1.0], &device);
        let hard: f32 =
            masked_cross_entropy(logits.clone(), targets, mask.clone(), 2).into_scalar();
        let soft: f32 =
            masked_soft_cross_entropy(logits.clone(), one_hot, mask.clone(), 2).into_scalar();
        assert!((hard - soft).abs() < 1e-6, "{hard} vs {soft}");
        // A spread target: Σ p (ln p - ln q) of the first row only.
        let probs = Tensor::<Flex, 2>::from_floats([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]], &device);
        let first = Tensor::<Flex, 1>::from_floats([1.0, 0.0], &device);
        let got: f32 = masked_soft_cross_entropy(logits, probs, first, 1).into_scalar();
        let lse = (2f64.exp() + 1f64.exp() + 1.0).ln();
        let entropy = -(0.5 * 0.5f64.ln() + 0.5 * 0.25f64.ln());
        let want = 0.5 * (lse - 2.0) + 0.25 * (lse - 1.0) + 0.25 * lse - entropy;
        assert!((got as f64 - want).abs() < 1e-5, "{got} vs {want}");
    }

    #[test]
    fn cross_entropy_and_ranks() {
        let device = Default::default();
        let logits = Tensor::<Flex, 2>::from_floats([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]], &device);
        let targets = Tensor::<Flex, 1, Int>::from_ints([1, 2], &device);
        let ranks: Vec<i64> = target_ranks(logits.clone(), targets.clone())
            .into_data()
            .convert::<i64>()
            .to_vec()
            .unwrap();
        assert_eq!(ranks, vec![1, 0]);
        // Only the first row counts.
        let mask = Tensor::<Flex, 1>::from_floats([1.0, 0.0], &device);
        let ce: f32 = masked_cross_entropy(logits, targets, mask, 1).into_scalar();
        let lse = (2f32.exp() + 1f32.exp() + 1.0).ln();
        assert!((ce - (lse - 1.0)).abs() < 1e-5, "{ce}");
    }
}
