//! Kernel launches per decoding step on the real model (wgpu runtime, f32).
//!
//! On a GPU, batch-1 decoding of a small model is launch-bound: SmolLM2-135M's decode step
//! costs 3.3 ms on an H200, about 12 µs for each of its launches
//! (docs/benchmarks/2026-11-29-h200-extra-responses). The count of launches per step is
//! therefore the number that a change to the decode path must not grow; unlike a time it is
//! exact on any machine, so it is checked here against the budget the decode path was built to
//! (projections folded into their consumers: 8 launches per layer). CubeCL's profiling logger
//! (level `minimal`) names every kernel it runs; `--nocapture` prints the count per kernel.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use burn::backend::wgpu::{CubeBackend, WgpuRuntime};
use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig, profiling::ProfilingLogLevel};
use medusa::{AcceptMode, DecodeConfig, MedusaDecoder, MedusaTree};
use model::{GenerationConfig, Llama, LoadOptions, generate};
use tests::{default_model_dir, fixture};

type Cube = CubeBackend<WgpuRuntime, f32, i32, u32>;

/// The kernels launched so far, one name per launch.
fn launched(log: &PathBuf) -> Vec<String> {
    // The logger writes from its own thread.
    std::thread::sleep(Duration::from_secs(1));
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split("Executing ").nth(1))
        .map(|name| name.split(" | ").next().unwrap_or(name).to_string())
        .collect()
}

/// Launches per step between two runs of `short` and `long` steps, in total and per kernel.
fn per_step(short: &[String], long: &[String], steps: f64) -> (f64, BTreeMap<String, f64>) {
    let mut by_kernel = BTreeMap::new();
    for name in long {
        *by_kernel.entry(name.clone()).or_insert(0.0) += 1.0 / steps;
    }
    for name in short {
        *by_kernel.entry(name.clone()).or_insert(0.0) -= 1.0 / steps;
    }
    by_kernel.retain(|_, n: &mut f64| n.abs() > 1e-9);
    ((long.len() as f64 - short.len() as f64) / steps, by_kernel)
}

#[test]
fn launches_per_decode_and_tree_step() {
    let log = std::env::temp_dir().join(format!("launches-{}.log", std::process::id()));
    let mut config = CubeClRuntimeConfig::default();
    config.profiling.logger.level = ProfilingLogLevel::Minimal;
    config.profiling.logger.file = Some(log.clone());
    config.profiling.logger.append = false;
    CubeClRuntimeConfig::set(config);

    let device = Default::default();
    let model =
        Llama::<Cube>::load(&default_model_dir(), &LoadOptions::default(), &device).unwrap();
    let layers = model.config.num_hidden_layers as f64;
    let reference = fixture("smollm2_reference.json");
    let prompt: Vec<u32> =
        serde_json::from_value(reference["chat"][0]["input_ids"].clone()).unwrap();

    // Plain decoding: the difference between 4 and 12 new tokens is 8 decode steps.
    let run = |n: usize| {
        let config = GenerationConfig {
            max_new_tokens: n,
            ..Default::default()
        };
        generate(&model, &prompt, &config, |_| {}).unwrap();
    };
    run(2); // first use: compilation and autotune launches
    let before = launched(&log);
    run(4);
    let short = launched(&log)[before.len()..].to_vec();
    let mid = launched(&log).len();
    run(12);
    let long = launched(&log)[mid..].to_vec();
    let (decode, decode_kernels) = per_step(&short, &long, 8.0);
    println!("decode step: {decode} launches");
    for (name, n) in &decode_kernels {
        println!("  {n:6.2}  {name}");
    }

    // Medusa (untrained heads, so mostly the root is accepted): launches per tree step.
    let heads = tests::untrained_heads(&model, 4);
    let tree = MedusaTree::named_or_json("mc_sim_7b_63", 4).unwrap();
    let decoder = MedusaDecoder::new(&model, &heads, tree).unwrap();
    let run = |n: usize| {
        let config = DecodeConfig {
            max_new_tokens: n,
            stop_tokens: vec![],
            mode: AcceptMode::Greedy,
        };
        decoder.generate(&prompt, &config, |_| {}).unwrap().steps
    };
    run(2);
    let before = launched(&log).len();
    let short_steps = run(4);
    let short = launched(&log)[before..].to_vec();
    let mid = launched(&log).len();
    let long_steps = run(12);
    let long = launched(&log)[mid..].to_vec();
    let (tree_step, tree_kernels) = per_step(&short, &long, (long_steps - short_steps) as f64);
    println!("tree step: {tree_step:.1} launches");
    for (name, n) in &tree_kernels {
        println!("  {n:6.2}  {name}");
    }
    let _ = std::fs::remove_file(&log);

    // 8 per layer: attention, 4 projections (q/k/v and gate/up fused; the down projection
    // computes SwiGLU as it stages its input), RoPE + cache append, two residual add + RMSNorm;
    // plus the final norm, LM head, argmax and the token. (9 per layer until 2026-12-07, when
    // SwiGLU was a launch of its own.)
    assert!(
        decode <= 8.0 * layers + 4.0,
        "a decode step launches {decode} kernels, over the budget of {}",
        8.0 * layers + 4.0
    );
    // Measured 2026-11-29 for 30 layers: 438-460 while RoPE and the cache write were two
    // launches for the tree's rows, attention's output took a layout copy and the candidates'
    // top-k ten rounds of argmax and masking; 378 without the first two, 339 with the top-k
    // kernel, 340 with its two passes over long rows, 306 with the heads' residual blocks
    // computed together (per layer 11 launches, then the heads, the candidates and the KV
    // compaction, one gather per layer on steps that accept more than the root); 276.3 on
    // 2026-12-07 with SwiGLU inside the down projection (f32 tree products are SIMT ones, so
    // they fold too; f16/bf16 trees on CUDA take tensor cores and do not). Each launch a
    // tree step adds costs Medusa part of its speedup on launch-bound GPUs: the budget (11 per
    // layer) fails when any of those comes back.
    assert!(
        tree_step <= 11.0 * layers,
        "a tree step launches {tree_step:.1} kernels, over the budget of {}",
        11.0 * layers
    );
}
