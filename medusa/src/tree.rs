//! Candidate trees (the paper's "tree attention", §2.1.2) and the buffers that drive them.
//!
//! A tree is a list of paths ("`medusa_choices`"): `[1, 0]` means "the 2nd candidate of head 1,
//! then the 1st candidate of head 2 after it". The root (node 0) is the base model's own next
//! token. Buffers follow `generate_medusa_buffers` of the reference implementation.

use std::path::Path;

use crate::error::{MedusaError, Result};

/// Top-k candidates taken from each head (the reference implementation's `TOPK`): every index
/// in a path must be below it.
pub const TOPK: usize = 10;

/// A candidate tree with its precomputed buffers.
#[derive(Debug, Clone, PartialEq)]
pub struct MedusaTree {
    /// The paths, sorted by (length, lexicographic) — the node order of every buffer below
    /// (node `i + 1` is `choices[i]`, node 0 the root).
    pub choices: Vec<Vec<usize>>,
    /// `[n, n]` row-major, `true` where node `i` may attend to node `j` (its ancestors and itself;
    /// every node sees the root).
    pub attn_mask: Vec<bool>,
    /// For each node, its index into the flattened candidate vector
    /// `[root, head₁ top-k…, head₂ top-k…, …]`.
    pub tree_indices: Vec<usize>,
    /// Depth of each node (root 0); positions are `prefix_len + depth`.
    pub position_ids: Vec<usize>,
    /// Parent node of each node (the root is its own parent).
    pub parents: Vec<usize>,
    /// One row per leaf path: the node indices from the root down to the leaf.
    pub retrieve_indices: Vec<Vec<usize>>,
}

