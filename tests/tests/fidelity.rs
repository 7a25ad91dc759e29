//! The real SmolLM2-135M-Instruct on the CPU against Hugging Face transformers
//! (fixtures from `scripts/make_fixtures.py`, which loads the GGUF with transformers' own reader).

use burn::tensor::{DType, Tensor};
use model::{GenerationConfig, Message, generate, generate::last_logits};
use tests::{default_model, fixture};

#[test]
fn tokenization_matches_transformers() {
    let (_, tokenizer) = default_model();
    let reference = fixture("smollm2_reference.json");
    for case in reference["texts"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let expected: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(
            tokenizer.encode(text, false).unwrap(),
            expected,
            "text {text:?}"
        );
    }
    for case in reference["chat"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let expected: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let ids = tokenizer.encode_chat(&[Message::user(prompt)]).unwrap();
        assert_eq!(ids, expected, "chat prompt {prompt:?}");
    }
}

#[test]
fn logits_and_greedy_continuation_match_transformers() {
    let (model, _) = default_model();
    let reference = fixture("smollm2_reference.json");
    for case in reference["chat"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let top5: Vec<u32> = serde_json::from_value(case["top5_ids"].clone()).unwrap();
        let top5_logits: Vec<f64> = serde_json::from_value(case["top5_logits"].clone()).unwrap();
        let greedy: Vec<u32> = serde_json::from_value(case["greedy_ids"].clone()).unwrap();

        let logits = last_logits(model.forward_full(&ids).unwrap()).cast(DType::F32);
        let values: Vec<f32> = logits.clone().into_data().to_vec().unwrap();
        let mut order: Vec<usize> = (0..values.len()).collect();
        order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
        let ours: Vec<u32> = order[..5].iter().map(|&i| i as u32).collect();
        assert_eq!(ours, top5, "top-5 ids for {prompt:?}");
        let rel = (values[order[0]] as f64 - top5_logits[0]).abs() / top5_logits[0].abs();
        assert!(
            rel <= 1e-3,
            "top-1 logit {} vs {} (rel {rel:e}) for {prompt:?}",
            values[order[0]],
            top5_logits[0]
        );

        let config = GenerationConfig {
            max_new_tokens: greedy.len(),
            ..Default::default()
        };
        let out = generate(&model, &ids, &config, |_| {}).unwrap();
        assert_eq!(out.tokens, greedy, "greedy continuation of {prompt:?}");
    }
}

#[test]
fn kv_cached_generation_equals_full_recomputation() {
    let (model, tokenizer) = default_model();
    let prompt = tokenizer
        .encode_chat(&[Message::user("Name three primary colors.")])
        .unwrap();
    let config = GenerationConfig {
        max_new_tokens: 12,
        ..Default::default()
    };
    let cached = generate(&model, &prompt, &config, |_| {}).unwrap().tokens;
    // Recompute every step from scratch: no cache reuse at all.
    let mut seq = prompt.clone();
    for (step, &expected) in cached.iter().enumerate() {
        let logits = last_logits(model.forward_full(&seq).unwrap());
        let next = model::generate::argmax::<tests::Cpu>(logits);
        assert_eq!(next, expected, "step {step}");
        seq.push(next);
    }
    // And the cached logits themselves agree with the full pass at the last position.
    let full = last_logits(model.forward_full(&seq).unwrap());
    let mut cache = model.new_cache(1, seq.len());
    let _ = model
        .forward(model.tokens(&seq[..seq.len() - 1], 1), &mut cache)
        .unwrap();
    let step = last_logits(
        model
            .forward(model.tokens(&seq[seq.len() - 1..], 1), &mut cache)
            .unwrap(),
    );
    let diff: f32 = (full.clone() - step).abs().max().into_scalar();
    let scale: f32 = full.abs().max().into_scalar();
    assert!(
        diff <= 1e-4 * scale,
        "cached vs full logits differ by {diff} (scale {scale})"
    );
    let _ = Tensor::<tests::Cpu, 1>::empty([1], &Default::default());
}

#[test]
fn llama31_rope_frequencies_match_transformers() {
    let reference = fixture("rope_llama31.json");
    let expected: Vec<f64> = serde_json::from_value(reference["inv_freq"].clone()).unwrap();
    let mut config = model::LlamaConfig::llama3_8b();
    config.rope_scaling = Some(model::RopeScaling {
        rope_type: "llama3".into(),
        factor: Some(8.0),
        low_freq_factor: Some(1.0),
        high_freq_factor: Some(4.0),
        original_max_position_embeddings: Some(8192),
    });
    let ours = model::rope::inv_freq(&config);
    assert_eq!(ours.len(), expected.len());
    for (i, (a, b)) in ours.iter().zip(&expected).enumerate() {
        assert!(
            ((*a as f64) - b).abs() <= 1e-6 * b.abs(),
            "inv_freq[{i}]: {a} vs {b}"
        );
    }
}
