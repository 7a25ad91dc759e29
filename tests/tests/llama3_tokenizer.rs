//! The real Llama-3 tokenizer against published token ids.

use model::{ChatTemplate, Message, Tokenizer};
use tests::llama3_tokenizer_json;

#[test]
fn llama3_tokenizer_gives_published_ids() {
    let tok = Tokenizer::from_file(&llama3_tokenizer_json()).unwrap();
    assert_eq!(tok.encode("Hello world", false).unwrap(), vec![9906, 1917]);
    assert_eq!(
        tok.encode("Hello, world!", false).unwrap(),
        vec![9906, 11, 1917, 0]
    );
    assert_eq!(tok.token_to_id("<|begin_of_text|>"), Some(128000));
    assert_eq!(tok.token_to_id("<|eot_id|>"), Some(128009));
    assert_eq!(tok.decode(&[9906, 11, 1917, 0]), "Hello, world!");
}

#[test]
fn llama3_chat_format() {
    let tok = Tokenizer::from_file(&llama3_tokenizer_json()).unwrap();
    assert_eq!(tok.template(), &ChatTemplate::Llama3);
    let ids = tok.encode_chat(&[Message::user("Hi")]).unwrap();
    // <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>
    // <|start_header_id|>assistant<|end_header_id|>\n\n
    assert_eq!(
        ids,
        vec![
            128000, 128006, 882, 128007, 271, 13347, 128009, 128006, 78191, 128007, 271
        ]
    );
    assert!(tok.stop_tokens().contains(&128009));
}