impl MedusaTree {
    /// Builds the tree from paths; duplicates are rejected, missing prefixes are an error (a
    /// node's parent must be in the tree), and no path may be longer than `num_heads`.
    pub fn new(choices: &[Vec<usize>], num_heads: usize) -> Result<Self> {
        let mut sorted: Vec<Vec<usize>> = choices.to_vec();
        sorted.sort_by(|a, b| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
        for (i, path) in sorted.iter().enumerate() {
            if path.is_empty() {
                return Err(MedusaError::Tree("empty path".into()));
            }
            if path.len() > num_heads {
                return Err(MedusaError::Tree(format!(
                    "path {path:?} has depth {} but there are only {num_heads} Medusa heads",
                    path.len()
                )));
            }
            if let Some(&k) = path.iter().find(|&&k| k >= TOPK) {
                return Err(MedusaError::Tree(format!(
                    "path {path:?} uses candidate {k}; at most the top {TOPK} of a head are kept"
                )));
            }
            if i > 0 && sorted[i - 1] == *path {
                return Err(MedusaError::Tree(format!("path {path:?} appears twice")));
            }
        }
        let index_of = |p: &[usize]| sorted.iter().position(|q| q == p).map(|i| i + 1);
        let n = sorted.len() + 1;
        let mut attn_mask = vec![false; n * n];
        let mut parents = vec![0; n];
        let mut tree_indices = vec![0; n];
        let mut position_ids = vec![0; n];
        attn_mask[0] = true;
        for (i, path) in sorted.iter().enumerate() {
            let node = i + 1;
            attn_mask[node * n + node] = true;
            attn_mask[node * n] = true;
            for d in 1..path.len() {
                let anc = index_of(&path[..d]).ok_or_else(|| {
                    MedusaError::Tree(format!(
                        "path {path:?} needs its prefix {:?} in the tree",
                        &path[..d]
                    ))
                })?;
                attn_mask[node * n + anc] = true;
            }
            parents[node] = if path.len() == 1 {
                0
            } else {
                index_of(&path[..path.len() - 1]).expect("checked above")
            };
            let depth = path.len();
            tree_indices[node] = path[depth - 1] + TOPK * (depth - 1) + 1;
            position_ids[node] = depth;
        }
        // Leaves: nodes that are nobody's parent, listed from the deepest/last path backwards
        // like the reference implementation.
        let mut is_parent = vec![false; n];
        for &p in &parents[1..] {
            is_parent[p] = true;
        }
        let mut retrieve_indices = Vec::new();
        for node in (1..n).rev() {
            if is_parent[node] {
                continue;
            }
            let mut row = vec![node];
            let mut cur = node;
            while cur != 0 {
                cur = parents[cur];
                row.push(cur);
            }
            row.reverse();
            retrieve_indices.push(row);
        }
        if n == 1 {
            retrieve_indices.push(vec![0]);
        }
        Ok(Self {
            choices: sorted,
            attn_mask,
            tree_indices,
            position_ids,
            parents,
            retrieve_indices,
        })
    }

    /// A published tree by name (`mc_sim_7b_63`, `vicuna_7b_stage2`, `chain4`), paths as
    /// JSON (`[[0], [0, 0], [1]]`, or Python tuples as the Medusa repository writes them), or
    /// the path of a file holding such paths.
    pub fn named_or_json(spec: &str, num_heads: usize) -> Result<Self> {
        let choices = match spec {
            "mc_sim_7b_63" => parse_choices(MC_SIM_7B_63)?,
            "vicuna_7b_stage2" => parse_choices(VICUNA_7B_STAGE2)?,
            "chain4" => vec![vec![0], vec![0, 0], vec![0, 0, 0], vec![0, 0, 0, 0]],
            json if json.trim_start().starts_with('[') => parse_choices(json)?,
            path => read_choices(Path::new(path))?,
        };
        Self::new(&choices, num_heads)
    }

    /// [`Self::named_or_json`], or `optimal:N`: the tree of `N` nodes (root excluded) that
    /// maximises the expected accepted length under `accuracy` (see [`optimal_choices`]), e.g.
    /// the accuracies saved with trained heads
    /// ([`crate::checkpoint::HeadsMetadata::medusa_accuracy`]).
    pub fn from_spec(spec: &str, num_heads: usize, accuracy: Option<&[Vec<f64>]>) -> Result<Self> {
        let Some(nodes) = spec.strip_prefix("optimal:") else {
            return Self::named_or_json(spec, num_heads);
        };
        let nodes: usize = nodes.trim().parse().map_err(|e| {
            MedusaError::Tree(format!(
                "{spec:?}: expected optimal:N with N a node count ({e})"
            ))
        })?;
        if nodes == 0 {
            return Err(MedusaError::Tree(format!(
                "{spec:?}: a tree needs at least one node"
            )));
        }
        let accuracy = accuracy.ok_or_else(|| {
            MedusaError::Tree(format!(
                "{spec:?} needs the heads' measured accuracies (`medusa_accuracy` in their \
                 config.json, written by `cargo run -p train`)"
            ))
        })?;
        // Saved accuracies may cover more heads than were loaded, and `Self::new` rejects
        // paths deeper than the heads.
        let accuracy = &accuracy[..accuracy.len().min(num_heads)];
        let choices = optimal_choices(accuracy, nodes);
        if choices.is_empty() {
            return Err(MedusaError::Tree(format!(
                "{spec:?}: no candidate has a non-zero accuracy in the first {} heads' accuracies",
                accuracy.len()
            )));
        }
        Self::new(&choices, num_heads)
    }

    /// The tree to decode trained heads with, and where it came from: `spec` when given (see
    /// [`Self::from_spec`]; `optimal:N` uses the accuracies saved with the heads), else the
    /// tree saved with the heads (`cargo run -p train` builds it from the heads' measured
    /// accuracies), else the published `mc_sim_7b_63` (which needs at least 4 heads).
    pub fn for_heads(
        spec: Option<&str>,
        num_heads: usize,
        metadata: &crate::checkpoint::HeadsMetadata,
    ) -> Result<(Self, String)> {
        match (spec, &metadata.medusa_choices) {
            (Some(spec), _) => Ok((
                Self::from_spec(spec, num_heads, metadata.medusa_accuracy.as_deref())?,
                spec.to_string(),
            )),
            (None, Some(paths)) => Ok((
                Self::new(paths, num_heads)?,
                "saved with the heads".to_string(),
            )),
            (None, None) => Ok((
                Self::named_or_json("mc_sim_7b_63", num_heads)?,
                "mc_sim_7b_63".to_string(),
            )),
        }
    }

    /// Number of nodes, root included.
    pub fn len(&self) -> usize {
        self.choices.len() + 1
    }

    /// Always `false`: a tree has at least its root.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Deepest path length (number of heads the tree uses).
    pub fn depth(&self) -> usize {
        self.choices.iter().map(Vec::len).max().unwrap_or(0)
    }

    /// The largest top-k index any head needs, plus one.
    pub fn max_topk(&self) -> usize {
        self.choices
            .iter()
            .flat_map(|p| p.iter())
            .max()
            .map_or(1, |k| k + 1)
    }
}

/// Parses `[[0], [0, 0], ...]` (JSON, or Python tuples `[(0,), (0, 0)]`).
pub fn parse_choices(text: &str) -> Result<Vec<Vec<usize>>> {
    parse_paths(text).map_err(|e| MedusaError::Tree(format!("bad tree {text:?}: {e}")))
}

fn parse_paths(text: &str) -> serde_json::Result<Vec<Vec<usize>>> {
    serde_json::from_str(&text.replace('(', "[").replace(')', "]").replace(",]", "]"))
}

/// The paths in the file at `path` (as [`parse_choices`] reads them). A spec that names no
/// file is reported as an unknown tree: it is more often a misspelt name than a lost file.
fn read_choices(path: &Path) -> Result<Vec<Vec<usize>>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        MedusaError::Tree(if e.kind() == std::io::ErrorKind::NotFound {
            format!(
                "unknown tree {path:?}: not a published tree (mc_sim_7b_63, vicuna_7b_stage2, \
                 chain4), paths as JSON (`[[0], [0, 0]]`) or a file"
            )
        } else {
            format!("tree file {}: {e}", path.display())
        })
    })?;
    parse_paths(&text).map_err(|e| MedusaError::Tree(format!("tree file {}: {e}", path.display())))
}

