//! A hub id resolves from a local Hugging Face cache layout (`$HF_HOME/hub/models--org--name`),
//! offline, exactly as `huggingface_hub` lays it out.

use model::{Llama, LoadOptions, ModelSource, Tokenizer};
use tests::{Cpu, default_model_dir, tiny};

#[test]
fn hub_id_resolves_from_local_cache() {
    let home = tiny::temp_dir("hf-home");
    let repo = home.join("hub").join("models--test-org--tiny-llama");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snapshot = repo.join("snapshots").join(commit);
    tiny::write_dir(&snapshot, &tiny::config());
    std::fs::copy(
        default_model_dir().join("tokenizer.json"),
        snapshot.join("tokenizer.json"),
    )
    .unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), commit).unwrap();

    // SAFETY: this test binary has a single test, so no other thread reads the environment.
    unsafe {
        std::env::set_var("HF_HOME", &home);
        std::env::set_var("HF_HUB_OFFLINE", "1");
    }
    let source = ModelSource::parse("test-org/tiny-llama");
    let dir = source.resolve().unwrap();
    assert_eq!(dir, snapshot);
    let model = Llama::<Cpu>::load(&dir, &LoadOptions::default(), &Default::default()).unwrap();
    assert_eq!(model.config.num_hidden_layers, 2);
    Tokenizer::from_dir(&dir).unwrap();

    // Another revision is not in the cache: offline, that is a clear error.
    let e = ModelSource::parse("test-org/tiny-llama@v2")
        .resolve()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("HF_HUB_OFFLINE") && e.contains("test-org/tiny-llama@v2"),
        "{e}"
    );
}
