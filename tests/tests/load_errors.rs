//! Bad checkpoints give errors that name the file, the tensor and the shapes; good ones load,
//! single-file or sharded.

use std::collections::BTreeMap;

use burn::tensor::DType;
use model::{Error, Llama, LlamaConfig, LoadOptions};
use tests::{
    Cpu,
    tiny::{self, temp_dir, write_dir},
};

fn load(dir: &std::path::Path) -> model::Result<Llama<Cpu>> {
    Llama::<Cpu>::load(dir, &LoadOptions::default(), &Default::default())
}

fn logits(model: &Llama<Cpu>) -> Vec<f32> {
    model
        .forward_full(&[1, 5, 7, 3])
        .unwrap()
        .cast(DType::F32)
        .into_data()
        .to_vec()
        .unwrap()
}

#[test]
fn good_checkpoint_loads_single_and_sharded() {
    let config = tiny::config();
    let dir = temp_dir("good");
    write_dir(&dir, &config);
    let single = logits(&load(&dir).unwrap());
    assert!(single.iter().all(|v| v.is_finite()));

    // Shard it in two with an index, as transformers does for large models.
    let sharded = temp_dir("sharded");
    std::fs::copy(dir.join("config.json"), sharded.join("config.json")).unwrap();
    let all = tiny::tensors(&config);
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    let mut weight_map = serde_json::Map::new();
    for (i, (name, t)) in all.into_iter().enumerate() {
        let file = if i % 2 == 0 {
            "model-00001-of-00002.safetensors"
        } else {
            "model-00002-of-00002.safetensors"
        };
        weight_map.insert(name.clone(), file.into());
        if i % 2 == 0 {
            a.insert(name, t)
        } else {
            b.insert(name, t)
        };
    }
    tiny::write_safetensors(&sharded.join("model-00001-of-00002.safetensors"), &a);
    tiny::write_safetensors(&sharded.join("model-00002-of-00002.safetensors"), &b);
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    assert_eq!(logits(&load(&sharded).unwrap()), single);
}

#[test]
fn missing_files_are_named() {
    let dir = temp_dir("missing");
    let e = load(&dir).unwrap_err().to_string();
    assert!(e.contains("config.json"), "{e}");
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&tiny::config()).unwrap(),
    )
    .unwrap();
    let e = load(&dir).unwrap_err().to_string();
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn truncated_safetensors_is_reported_with_its_path() {
    let dir = temp_dir("truncated");
    write_dir(&dir, &tiny::config());
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = load(&dir).unwrap_err();
    assert!(matches!(e, Error::Safetensors { .. }), "{e:?}");
    let e = e.to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );
}

#[test]
fn wrong_shape_names_tensor_and_shapes() {
    let config = tiny::config();
    let dir = temp_dir("shape");
    write_dir(&dir, &config);
    let mut tensors = tiny::tensors(&config);
    let name = "model.layers.1.self_attn.k_proj.weight".to_string();
    tensors.insert(name.clone(), (vec![8, 32], tiny::values(256, 9)));
    tiny::write_safetensors(&dir.join("model.safetensors"), &tensors);
    match load(&dir).unwrap_err() {
        Error::Shape {
            name: n,
            expected,
            found,
            ..
        } => {
            assert_eq!(n, name);
            assert_eq!(expected, vec![16, 32]);
            assert_eq!(found, vec![8, 32]);
        }
        e => panic!("expected a shape error, got {e}"),
    }
}

#[test]
fn missing_and_unexpected_tensors_are_listed() {
    let config = tiny::config();
    let dir = temp_dir("names");
    write_dir(&dir, &config);
    let mut tensors = tiny::tensors(&config);
    tensors.remove("model.layers.0.mlp.up_proj.weight");
    tiny::write_safetensors(&dir.join("model.safetensors"), &tensors);
    let e = load(&dir).unwrap_err().to_string();
    assert!(
        e.contains("model.layers.0.mlp.up_proj.weight") && e.contains("missing"),
        "{e}"
    );

    let mut tensors = tiny::tensors(&config);
    tensors.insert(
        "model.layers.0.extra.weight".into(),
        (vec![4], tiny::values(4, 1)),
    );
    tiny::write_safetensors(&dir.join("model.safetensors"), &tensors);
    let e = load(&dir).unwrap_err().to_string();
    assert!(e.contains("model.layers.0.extra.weight"), "{e}");
    // Non-strict loading tolerates it.
    let options = LoadOptions {
        strict: false,
        ..Default::default()
    };
    assert!(Llama::<Cpu>::load(&dir, &options, &Default::default()).is_ok());
}

#[test]
fn unknown_rope_type_is_a_config_error() {
    let dir = temp_dir("rope");
    write_dir(&dir, &tiny::config());
    let mut v: serde_json::Value = serde_json::to_value(tiny::config()).unwrap();
    v["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
    let e = load(&dir).unwrap_err().to_string();
    assert!(
        e.contains("config.json") && e.contains("\"yarn\" is not supported"),
        "{e}"
    );
}

#[test]
fn bf16_checkpoint_values_survive_conversion() {
    // A config round-trips through JSON, and loading in bf16 gives logits close to f32.
    let config = tiny::config();
    let text = serde_json::to_string(&config).unwrap();
    assert_eq!(LlamaConfig::from_json(&text).unwrap(), config);
    let dir = temp_dir("bf16");
    write_dir(&dir, &config);
    let f32_logits = logits(&load(&dir).unwrap());
    let options = LoadOptions::default().with_dtype(DType::BF16);
    let m = Llama::<Cpu>::load(&dir, &options, &Default::default()).unwrap();
    let bf = logits(&m);
    let err: f32 = f32_logits
        .iter()
        .zip(&bf)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f32>()
        .sqrt();
    let norm: f32 = f32_logits.iter().map(|a| a * a).sum::<f32>().sqrt();
    assert!(
        err / norm < 2e-2,
        "bf16 vs f32 relative error {}",
        err / norm
    );
}
