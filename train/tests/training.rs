//! End-to-end training on a tiny random Llama (CPU): self-distillation matches plain greedy
//! decoding, the loss falls, a killed-and-resumed run reproduces an uninterrupted one exactly,
//! checkpoints round-trip, and the saved heads decode losslessly with the tree built for them.

use std::path::PathBuf;

use burn::{
    backend::{Autodiff, Flex},
    module::{AutodiffModule, Module, ModuleMapper, Param},
    optim::{AdamWConfig, GradientsParams, Optimizer},
    tensor::{DType, Tensor},
};
use indicatif::ProgressBar;
use medusa::{
    AcceptMode, DecodeConfig, MedusaConfig, MedusaDecoder, MedusaHeads, MedusaTree,
    checkpoint::{self as heads_checkpoint, HeadsMetadata},
    tree,
};
use model::{
    GenerationConfig, Llama, LlamaConfig, LoadOptions, generate, generate::last_logits, llama::Proj,
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use train::{
    DistillConfig, Example, Outcome, RunControl, TrainConfig, TrainState, checkpoint,
    data::ExampleCache,
    distill::generate_batch,
    objective::{HeadBatch, backbone_hidden, backbone_rows, medusa_loss, teacher_probs},
    report::TreeSummary,
};

type Cpu = Flex;
type Ad = Autodiff<Cpu>;

const RESPONSE: usize = 16;

fn tiny_model() -> Llama<Cpu> {
    let mut c = LlamaConfig::smollm2_135m();
    c.vocab_size = 128;
    c.hidden_size = 64;
    c.intermediate_size = 128;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = Some(2);
    c.head_dim = Some(16);
    c.max_position_embeddings = 256;
    let options = LoadOptions::default().with_max_seq_len(256);
    Llama::random(c, 7, &options, &Default::default()).unwrap()
}

/// Prompts of random tokens with lengths 4..12 (ids 3.. so that none is a stop token).
fn prompts(n: usize) -> Vec<(String, Vec<u32>)> {
    let mut rng = StdRng::seed_from_u64(1);
    (0..n)
        .map(|i| {
            let len = rng.random_range(4..12);
            let ids = (0..len).map(|_| rng.random_range(3..128)).collect();
            (format!("p{i}"), ids)
        })
        .collect()
}

fn distill_config() -> DistillConfig {
    DistillConfig {
        max_new_tokens: RESPONSE,
        temperature: 0.0,
        seed: 0,
        batch_size: 4,
        max_length_spread: 3,
        stop_tokens: vec![2],
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("train-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn examples(model: &Llama<Cpu>, n: usize, dir: &std::path::Path) -> Vec<Example> {
    let mut cache = ExampleCache::open(dir, "tiny").unwrap();
    let (examples, stats) = train::distill(
        model,
        &prompts(n),
        &distill_config(),
        &mut cache,
        &ProgressBar::hidden(),
        false,
    )
    .unwrap();
    assert_eq!(stats.generated + stats.cached, n);
    examples
}

fn config(steps: usize) -> TrainConfig {
    TrainConfig {
        num_heads: 2,
        num_layers: 1,
        steps,
        batch_size: 4,
        grad_accum: 2,
        lr: 3e-3,
        warmup_steps: 2,
        weight_decay: 0.0,
        loss_decay: 0.8,
        seed: 5,
        eval_batch_size: 8,
        cache_hidden: false,
        pad_multiple: 0,
        soft_labels: false,
        share_lm_head: false,
        lm_head_lr_scale: 1.0,
    }
}

fn weights(heads: &MedusaHeads<Cpu>) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    for head in &heads.heads {
        for block in &head.blocks {
            out.push(block.linear.weight.val().into_data().to_vec().unwrap());
            out.push(
                block
                    .linear
                    .bias
                    .as_ref()
                    .unwrap()
                    .val()
                    .into_data()
                    .to_vec()
                    .unwrap(),
            );
        }
        if let Some(lm_head) = &head.lm_head {
            out.push(lm_head.weight.val().into_data().to_vec().unwrap());
        }
    }
    out
}

/// Mean loss of the first and of the last five steps, and every step's loss.
fn loss_ends(state: &TrainState) -> (f64, f64, Vec<f64>) {
    let losses: Vec<f64> = state.history.iter().map(|l| l.loss).collect();
    let first = losses[..5].iter().sum::<f64>() / 5.0;
    let last = losses[losses.len() - 5..].iter().sum::<f64>() / 5.0;
    (first, last, losses)
}

/// Writes `heads` to `dir` in the Medusa checkpoint format and reads them back.
fn save_and_load(
    model: &Llama<Cpu>,
    heads: &MedusaHeads<Cpu>,
    dir: &std::path::Path,
    metadata: &HeadsMetadata,
) -> (MedusaHeads<Cpu>, HeadsMetadata) {
    heads_checkpoint::save(heads, dir, metadata).unwrap();
    heads_checkpoint::load::<Cpu>(
        dir,
        model.config.hidden_size,
        model.config.vocab_size,
        DType::F32,
        &Default::default(),
    )
    .unwrap()
}

fn finished(outcome: Outcome<Cpu>) -> (MedusaHeads<Cpu>, TrainState) {
    match outcome {
        Outcome::Finished { heads, state } => (heads, state),
        Outcome::Stopped(state) => panic!("stopped at step {}", state.step),
    }
}

#[test]
fn batched_distillation_equals_greedy_decoding() {
    let model = tiny_model();
    let prompts = prompts(6);
    let refs: Vec<&[u32]> = prompts.iter().map(|(_, p)| p.as_slice()).collect();
    // One batch with prompts of different lengths (lockstep, teacher-forced prompt tails).
    let (batched, _) = generate_batch(&model, &refs, &distill_config()).unwrap();
    for ((_, prompt), response) in prompts.iter().zip(&batched) {
        let config = GenerationConfig {
            max_new_tokens: RESPONSE,
            stop_tokens: vec![2],
            ..Default::default()
        };
        let expected = generate(&model, prompt, &config, |_| {}).unwrap().tokens;
        assert_eq!(response, &expected, "prompt {prompt:?}");
    }
    // The cache serves the second pass.
    let dir = temp_dir("cache");
    let first = examples(&model, 6, &dir);
    let mut cache = ExampleCache::open(&dir, "tiny").unwrap();
    let (again, stats) = train::distill(
        &model,
        &prompts,
        &distill_config(),
        &mut cache,
        &ProgressBar::hidden(),
        false,
    )
    .unwrap();
    assert_eq!((stats.cached, stats.generated), (6, 0));
    assert_eq!(first, again);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn shape_padding_leaves_the_run_unchanged() {
    let model = tiny_model();
    let dir = temp_dir("pad");
    let all = examples(&model, 16, &dir);
    let (eval, train_set) = all.split_at(4);
    let control = RunControl::default();
    let run = |pad_multiple: usize| {
        let config = TrainConfig {
            pad_multiple,
            ..config(3)
        };
        let out = dir.join(format!("pad{pad_multiple}"));
        std::fs::create_dir_all(&out).unwrap();
        finished(train::train(&model, train_set, eval, &config, &control, &out, "pad").unwrap())
    };
    let (exact, exact_state) = run(0);
    let (padded, padded_state) = run(16);
    for (a, b) in exact_state.history.iter().zip(&padded_state.history) {
        assert!(
            (a.loss - b.loss).abs() <= 1e-4 * a.loss.abs(),
            "{a:?} vs {b:?}"
        );
    }
    for (a, b) in weights(&exact).iter().zip(&weights(&padded)) {
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff <= 1e-4, "weights differ by {diff}");
    }
    // Evaluation pads its batches too: same ranks, same targets.
    let (e, p) = (
        exact_state.evals.last().unwrap(),
        padded_state.evals.last().unwrap(),
    );
    assert_eq!((&e.rank_counts, &e.targets), (&p.rank_counts, &p.targets));
    for (a, b) in e.loss.iter().zip(&p.loss) {
        assert!((a - b).abs() <= 1e-4 * a.abs(), "{e:?} vs {p:?}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn time_limit_ends_training_early_with_evaluated_heads() {
    let model = tiny_model();
    let dir = temp_dir("time");
    let all = examples(&model, 12, &dir);
    let (eval, train_set) = all.split_at(4);
    let control = RunControl {
        time_limit: Some(0.0),
        checkpoint_every: 1,
        ..Default::default()
    };
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let (_, state) =
        finished(train::train(&model, train_set, eval, &config(5), &control, &out, "t").unwrap());
    assert_eq!((state.step, state.history.len()), (1, 1));
    assert!(state.time_limited);
    assert_eq!(state.evals.len(), 1, "the heads are evaluated");
    assert!(
        !out.join(checkpoint::FILE).exists(),
        "a finished run keeps no checkpoint"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn loss_decreases_and_heads_decode_losslessly() {
    let model = tiny_model();
    let dir = temp_dir("fit");
    let all = examples(&model, 40, &dir);
    let (eval, train_set) = all.split_at(8);
    let control = RunControl::default();
    let config = TrainConfig {
        lr: 1e-2,
        ..config(60)
    };
    let (heads, state) =
        finished(train::train(&model, train_set, eval, &config, &control, &dir, "fit").unwrap());
    let (first, last, losses) = loss_ends(&state);
    eprintln!("loss {first:.3} -> {last:.3}");
    assert!(last < 0.5 * first, "loss {first} -> {last}: {losses:?}");
    let eval_result = state.evals.last().unwrap();
    // Greedy self-distillation: the base LM head reproduces its own targets.
    assert_eq!(eval_result.top_k(0, 1), 1.0);
    // (Held-out accuracy stays low: a random model's continuations of random prompts share no
    // structure, so 32 training sequences can only be memorised.)
    eprintln!("held out: {}", train::trainer::accuracy_line(eval_result));

    // Save with the tree built from the measured accuracies, load back, decode.
    // (What `train` saves: `TreeSummary::from_eval` builds both.)
    let (summary, metadata) = TreeSummary::from_eval(eval_result, 15, 2, "random");
    let choices = tree::optimal_choices(&eval_result.rank_accuracy(), 15);
    assert_eq!(
        summary.expect("held-out targets were measured").choices,
        choices
    );
    assert_eq!(metadata.medusa_choices.as_ref(), Some(&choices));
    assert_eq!(metadata.medusa_accuracy, Some(eval_result.rank_accuracy()));
    let (loaded, meta) = save_and_load(&model, &heads, &dir, &metadata);
    assert_eq!(weights(&loaded), weights(&heads));
    assert_eq!(meta.medusa_choices.as_ref(), Some(&choices));
    // The saved accuracies rebuild the same tree for the same budget.
    let rebuilt = MedusaTree::from_spec(
        "optimal:15",
        loaded.num_heads(),
        meta.medusa_accuracy.as_deref(),
    )
    .unwrap();
    assert_eq!(
        rebuilt.choices,
        MedusaTree::new(&choices, loaded.num_heads())
            .unwrap()
            .choices
    );

    let tree = MedusaTree::new(&choices, loaded.num_heads()).unwrap();
    let untrained = MedusaHeads::init(
        &MedusaConfig {
            num_heads: 2,
            num_layers: 1,
            hidden_size: model.config.hidden_size,
            vocab_size: model.config.vocab_size,
            share_lm_head: false,
        },
        &model.module.lm_head,
    );
    let decode = DecodeConfig {
        max_new_tokens: RESPONSE,
        stop_tokens: vec![2],
        mode: AcceptMode::Greedy,
    };
    // On prompts the heads were fit on, trained heads must be accepted more often.
    let (mut trained_len, mut untrained_len) = (0.0, 0.0);
    for e in &train_set[..8] {
        let trained = MedusaDecoder::new(&model, &loaded, tree.clone()).unwrap();
        let out = trained.generate(&e.prompt, &decode, |_| {}).unwrap();
        assert_eq!(out.tokens, e.response, "lossless");
        trained_len += out.mean_accepted_length();
        let base = MedusaDecoder::new(&model, &untrained, tree.clone()).unwrap();
        untrained_len += base
            .generate(&e.prompt, &decode, |_| {})
            .unwrap()
            .mean_accepted_length();
    }
    eprintln!(
        "tokens/step: trained {trained_len:.3}, untrained {untrained_len:.3} (sum over prompts)"
    );
    assert!(
        trained_len > untrained_len,
        "tokens/step trained {trained_len} vs untrained {untrained_len}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn resumed_run_reproduces_uninterrupted_run() {
    let model = tiny_model();
    let dir = temp_dir("resume");
    let all = examples(&model, 24, &dir);
    let (eval, train_set) = all.split_at(4);
    // Hidden states cached across epochs: a resumed run recomputes them and must still agree.
    let config = TrainConfig {
        cache_hidden: true,
        ..config(7)
    };

    let straight_dir = dir.join("straight");
    let control = RunControl {
        checkpoint_every: 2,
        ..Default::default()
    };
    let (straight, straight_state) = finished(
        train::train(
            &model,
            train_set,
            eval,
            &config,
            &control,
            &straight_dir,
            "run",
        )
        .unwrap(),
    );
    // A finished run removes its checkpoint.
    assert!(!straight_dir.join(checkpoint::FILE).exists());

    // Interrupted after step 4 (as a kill right after that checkpoint would leave it), resumed.
    let resumed_dir = dir.join("resumed");
    let stop = RunControl {
        stop_after: Some(4),
        ..control.clone()
    };
    match train::train(&model, train_set, eval, &config, &stop, &resumed_dir, "run").unwrap() {
        Outcome::Stopped(state) => assert_eq!(state.step, 4),
        Outcome::Finished { .. } => panic!("should stop"),
    }
    assert!(resumed_dir.join(checkpoint::FILE).is_file());
    let wrong = train::train(
        &model,
        train_set,
        eval,
        &config,
        &RunControl {
            resume: true,
            ..control.clone()
        },
        &resumed_dir,
        "another run",
    );
    assert!(
        wrong.is_err(),
        "a different run must not resume this checkpoint"
    );
    let resume = RunControl {
        resume: true,
        ..control
    };
    let (resumed, resumed_state) = finished(
        train::train(
            &model,
            train_set,
            eval,
            &config,
            &resume,
            &resumed_dir,
            "run",
        )
        .unwrap(),
    );
    assert_eq!(resumed_state.history, straight_state.history);
    assert_eq!(resumed_state.evals, straight_state.evals);
    assert_eq!(weights(&resumed), weights(&straight));
    std::fs::remove_dir_all(dir).unwrap();
}

struct RequireGrad;

impl<B: burn::tensor::backend::Backend> ModuleMapper<B> for RequireGrad {
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        p.set_require_grad(true)
    }
}

#[test]
fn checkpoint_round_trip() {
    let model = tiny_model();
    let dir = temp_dir("ckpt");
    let all = examples(&model, 8, &dir);
    let base = Proj::<Cpu> {
        weight: Param::from_tensor(model.module.lm_head.weight.val()),
        bias: None,
    };
    let config = MedusaConfig {
        num_heads: 3,
        num_layers: 2,
        hidden_size: model.config.hidden_size,
        vocab_size: model.config.vocab_size,
        share_lm_head: false,
    };
    let fresh = || {
        <MedusaHeads<Ad> as AutodiffModule<Ad>>::from_inner(MedusaHeads::init(&config, &base))
            .map(&mut RequireGrad)
    };
    let base_ad = <Proj<Ad> as AutodiffModule<Ad>>::from_inner(base.clone());
    let mut heads = fresh();
    let mut optim = AdamWConfig::new().init::<Ad, MedusaHeads<Ad>>();
    let refs: Vec<&Example> = all.iter().collect();
    let batch = HeadBatch::new(&refs, &[2, 3, 4]);
    for _ in 0..2 {
        let hidden = Tensor::<Ad, 2>::from_inner(backbone_rows(&model, &batch).unwrap());
        let (loss, _) = medusa_loss(&heads, &base_ad, hidden, &batch, 0.8, None);
        let grads = GradientsParams::from_grads(loss.backward(), &heads);
        heads = optim.step(1e-2, heads, grads);
    }
    let path = dir.join(checkpoint::FILE);
    checkpoint::save(&path, &"state".to_string(), &heads, &optim).unwrap();
    let fresh_optim = AdamWConfig::new().init::<Ad, MedusaHeads<Ad>>();
    let (state, mut loaded, mut loaded_optim) =
        checkpoint::load::<Ad, _, _, String>(&path, fresh(), fresh_optim, &Default::default())
            .unwrap();
    assert_eq!(state, "state");
    assert_eq!(weights(&loaded.valid()), weights(&heads.valid()));
    // The optimizer state came back too: one more identical step gives identical weights.
    for (h, o) in [(&mut heads, &mut optim), (&mut loaded, &mut loaded_optim)] {
        let hidden = Tensor::<Ad, 2>::from_inner(backbone_rows(&model, &batch).unwrap());
        let (loss, _) = medusa_loss(h, &base_ad, hidden, &batch, 0.8, None);
        let grads = GradientsParams::from_grads(loss.backward(), &*h);
        *h = o.step(1e-2, h.clone(), grads);
    }
    assert_eq!(weights(&loaded.valid()), weights(&heads.valid()));
    // A truncated file is an error, not a panic.
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = checkpoint::load::<Ad, _, _, String>(
        &path,
        fresh(),
        AdamWConfig::new().init::<Ad, MedusaHeads<Ad>>(),
        &Default::default(),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("truncated"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Soft labels: head k's target at position t is the base model's own distribution for token
/// t + 1 + k, checked against a plain forward over the tokens before it (softmax in f64); with
/// greedy data its top token is the response token. A run on soft labels fits the heads.
#[test]
fn soft_labels_are_the_base_distribution_and_train() {
    let model = tiny_model();
    let dir = temp_dir("soft");
    let all = examples(&model, 24, &dir);
    let refs: Vec<&Example> = all[..3].iter().collect();
    let batch = HeadBatch::new(&refs, &[2, 3]);
    let base = Proj::<Cpu> {
        weight: Param::from_tensor(model.module.lm_head.weight.val()),
        bias: None,
    };
    let teachers = teacher_probs(backbone_hidden(&model, &batch).unwrap(), &batch, &base);
    let n = batch.num_rows();
    let mut checked = 0;
    for (j, probs) in teachers.into_iter().enumerate() {
        let probs: Vec<f32> = probs.into_data().convert::<f32>().to_vec().unwrap();
        let vocab = probs.len() / n;
        for i in 0..n {
            if batch.mask[j * n + i] == 0.0 {
                continue;
            }
            let flat = batch.rows[i] as usize;
            let (r, t) = (flat / batch.len, flat % batch.len);
            let seq: Vec<u32> = refs[r].tokens().collect();
            let target = t + batch.offsets[j];
            let logits: Vec<f64> = last_logits(model.forward_full(&seq[..target]).unwrap())
                .into_data()
                .convert::<f64>()
                .to_vec()
                .unwrap();
            let max = logits.iter().cloned().fold(f64::MIN, f64::max);
            let sum: f64 = logits.iter().map(|l| (l - max).exp()).sum();
            let row = &probs[i * vocab..(i + 1) * vocab];
            for (p, l) in row.iter().zip(&logits) {
                let want = (l - max).exp() / sum;
                assert!(
                    (*p as f64 - want).abs() < 1e-5,
                    "row {i} offset {j}: {p} vs {want}"
                );
            }
            let top = (0..vocab)
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .unwrap();
            assert_eq!(
                top as u32, seq[target],
                "greedy data: the top token is the target"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, batch.counts.iter().sum::<usize>());

    let (eval, train_set) = all.split_at(8);
    let config = TrainConfig {
        lr: 1e-2,
        soft_labels: true,
        ..config(40)
    };
    let control = RunControl::default();
    let (_, state) =
        finished(train::train(&model, train_set, eval, &config, &control, &dir, "soft").unwrap());
    let (first, last, losses) = loss_ends(&state);
    eprintln!("soft-label loss {first:.3} -> {last:.3}");
    assert!(last < 0.8 * first, "loss {first} -> {last}: {losses:?}");
    // A soft-label run with the hidden-state cache is refused, not silently hard-labelled.
    let cached = TrainConfig {
        cache_hidden: true,
        ..config
    };
    let err = train::train(&model, train_set, eval, &cached, &control, &dir, "soft2")
        .err()
        .unwrap();
    assert!(err.to_string().contains("soft labels"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn shared_lm_head_and_projection_learning_rate() {
    let model = tiny_model();
    let dir = temp_dir("proj");
    let all = examples(&model, 24, &dir);
    let (eval, train_set) = all.split_at(8);
    let control = RunControl::default();
    let base: Vec<f32> = model
        .module
        .lm_head
        .weight
        .val()
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap();
    let blocks_moved = |heads: &MedusaHeads<Cpu>| {
        heads.heads.iter().all(|h| {
            let w: Vec<f32> = h.blocks[0]
                .linear
                .weight
                .val()
                .into_data()
                .to_vec()
                .unwrap();
            w.iter().any(|&x| x != 0.0)
        })
    };

    // Shared LM head: the heads carry no projection, train, and save/load as such.
    let shared = TrainConfig {
        lr: 1e-2,
        share_lm_head: true,
        ..config(30)
    };
    let (heads, state) =
        finished(train::train(&model, train_set, eval, &shared, &control, &dir, "s").unwrap());
    assert!(heads.heads.iter().all(|h| h.lm_head.is_none()));
    assert!(blocks_moved(&heads));
    let (first, last, losses) = loss_ends(&state);
    assert!(
        last < first,
        "shared-head loss {first} -> {last}: {losses:?}"
    );
    let (loaded, _) = save_and_load(&model, &heads, &dir, &HeadsMetadata::default());
    assert!(loaded.heads.iter().all(|h| h.lm_head.is_none()));
    assert_eq!(weights(&loaded), weights(&heads));

    // A projection learning rate of 0 leaves the projections at the base LM head while the
    // blocks train; the default rate moves them.
    for (scale, frozen) in [(0.0, true), (1.0, false)] {
        let config = TrainConfig {
            lr: 1e-2,
            lm_head_lr_scale: scale,
            ..config(6)
        };
        let (heads, _) =
            finished(train::train(&model, train_set, eval, &config, &control, &dir, "p").unwrap());
        assert!(blocks_moved(&heads), "scale {scale}");
        for h in &heads.heads {
            let w: Vec<f32> = h
                .lm_head
                .as_ref()
                .unwrap()
                .weight
                .val()
                .into_data()
                .to_vec()
                .unwrap();
            assert_eq!(w == base, frozen, "scale {scale}");
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}