/// The paper's "optimized tree construction" (§3.3.1): grows a tree greedily from the root,
/// each time adding the node with the largest expected acceptance among those whose parent is
/// already in the tree, until `num_nodes` paths (the root not counted; 63 like `mc_sim_7b_63`).
///
/// `accuracy[k][i]` is the probability that the `i`-th ranked candidate (0-based) of head `k + 1`
/// is the right token, e.g. measured top-(i+1) minus top-i accuracy. Heads are assumed
/// independent, so a node's expected acceptance is the product of the accuracies along its path.
/// Nodes of zero expected acceptance are never added. Ties go to the shorter, then
/// lexicographically smaller path, so the result is deterministic.
pub fn optimal_choices(accuracy: &[Vec<f64>], num_nodes: usize) -> Vec<Vec<usize>> {
    use std::{cmp::Reverse, collections::BinaryHeap};

    #[derive(PartialEq)]
    struct Node(f64, Reverse<(usize, Vec<usize>)>);
    impl Eq for Node {}
    impl PartialOrd for Node {
        fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(other))
        }
    }
    impl Ord for Node {
        fn cmp(&self, other: &Self) -> std::cmp::Ordering {
            self.0
                .total_cmp(&other.0)
                .then_with(|| self.1.cmp(&other.1))
        }
    }
    let children = |path: &[usize], value: f64| -> Vec<Node> {
        let Some(head) = accuracy.get(path.len()) else {
            return vec![];
        };
        (0..head.len().min(TOPK))
            .map(|i| {
                let child = [path, &[i]].concat();
                Node(value * head[i], Reverse((child.len(), child)))
            })
            .collect()
    };
    let mut frontier: BinaryHeap<Node> = children(&[], 1.0).into_iter().collect();
    // The budget is user input (`optimal:N`): reserve for a plausible tree, not for N.
    let mut choices = Vec::with_capacity(num_nodes.min(1024));
    while choices.len() < num_nodes {
        match frontier.pop() {
            Some(Node(value, Reverse((_, path)))) if value > 0.0 => {
                frontier.extend(children(&path, value));
                choices.push(path);
            }
            _ => break,
        }
    }
    choices
}

