//! Medusa decoding as a library call, on the CPU (Flex backend): one prompt decoded greedily
//! by the base model alone and with Medusa heads, the two outputs compared, and what Medusa
//! accepted per step.
//!
//! ```text
//! cargo run --release -p train          # small heads into ./medusa-heads (minutes on a CPU)
//! cargo run --release -p medusa --example speculate -- --heads medusa-heads
//! cargo run --release -p medusa --example speculate -- --heads medusa-heads --tree optimal:16
//! ```
//!
//! Without `--heads` the heads are untrained (each a copy of the LM head behind a zero residual
//! block): decoding is still lossless, but each head guesses the base model's own next token
//! again instead of the ones after it, so almost nothing is accepted.
//!
//! On a CPU Medusa is slower than plain decoding: the work there is arithmetic (on a GPU a
//! batch-1 step waits on kernel launches and weight streaming instead), a tree step's grows
//! with its nodes, and SmolLM2's four head projections (49152 × 576 each) cost about as much as
//! one plain decode step. Untrained heads, `--max-new-tokens 32`, 2 cores: 21 tokens/s plain,
//! 2.8 with the 64-node tree, 6.1 with `--tree chain4`. The speedups are measured on a GPU:
//! `cargo run --release -p bench`.

use std::{path::PathBuf, time::Instant};

use anyhow::{Result, bail};
use burn::{backend::Flex, tensor::DType};
use clap::Parser;
use medusa::{
    AcceptMode, DecodeConfig, MedusaConfig, MedusaDecoder, MedusaHeads, MedusaTree, checkpoint,
};
use model::{GenerationConfig, Llama, LoadOptions, Message, ModelSource, Tokenizer, generate};

#[derive(Parser)]
struct Args {
    /// Base model: "default" (SmolLM2-135M-Instruct), a folder, a hub id or a .gguf file.
    #[arg(long, default_value = "default")]
    model: String,
    /// Folder of trained heads (`cargo run -p train` writes ./medusa-heads); untrained heads
    /// without it.
    #[arg(long)]
    heads: Option<PathBuf>,
    /// The user message (ChatML / the model's chat template is applied).
    #[arg(
        long,
        default_value = "List the first ten prime numbers and explain how you found them."
    )]
    prompt: String,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Candidate tree: a published one (`mc_sim_7b_63`), paths as JSON or a file holding them,
    /// or `optimal:N` from the accuracies saved with trained heads. Default: the tree saved with
    /// the heads, else `mc_sim_7b_63`.
    #[arg(long)]
    tree: Option<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dir = ModelSource::parse(&args.model).resolve()?;
    let device = Default::default();
    // f32: on the CPU it is the fast dtype, and greedy Medusa reproduces plain greedy decoding
    // exactly (in bf16 the tree step and a decode step round differently near ties).
    let dtype = DType::F32;
    let model = Llama::<Flex>::load(&dir, &LoadOptions::default().with_dtype(dtype), &device)?;
    let tokenizer = Tokenizer::from_dir(&dir)?;
    let prompt = tokenizer.encode_chat(&[Message::user(&args.prompt)])?;
    let stop_tokens = tokenizer.stop_tokens();

    let (heads, metadata) = match &args.heads {
        Some(path) => checkpoint::load::<Flex>(
            path,
            model.config.hidden_size,
            model.config.vocab_size,
            dtype,
            &device,
        )?,
        None => {
            eprintln!("no --heads: untrained heads, expect about one token per step");
            let config = MedusaConfig {
                num_heads: 4,
                num_layers: 1,
                hidden_size: model.config.hidden_size,
                vocab_size: model.config.vocab_size,
                share_lm_head: false,
            };
            let heads = MedusaHeads::init(&config, &model.module.lm_head);
            (heads, checkpoint::HeadsMetadata::default())
        }
    };
    let (tree, tree_source) =
        MedusaTree::for_heads(args.tree.as_deref(), heads.num_heads(), &metadata)?;
    println!(
        "{} heads, tree of {} nodes ({tree_source})",
        heads.num_heads(),
        tree.len()
    );

    let start = Instant::now();
    let plain = generate(
        &model,
        &prompt,
        &GenerationConfig {
            max_new_tokens: args.max_new_tokens,
            stop_tokens: stop_tokens.clone(),
            ..Default::default()
        },
        |_| {},
    )?;
    let plain_s = start.elapsed().as_secs_f64();

    let decoder = MedusaDecoder::new(&model, &heads, tree)?;
    let start = Instant::now();
    let out = decoder.generate(
        &prompt,
        &DecodeConfig {
            max_new_tokens: args.max_new_tokens,
            stop_tokens,
            mode: AcceptMode::Greedy,
        },
        |_| {},
    )?;
    let medusa_s = start.elapsed().as_secs_f64();

    println!("\n{}\n", tokenizer.decode(&out.tokens));
    println!(
        "plain greedy: {} tokens in {plain_s:.2} s ({:.1} tokens/s)",
        plain.tokens.len(),
        plain.tokens.len() as f64 / plain_s
    );
    println!(
        "Medusa:       {} tokens in {medusa_s:.2} s ({:.1} tokens/s), {} steps, {:.2} tokens per step",
        out.tokens.len(),
        out.tokens.len() as f64 / medusa_s,
        out.steps,
        out.mean_accepted_length()
    );
    let rates: Vec<String> = out
        .head_acceptance_rates()
        .iter()
        .enumerate()
        .map(|(k, r)| format!("head {}: {r:.2}", k + 1))
        .collect();
    println!("head acceptance rates: {}", rates.join(", "));
    if out.tokens != plain.tokens {
        bail!("greedy Medusa differs from plain greedy decoding in f32");
    }
    println!("identical to plain greedy decoding");
    Ok(())
}
