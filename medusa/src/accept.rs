//! Choosing the accepted path among the tree's candidates (paper §2.3.1 for typical acceptance).
//!
//! Both rules look at one root-to-leaf row of the tree at a time: a speculative token is
//! accepted if the base model, evaluated at its parent node, agrees with it; a row's accepted
//! length is its longest agreeing prefix; the best row is the longest.

use crate::tree::MedusaTree;

/// The accepted path of one decoding step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Row of `retrieve_indices`.
    pub path: usize,
    /// Speculative tokens accepted after the root (0 ..= tree depth).
    pub length: usize,
}

impl Accepted {
    /// The accepted nodes, root first.
    pub fn nodes<'a>(&self, tree: &'a MedusaTree) -> &'a [usize] {
        &tree.retrieve_indices[self.path][..=self.length]
    }
}

/// Greedy acceptance: node `j`'s token must equal the base model's argmax at `parent(j)`.
/// `tokens` and `argmax` are per node. Ties between rows go to the first (as `torch.argmax`).
pub fn greedy(tree: &MedusaTree, tokens: &[u32], argmax: &[u32]) -> Accepted {
    accept_longest(
        tree,
        |node| tokens[node] == argmax[tree.parents[node]],
        |_| 0.0,
    )
}

/// Typical acceptance: node `j` is accepted if `p(token_j | parent) > threshold(parent)`, where
/// `threshold = min(ε, α · exp(−H))` of the parent's (temperature-scaled) distribution.
/// `candidate_prob[j]` and `threshold[j]` are already taken at `parent(j)`. Among the longest
/// rows, the one with the highest likelihood (sum of log-probabilities) wins, as in the
/// reference implementation.
pub fn typical(tree: &MedusaTree, candidate_prob: &[f32], threshold: &[f32]) -> Accepted {
    accept_longest(
        tree,
        |node| candidate_prob[node] > threshold[node],
        |node| (candidate_prob[node] as f64).ln(),
    )
}

fn accept_longest(
    tree: &MedusaTree,
    accepts: impl Fn(usize) -> bool,
    log_likelihood: impl Fn(usize) -> f64,
) -> Accepted {
    let mut best = Accepted { path: 0, length: 0 };
    let mut best_ll = f64::NEG_INFINITY;
    for (row, nodes) in tree.retrieve_indices.iter().enumerate() {
        let length = nodes[1..].iter().take_while(|&&n| accepts(n)).count();
        if length == 0 {
            continue;
        }
        let ll: f64 = nodes[1..=length].iter().map(|&n| log_likelihood(n)).sum();
        if length > best.length || (length == best.length && ll > best_ll) {
            best = Accepted { path: row, length };
            best_ll = ll;
        }
    }
    best
}

/// The threshold of typical acceptance for a distribution `probs`:
/// `min(ε, α · exp(−H(probs)))`, with the reference implementation's `+1e-5` inside the log.
pub fn typical_threshold(probs: &[f32], posterior_threshold: f32, posterior_alpha: f32) -> f32 {
    let entropy: f32 = -probs.iter().map(|&p| p * (p + 1e-5).ln()).sum::<f32>();
    posterior_threshold.min((-entropy).exp() * posterior_alpha)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> MedusaTree {
        // root(0) -> [0](1) -> [0,0](3); root -> [1](2)
        MedusaTree::new(&[vec![0], vec![1], vec![0, 0]], 2).unwrap()
    }

    #[test]
    fn greedy_takes_longest_agreeing_prefix() {
        let t = tree();
        assert_eq!(t.retrieve_indices, vec![vec![0, 1, 3], vec![0, 2]]);
        // tokens per node; argmax per node (prediction for the child position)
        let tokens = [10, 11, 12, 13];
        // root predicts 11 (node 1 ok), node 1 predicts 13 (node 3 ok)
        let a = greedy(&t, &tokens, &[11, 13, 0, 0]);
        assert_eq!(a, Accepted { path: 0, length: 2 });
        assert_eq!(a.nodes(&t), &[0, 1, 3]);
        // root predicts 12: only node 2 (path 1) matches
        assert_eq!(
            greedy(&t, &tokens, &[12, 13, 0, 0]),
            Accepted { path: 1, length: 1 }
        );
        // nothing matches: root only
        assert_eq!(greedy(&t, &tokens, &[99, 99, 99, 99]).length, 0);
    }

    #[test]
    fn typical_prefers_likelier_path_among_longest() {
        let t = MedusaTree::new(&[vec![0], vec![1]], 1).unwrap();
        let a = typical(&t, &[0.0, 0.3, 0.6], &[0.0, 0.1, 0.1]);
        assert_eq!(a.length, 1);
        // Both children pass the threshold; node 2 (p = 0.6) is likelier than node 1 (0.3).
        assert_eq!(a.nodes(&t), &[0, 2]);
    }

    #[test]
    fn typical_threshold_matches_definition() {
        let p = [0.5f32, 0.25, 0.25];
        let h: f32 = -p.iter().map(|&x| x * (x + 1e-5).ln()).sum::<f32>();
        assert!((typical_threshold(&p, 0.09, 0.3) - 0.09f32.min(0.3 * (-h).exp())).abs() < 1e-7);
        // A one-hot distribution has zero entropy: the threshold is min(ε, α).
        assert!((typical_threshold(&[1.0, 0.0], 0.09, 0.3) - 0.09).abs() < 1e-4);
    }
}