/// Expected tokens per decoding step of a tree (the root's token plus each node's expected
/// acceptance, with `accuracy` as in [`optimal_choices`]); comparable to
/// [`crate::MedusaOutput::mean_accepted_length`].
pub fn expected_tokens_per_step(choices: &[Vec<usize>], accuracy: &[Vec<f64>]) -> f64 {
    let acceptance = |path: &Vec<usize>| -> f64 {
        path.iter()
            .enumerate()
            .map(|(k, &i)| {
                accuracy
                    .get(k)
                    .and_then(|a| a.get(i))
                    .copied()
                    .unwrap_or(0.0)
            })
            .product()
    };
    1.0 + choices.iter().map(acceptance).sum::<f64>()
}

/// `mc_sim_7b_63` from the reference implementation's `medusa_choices.py` (63 paths, depth 4).
pub const MC_SIM_7B_63: &str = "[[0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0], [0, 5], [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2], [3, 0], [0, 9], [8], [9], [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1], [0, 0, 4], [0, 0, 5], [0, 0, 0, 0], [0, 1, 1], [0, 0, 6], [0, 3, 0], [5, 0], [1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0], [1, 4], [7, 0], [0, 1, 2], [2, 0, 0], [3, 1], [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1], [9, 0], [0, 6, 0], [0, 0, 0, 1], [1, 6], [0, 7, 0]]";

