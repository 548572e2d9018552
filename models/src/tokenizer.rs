//! Rebuilds a Hugging Face `tokenizers` tokenizer from GGUF vocabulary metadata.
//!
//! GGUF stores the byte-level BPE vocabulary, merges, token types and a pre-tokenizer name
//! (`tokenizer.ggml.pre`); the pre-tokenizer's split rules live in llama.cpp's code, so they are
//! spelled out here per name.

use crate::Error;
use serde_json::{json, Value};
use std::ops::Range;
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

/// Token ids of `text` read as plain text: an added token's spelling in it (`<|im_end|>`) is
/// tokenized as its characters, never matched to the token. The tokenizer's own pipeline
/// (normalizer, pre-tokenizer, model) without its added vocabulary: for text that spells no
/// added token, the ids [`encode`] gives.
pub fn encode_text(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, Error> {
    use tokenizers::{Model, Normalizer, OffsetType, PreTokenizedString, PreTokenizer};
    let err = |e: tokenizers::Error| Error::Tokenizer(e.to_string());
    let mut normalized = tokenizers::NormalizedString::from(text);
    if let Some(n) = tokenizer.get_normalizer() {
        n.normalize(&mut normalized).map_err(err)?;
    }
    let mut pre = PreTokenizedString::from(normalized);
    if let Some(p) = tokenizer.get_pre_tokenizer() {
        p.pre_tokenize(&mut pre).map_err(err)?;
    }
    pre.tokenize(|s| tokenizer.get_model().tokenize(s.get())).map_err(err)?;
    Ok(pre.into_encoding(None, 0, OffsetType::Byte).map_err(err)?.get_ids().to_vec())
}

/// Token ids of `text` whose byte ranges `plain` (user input inside a prompt) are read as
/// plain text, while added tokens elsewhere (the chat template's markers) stay single ids.
/// Where `plain` spells no added token these are exactly [`encode`]'s ids; otherwise the
/// text between the markers outside `plain` is tokenized by [`encode_text`].
pub fn encode_with_plain(tokenizer: &Tokenizer, text: &str, plain: &[Range<usize>]) -> Result<Vec<u32>, Error> {
    let enc = tokenizer.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
    let added = tokenizer.get_added_vocabulary().get_added_tokens_decoder();
    let in_plain = |(s, e): (usize, usize)| plain.iter().any(|r| s < r.end && r.start < e);
    let tokens = || enc.get_ids().iter().copied().zip(enc.get_offsets().iter().copied());
    if !tokens().any(|(id, at)| added.contains_key(&id) && in_plain(at)) {
        return Ok(enc.get_ids().to_vec());
    }
    let mut ids = Vec::with_capacity(enc.len());
    let mut start = 0;
    for (id, (s, e)) in tokens() {
        if added.contains_key(&id) && !in_plain((s, e)) && s >= start {
            ids.extend(encode_text(tokenizer, &text[start..s])?);
            ids.push(id);
            start = e;
        }
    }
    ids.extend(encode_text(tokenizer, &text[start..])?);
    Ok(ids)
}

/// Whether `id` is one of the tokenizer's added tokens (special or control tokens such as
/// `<|im_end|>`, `[SEP]`), which plain text never produces.
pub fn is_added(tokenizer: &Tokenizer, id: u32) -> bool {
    tokenizer.get_added_vocabulary().get_added_tokens_decoder().contains_key(&id)
}

/// Text of `ids`, special tokens included.
pub fn decode(tokenizer: &Tokenizer, ids: &[u32]) -> Result<String, Error> {
    tokenizer.decode(ids, false).map_err(|e| Error::Tokenizer(e.to_string()))
}
