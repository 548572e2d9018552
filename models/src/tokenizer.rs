//! Rebuilds a Hugging Face `tokenizers` tokenizer from GGUF vocabulary metadata.
//!
//! GGUF stores the byte-level BPE vocabulary, merges, token types and a pre-tokenizer name
//! (`tokenizer.ggml.pre`); the pre-tokenizer's split rules live in llama.cpp's code, so they are
//! spelled out here per name.

use crate::Error;
use serde_json::{json, Value};
use tokenizers::Tokenizer;

/// Qwen2's split: contractions, letters with one leading non-letter, single digits,
/// punctuation runs, newlines, whitespace.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's split: as Qwen2's but digits in groups of up to three.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// The vocabulary part of a GGUF file's metadata.
#[derive(Debug, Clone)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`, e.g. `gpt2` for byte-level BPE.
    pub model: String,
    /// `tokenizer.ggml.pre`, e.g. `qwen2`, `smollm`, `llama-bpe`.
    pub pre: String,
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
    pub token_types: Vec<i32>,
}

/// The pre-tokenizer (and normalizer) for a GGUF pre-tokenizer name.
fn pre_tokenizer(pre: &str) -> Result<(Value, Value), Error> {
    let byte_level_no_regex =
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    let gpt2 = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    Ok(match pre {
        "qwen2" => (
            json!({"type": "NFC"}),
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level_no_regex]}),
        ),
        "llama-bpe" | "llama3" => {
            (Value::Null, json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level_no_regex]}))
        }
        "smollm" => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, gpt2]}),
        ),
        "gpt-2" | "gpt2" | "default" => (Value::Null, gpt2),
        other => {
            return Err(Error::Tokenizer(format!(
                "pre-tokenizer {other:?} is not supported (qwen2, llama-bpe, smollm, gpt-2 are)"
            )))
        }
    })
}

/// The `tokenizer.json` document equivalent to a GGUF vocabulary.
pub fn tokenizer_json(vocab: &GgufVocab) -> Result<Value, Error> {
    if vocab.model != "gpt2" {
        return Err(Error::Tokenizer(format!(
            "tokenizer model {:?} is not supported (byte-level BPE, \"gpt2\", is)",
            vocab.model
        )));
    }
    let (normalizer, pre_tokenizer) = pre_tokenizer(&vocab.pre)?;
    let mut map = serde_json::Map::with_capacity(vocab.tokens.len());
    let mut added = Vec::new();
    for (id, token) in vocab.tokens.iter().enumerate() {
        map.entry(token.clone()).or_insert(json!(id));
        let ty = vocab.token_types.get(id).copied().unwrap_or(1);
        if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
            added.push(json!({
                "id": id, "content": token, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": ty == TOKEN_TYPE_CONTROL,
            }));
        }
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": map, "merges": vocab.merges,
        },
    }))
}

/// A tokenizer that produces the same ids as llama.cpp for this vocabulary.
pub fn from_gguf_vocab(vocab: &GgufVocab) -> Result<Tokenizer, Error> {
    let json = tokenizer_json(vocab)?.to_string();
    json.parse::<Tokenizer>().map_err(|e| Error::Tokenizer(e.to_string()))
}

/// Token ids of `text`, with special tokens in the text parsed as single ids and no BOS/EOS
/// added (callers add BOS when the model asks for it).
pub fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, Error> {
    let enc = tokenizer.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
    Ok(enc.get_ids().to_vec())
}

/// Text of `ids`, special tokens included.
pub fn decode(tokenizer: &Tokenizer, ids: &[u32]) -> Result<String, Error> {
    tokenizer.decode(ids, false).map_err(|e| Error::Tokenizer(e.to_string()))
}
