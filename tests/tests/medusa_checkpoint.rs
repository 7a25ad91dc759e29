//! Medusa head checkpoints: a file written by an independent writer (Python safetensors, in
//! the published v1 key layout) loads and computes what numpy computed; our own files
//! round-trip; mismatched shapes are clear errors.

use burn::{
    module::Param,
    tensor::{DType, Tensor, TensorData},
};
use medusa::{MedusaHeads, checkpoint};
use model::llama::Proj;
use tests::{Cpu, fixture, fixtures_dir, tiny::temp_dir};

fn logits_of(heads: &MedusaHeads<Cpu>, hidden: &[Vec<f32>]) -> Vec<f32> {
    let device = Default::default();
    let rows = hidden.len();
    let h = hidden[0].len();
    let flat: Vec<f32> = hidden.iter().flatten().copied().collect();
    let x = Tensor::<Cpu, 3>::from_data(TensorData::new(flat, [1, rows, h]), &device);
    // Every head of the fixture has its own vocabulary projection; the base head is unused.
    let unused = Proj {
        weight: Param::from_tensor(Tensor::zeros([h, 1], &device)),
        bias: None,
    };
    heads.forward(x, &unused).into_data().to_vec().unwrap()
}

#[test]
fn published_layout_loads_and_matches_numpy() {
    let expected = fixture("medusa_tiny/expected.json");
    let dir = fixtures_dir().join("medusa_tiny");
    let (heads, meta) =
        checkpoint::load::<Cpu>(&dir, 8, 16, DType::F32, &Default::default()).unwrap();
    // config.json claims 5 heads and 1 layer; the tensors say 3 and 2.
    assert_eq!(heads.num_heads(), 3);
    assert_eq!(heads.config().num_layers, 2);
    assert_eq!(meta.base_model_name_or_path.as_deref(), Some("tiny"));
    let hidden: Vec<Vec<f32>> = serde_json::from_value(expected["hidden"].clone()).unwrap();
    let want: Vec<Vec<Vec<f64>>> = serde_json::from_value(expected["logits"].clone()).unwrap();
    let want: Vec<f64> = want.into_iter().flatten().flatten().collect();
    let got = logits_of(&heads, &hidden);
    let err: f64 = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (*a as f64 - b).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = want.iter().map(|b| b * b).sum::<f64>().sqrt();
    assert!(err / norm < 1e-5, "relative error {}", err / norm);
}

#[test]
fn own_checkpoints_round_trip() {
    let dir = fixtures_dir().join("medusa_tiny");
    let device = Default::default();
    let (heads, mut meta) = checkpoint::load::<Cpu>(&dir, 8, 16, DType::F32, &device).unwrap();
    // A config written before accuracies were saved still loads.
    assert_eq!(meta.medusa_accuracy, None);
    meta.medusa_choices = Some(vec![vec![0], vec![0, 0], vec![1]]);
    meta.medusa_accuracy = Some(vec![vec![0.5, 0.25], vec![0.125], vec![0.0625]]);
    let out = temp_dir("medusa-rt");
    checkpoint::save(&heads, &out, &meta).unwrap();
    let (again, meta2) = checkpoint::load::<Cpu>(&out, 8, 16, DType::F32, &device).unwrap();
    assert_eq!(again.config(), heads.config());
    assert_eq!(meta2.medusa_choices, meta.medusa_choices);
    assert_eq!(meta2.medusa_accuracy, meta.medusa_accuracy);
    let hidden = vec![vec![0.5f32; 8], vec![-1.0; 8]];
    assert_eq!(logits_of(&again, &hidden), logits_of(&heads, &hidden));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["medusa_num_heads"], 3);
    assert_eq!(config["medusa_num_layers"], 2);
}

#[test]
fn mismatched_base_model_is_an_error() {
    let dir = fixtures_dir().join("medusa_tiny");
    let device = Default::default();
    let e = checkpoint::load::<Cpu>(&dir, 9, 16, DType::F32, &device)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("hidden size 8") && e.contains("base model has 9"),
        "{e}"
    );
    let e = checkpoint::load::<Cpu>(&dir, 8, 17, DType::F32, &device)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("vocabulary 16") && e.contains("base model has 17"),
        "{e}"
    );
}

#[test]
fn missing_heads_name_the_path() {
    let device = Default::default();
    let empty = temp_dir("no-heads");
    for path in [empty.clone(), empty.join("absent.safetensors")] {
        let e = checkpoint::load::<Cpu>(&path, 8, 16, DType::F32, &device)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&path.display().to_string()) && e.contains(checkpoint::WEIGHTS_FILE),
            "{e}"
        );
    }
    std::fs::remove_dir_all(&empty).ok();
}