/// `vicuna_7b_stage2` from the reference implementation (63 paths, depth 4).
pub const VICUNA_7B_STAGE2: &str = "[(0,), (0, 0), (1,), (0, 1), (0, 0, 0), (1, 0), (2,), (0, 2), (0, 0, 1), (0, 3), (3,), (0, 1, 0), (2, 0), (4,), (0, 0, 2), (0, 4), (1, 1), (1, 0, 0), (0, 0, 0, 0), (5,), (0, 0, 3), (0, 5), (0, 2, 0), (3, 0), (0, 1, 1), (0, 6), (6,), (0, 7), (0, 0, 4), (4, 0), (1, 2), (0, 8), (7,), (0, 3, 0), (0, 0, 0, 1), (0, 0, 5), (2, 1), (0, 0, 6), (1, 0, 1), (0, 0, 1, 0), (2, 0, 0), (5, 0), (0, 9), (0, 1, 2), (8,), (0, 4, 0), (0, 2, 1), (1, 3), (0, 0, 7), (0, 0, 0, 2), (0, 0, 8), (1, 1, 0), (0, 1, 0, 0), (6, 0), (9,), (0, 1, 3), (0, 0, 0, 3), (1, 0, 2), (0, 5, 0), (3, 1), (0, 0, 2, 0), (7, 0), (1, 4)]";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn for_heads_prefers_the_spec_then_the_saved_tree() {
        use crate::checkpoint::HeadsMetadata;
        let saved = HeadsMetadata {
            medusa_choices: Some(vec![vec![0], vec![1], vec![0, 0]]),
            medusa_accuracy: Some(vec![vec![0.6, 0.1], vec![0.4, 0.05]]),
            ..Default::default()
        };
        let (tree, from) = MedusaTree::for_heads(None, 2, &saved).unwrap();
        assert_eq!((tree.len(), from.as_str()), (4, "saved with the heads"));
        let (tree, from) = MedusaTree::for_heads(Some("chain4"), 4, &saved).unwrap();
        assert_eq!((tree.len(), from.as_str()), (5, "chain4"));
        // optimal:N takes the saved accuracies: the two best nodes are head 1's top-1 (0.6) and
        // head 2's top-1 below it (0.6 · 0.4).
        let (tree, _) = MedusaTree::for_heads(Some("optimal:2"), 2, &saved).unwrap();
        assert_eq!(tree.choices, vec![vec![0], vec![0, 0]]);
        let (tree, from) = MedusaTree::for_heads(None, 4, &HeadsMetadata::default()).unwrap();
        assert_eq!((tree.len(), from.as_str()), (64, "mc_sim_7b_63"));
        assert!(MedusaTree::for_heads(Some("optimal:8"), 4, &HeadsMetadata::default()).is_err());
    }

    #[test]
    fn mc_sim_7b_63_buffers() {
        let tree = MedusaTree::named_or_json("mc_sim_7b_63", 4).unwrap();
        assert_eq!(tree.len(), 64);
        assert_eq!(tree.depth(), 4);
        assert_eq!(tree.retrieve_indices.len(), 42);
        // Independent check of the leaf count: paths that are no other path's prefix.
        let leaves = tree
            .choices
            .iter()
            .filter(|p| {
                !tree
                    .choices
                    .iter()
                    .any(|q| q.len() == p.len() + 1 && q.starts_with(p))
            })
            .count();
        assert_eq!(leaves, 42);
        // Nodes per depth, counted from the published list: 10, 28, 23 and 2.
        let mut per_depth = [0; 5];
        for p in &tree.choices {
            per_depth[p.len()] += 1;
        }
        assert_eq!(per_depth, [0, 10, 28, 23, 2]);
        for (node, &depth) in tree.position_ids.iter().enumerate() {
            let expected = if node == 0 {
                0
            } else {
                tree.choices[node - 1].len()
            };
            assert_eq!(depth, expected);
        }
        // The mask is exactly "ancestor-or-self": node i sees j iff choices[j] is a prefix of
        // choices[i] (the root being the empty prefix).
        let n = tree.len();
        let path = |i: usize| -> &[usize] { if i == 0 { &[] } else { &tree.choices[i - 1] } };
        for i in 0..n {
            for j in 0..n {
                let expected = path(i).starts_with(path(j));
                assert_eq!(tree.attn_mask[i * n + j], expected, "mask[{i}][{j}]");
            }
        }
        // Retrieve rows walk root -> leaf through parents, and each node's tree index maps
        // into the right head's top-k block.
        for row in &tree.retrieve_indices {
            assert_eq!(row[0], 0);
            for w in row.windows(2) {
                assert_eq!(tree.parents[w[1]], w[0]);
            }
        }
        for node in 1..n {
            let p = path(node);
            assert_eq!(
                tree.tree_indices[node],
                1 + 10 * (p.len() - 1) + p[p.len() - 1]
            );
        }
    }

    #[test]
    fn rejects_bad_trees() {
        let e = MedusaTree::named_or_json("mc_sim_7b_63", 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("only 3 Medusa heads"), "{e}");
        let e = MedusaTree::new(&[vec![0, 1]], 4).unwrap_err().to_string();
        assert!(e.contains("prefix [0]"), "{e}");
        let e = MedusaTree::new(&[vec![0], vec![0]], 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("twice"), "{e}");
        let e = MedusaTree::new(&[vec![12]], 4).unwrap_err().to_string();
        assert!(e.contains("top 10"), "{e}");
    }

    #[test]
    fn python_tuples_parse() {
        let t = MedusaTree::named_or_json("vicuna_7b_stage2", 4).unwrap();
        assert_eq!(t.len(), 64);
        let c = parse_choices("[(0,), (0, 1)]").unwrap();
        assert_eq!(c, vec![vec![0], vec![0, 1]]);
    }

    #[test]
    fn optimal_tree_maximises_expected_acceptance() {
        // Two heads: head 1 is right 60% of the time with its top candidate, 20% with the next;
        // head 2 is weaker.
        let acc = vec![vec![0.6, 0.2, 0.1], vec![0.4, 0.1]];
        let choices = optimal_choices(&acc, 4);
        // Values: [0]=.6, [1]=.2, [0,0]=.24, [2]=.1, [0,1]=.06, [1,0]=.08.
        assert_eq!(choices, vec![vec![0], vec![0, 0], vec![1], vec![2]]);
        let e = expected_tokens_per_step(&choices, &acc);
        assert!((e - (1.0 + 0.6 + 0.24 + 0.2 + 0.1)).abs() < 1e-12);
        // Every prefix is in the tree, so it builds; no other 4-node tree does better.
        MedusaTree::new(&choices, 2).unwrap();
        for other in [
            vec![vec![0], vec![0, 0], vec![1], vec![1, 0]],
            vec![vec![0], vec![0, 0], vec![0, 1], vec![1]],
        ] {
            assert!(expected_tokens_per_step(&other, &acc) < e);
        }
        // A budget larger than the useful nodes stops at zero acceptance.
        let acc = vec![vec![1.0, 0.0]];
        assert_eq!(optimal_choices(&acc, 63), vec![vec![0]]);
    }

    #[test]
    fn optimal_spec_builds_from_saved_accuracies() {
        let acc = vec![vec![0.6, 0.2, 0.1], vec![0.4, 0.1], vec![0.3]];
        let tree = MedusaTree::from_spec("optimal:4", 3, Some(&acc)).unwrap();
        assert_eq!(tree.len(), 5);
        assert_eq!(
            tree.choices,
            MedusaTree::new(&optimal_choices(&acc, 4), 3)
                .unwrap()
                .choices
        );
        // Fewer heads than measured accuracies: paths stop at the heads' depth.
        let shallow = MedusaTree::from_spec("optimal:20", 1, Some(&acc)).unwrap();
        assert_eq!(shallow.depth(), 1);
        assert_eq!(shallow.len(), 4);
        // Names and JSON still work, with or without accuracies.
        assert_eq!(MedusaTree::from_spec("chain4", 4, None).unwrap().len(), 5);
        let json = MedusaTree::from_spec("[[0], [1], [0, 0]]", 2, Some(&acc)).unwrap();
        assert_eq!(json.choices, vec![vec![0], vec![1], vec![0, 0]]);
        let zero = vec![vec![0.0; 3]];
        for (spec, accuracy, needle) in [
            ("optimal:4", None, "measured accuracies"),
            ("optimal:x", Some(&acc), "node count"),
            ("optimal:0", Some(&acc), "at least one node"),
            ("optimal:4", Some(&zero), "non-zero accuracy"),
        ] {
            let e = MedusaTree::from_spec(spec, 3, accuracy.map(|a| a.as_slice()))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{spec}: {e}");
        }
        // An absurd budget is bounded by the candidates there are, not allocated up front.
        let all = MedusaTree::from_spec("optimal:18446744073709551615", 1, Some(&acc)).unwrap();
        assert_eq!(all.len(), 4);
    }

    #[test]
    fn trees_from_files() {
        let dir = std::env::temp_dir().join(format!("medusa-tree-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // JSON, and the Python tuples of the Medusa repository's `medusa_choices.py`.
        let json = dir.join("tree.json");
        std::fs::write(&json, "[[0], [1], [0, 0]]\n").unwrap();
        let python = dir.join("tree.py.txt");
        std::fs::write(&python, "[(0,), (1,), (0, 0)]").unwrap();
        for file in [&json, &python] {
            let tree = MedusaTree::named_or_json(file.to_str().unwrap(), 2).unwrap();
            assert_eq!(tree.choices, vec![vec![0], vec![1], vec![0, 0]]);
        }
        let broken = dir.join("broken.json");
        std::fs::write(&broken, "[[0], [1").unwrap();
        let missing = dir.join("missing.json");
        for (spec, needle) in [
            (broken.to_str().unwrap(), "tree file"),
            (missing.to_str().unwrap(), "unknown tree"),
            ("mc_sim_7b_64", "unknown tree"),
            ("[[0], [1", "bad tree"),
        ] {
            let e = MedusaTree::named_or_json(spec, 2).unwrap_err().to_string();
            assert!(e.contains(needle), "{spec}: {e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn optimal_tree_respects_topk_and_depth() {
        let acc = vec![vec![0.09; 12]; 5];
        let choices = optimal_choices(&acc, 63);
        assert_eq!(choices.len(), 63);
        let tree = MedusaTree::new(&choices, 5).unwrap();
        assert!(tree.max_topk() <= TOPK);
        // Equal accuracies: all ten depth-1 nodes first, then depth 2 in lexicographic order.
        assert!(choices[..10].iter().all(|p| p.len() == 1));
        assert_eq!(choices[10], vec![0, 0]);
    }
}
