//! Generate text from a prompt on the CPU (Flex backend), streaming tokens as they come.
//!
//! ```text
//! cargo run --release -p model --example generate -- --prompt "What is Rust?"
//! cargo run --release -p model --example generate -- --model ./my-llama --temperature 0.7
//! ```

use std::io::Write;

use anyhow::Result;
use burn::{backend::Flex, tensor::DType};
use clap::Parser;
use model::{
    GenerationConfig, Llama, LoadOptions, Message, ModelSource, Sampling, TextStream, Tokenizer,
    generate,
};

#[derive(Parser)]
struct Args {
    /// Model: "default" (SmolLM2-135M-Instruct), a folder, a hub id or a .gguf file.
    #[arg(long, default_value = "default")]
    model: String,
    #[arg(long, default_value = "What is the capital of France?")]
    prompt: String,
    /// Use the prompt as raw text instead of a chat message.
    #[arg(long)]
    raw: bool,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 means greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let source = ModelSource::parse(&args.model);
    let dir = source.resolve()?;
    let device = Default::default();
    let model = Llama::<Flex>::load(
        &dir,
        &LoadOptions::default().with_dtype(DType::F32),
        &device,
    )?;
    let tokenizer = Tokenizer::from_dir(&dir)?;
    let prompt = if args.raw {
        tokenizer.encode(&args.prompt, true)?
    } else {
        tokenizer.encode_chat(&[Message::user(&args.prompt)])?
    };
    let sampling = if args.temperature > 0.0 {
        Sampling::TopP {
            temperature: args.temperature,
            top_p: args.top_p,
            seed: args.seed,
        }
    } else {
        Sampling::Greedy
    };
    let config = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        sampling,
        stop_tokens: tokenizer.stop_tokens(),
    };
    let mut stream = TextStream::new(&tokenizer);
    let out = generate(&model, &prompt, &config, |t| {
        if let Some(text) = stream.push(t) {
            print!("{text}");
            let _ = std::io::stdout().flush();
        }
    })?;
    println!();
    let n = out.tokens.len();
    eprintln!(
        "{} prompt tokens, {n} generated ({:?}); prefill {:.0} ms, decode {:.1} tok/s",
        prompt.len(),
        out.finish,
        out.prefill.as_secs_f64() * 1e3,
        (n.saturating_sub(1)) as f64 / out.decode.as_secs_f64().max(1e-9)
    );
    Ok(())
}
