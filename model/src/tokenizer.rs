//! Tokenizer (Hugging Face `tokenizers`) and chat formatting for ChatML (SmolLM2) and Llama-3.

use std::path::Path;

use crate::error::{Error, Result};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// Speaker: `system`, `user` or `assistant`.
    pub role: String,
    /// The message text.
    pub content: String,
}

impl Message {
    /// A message with any role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
    /// A system message (instructions for the assistant).
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    /// An assistant message (a previous reply).
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// The chat formats this crate renders (the Jinja templates of the checkpoints, hand-written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatTemplate {
    /// `<|im_start|>{role}\n{content}<|im_end|>\n`; SmolLM2 inserts a default system message
    /// when the conversation has none.
    ChatMl {
        /// System prompt inserted when the conversation starts without one, taken from the
        /// checkpoint's template.
        default_system: Option<String>,
    },
    /// Llama-3 instruct: `<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>`,
    /// after `<|begin_of_text|>`, with contents trimmed.
    Llama3,
    /// No chat format: messages' contents are concatenated.
    Plain,
}

impl ChatTemplate {
    /// Recognises the format from a checkpoint's Jinja `chat_template`.
    pub fn detect(jinja: &str) -> Self {
        if jinja.contains("<|start_header_id|>") {
            ChatTemplate::Llama3
        } else if jinja.contains("<|im_start|>") {
            let default_system = jinja
                .split_once("<|im_start|>system\n")
                .and_then(|(_, rest)| rest.split_once("<|im_end|>"))
                .map(|(s, _)| s.to_string())
                .filter(|s| !s.contains('{'));
            ChatTemplate::ChatMl { default_system }
        } else {
            ChatTemplate::Plain
        }
    }

    /// Renders a conversation; with `add_generation_prompt`, ends with the assistant header.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> String {
        let mut out = String::new();
        match self {
            ChatTemplate::ChatMl { default_system } => {
                if let (Some(sys), Some(first)) = (default_system, messages.first())
                    && first.role != "system"
                {
                    out += &format!("<|im_start|>system\n{sys}<|im_end|>\n");
                }
                for m in messages {
                    out += &format!("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.content);
                }
                if add_generation_prompt {
                    out += "<|im_start|>assistant\n";
                }
            }
            ChatTemplate::Llama3 => {
                out += "<|begin_of_text|>";
                for m in messages {
                    out += &format!(
                        "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>",
                        m.role,
                        m.content.trim()
                    );
                }
                if add_generation_prompt {
                    out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
                }
            }
            ChatTemplate::Plain => {
                for m in messages {
                    out += &m.content;
                }
            }
        }
        out
    }
}

/// A `tokenizers` tokenizer plus the checkpoint's chat format.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    template: ChatTemplate,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("template", &self.template)
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` and, if present, the chat template of `tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let mut tok = Self::from_file(&dir.join("tokenizer.json"))?;
        let config = dir.join("tokenizer_config.json");
        if config.is_file() {
            let text = std::fs::read_to_string(&config).map_err(|e| Error::io(&config, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::Tokenizer {
                    path: config.clone(),
                    message: e.to_string(),
                })?;
            if let Some(t) = v.get("chat_template").and_then(|t| t.as_str()) {
                tok.template = ChatTemplate::detect(t);
            }
        }
        Ok(tok)
    }

    /// Loads a `tokenizer.json`; the chat format is guessed from its special tokens.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer file not found"),
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let template = if inner.token_to_id("<|start_header_id|>").is_some() {
            ChatTemplate::Llama3
        } else if inner.token_to_id("<|im_start|>").is_some() {
            ChatTemplate::ChatMl {
                default_system: None,
            }
        } else {
            ChatTemplate::Plain
        };
        Ok(Self { inner, template })
    }

    /// The chat format [`Self::encode_chat`] renders.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// Replaces the chat format, e.g. when the detected one is wrong.
    pub fn with_template(mut self, template: ChatTemplate) -> Self {
        self.template = template;
        self
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`. `add_special_tokens` runs the post-processor (e.g. Llama-3's BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Other(format!("tokenizer: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of a rendered conversation, ready for generation (the template already holds
    /// any BOS, so no special tokens are added again).
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>> {
        self.encode(&self.template.render(messages, true), false)
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, true).unwrap_or_default()
    }

    /// The id of a token string (e.g. `<|eot_id|>`), if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of `id`, if it is in the vocabulary.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// End-of-turn tokens of the chat format, to stop generation on.
    pub fn stop_tokens(&self) -> Vec<u32> {
        [
            "<|im_end|>",
            "<|eot_id|>",
            "<|end_of_text|>",
            "<|endoftext|>",
            "</s>",
        ]
        .iter()
        .filter_map(|t| self.token_to_id(t))
        .collect()
    }

    /// The underlying `tokenizers` object.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Incremental detokenisation for streaming: emits the new text of each token once it forms
/// complete UTF-8 (byte-level BPE splits multi-byte characters across tokens).
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    emitted: usize,
}

impl<'a> TextStream<'a> {
    /// A stream over `tokenizer` with nothing decoded yet.
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            emitted: 0,
        }
    }

    /// Adds a token; returns the text that became printable, if any.
    pub fn push(&mut self, id: u32) -> Option<String> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids);
        if text.ends_with('\u{FFFD}') || text.len() <= self.emitted {
            return None;
        }
        let new = text[self.emitted..].to_string();
        self.emitted = text.len();
        Some(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_inserts_default_system_prompt() {
        let jinja = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}";
        let t = ChatTemplate::detect(jinja);
        let s = t.render(&[Message::user("Hi")], true);
        assert_eq!(
            s,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let s = t.render(&[Message::system("S"), Message::user("Hi")], false);
        assert_eq!(
            s,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn llama3_format() {
        let s = ChatTemplate::Llama3.render(&[Message::user(" Hi ")], true);
        assert_eq!(
            s,
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }
}
