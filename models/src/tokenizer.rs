//! Rebuilds a Hugging Face `tokenizers` tokenizer from GGUF vocabulary metadata.
//!
//! GGUF stores one of two vocabularies (`tokenizer.ggml.model`):
//! - `gpt2`, byte-level BPE (SmolLM2, Qwen, Llama 3): the vocabulary, merges, token types and a
//!   pre-tokenizer name (`tokenizer.ggml.pre`), whose split rules live in llama.cpp's code and
//!   are spelled out here per name;
//! - `llama`, SentencePiece BPE (Llama 2, Mistral, Gemma): pieces with scores and token types,
//!   no merges, and whether a space goes before the text (`tokenizer.ggml.add_space_prefix`).
//!   SentencePiece (and llama.cpp after it) repeatedly merges the adjacent pair whose joined
//!   piece scores highest; a BPE whose merges are every split of every piece, ranked by the
//!   joined piece's score, makes the same choices. Spaces become `▁`, and characters outside
//!   the vocabulary fall back to their bytes' `<0xXX>` pieces. Tested against Google's
//!   sentencepiece on two trained vocabularies (`tests/fixtures/spm`).

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
const TOKEN_TYPE_NORMAL: i32 = 1;
const TOKEN_TYPE_UNKNOWN: i32 = 2;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// SentencePiece's word-boundary mark, which stands for a space in its pieces.
const SPM_SPACE: &str = "\u{2581}";

/// The vocabulary part of a GGUF file's metadata.
#[derive(Debug, Clone)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `gpt2` for byte-level BPE, `llama` for SentencePiece.
    pub model: String,
    /// `tokenizer.ggml.pre`, e.g. `qwen2`, `smollm`, `llama-bpe` (byte-level BPE only).
    pub pre: String,
    pub tokens: Vec<String>,
    /// Byte-level BPE merges, `"a b"` (SentencePiece files have none).
    pub merges: Vec<String>,
    pub token_types: Vec<i32>,
    /// SentencePiece piece scores, one per token (empty for byte-level BPE).
    pub scores: Vec<f32>,
    /// SentencePiece: a space before the text (and after each special token), as
    /// `tokenizer.ggml.add_space_prefix` says (llama.cpp's default: yes).
    pub add_space_prefix: bool,
    /// `tokenizer.ggml.unknown_token_id`, if the file names one.
    pub unk: Option<u32>,
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
    match vocab.model.as_str() {
        "gpt2" => byte_level_json(vocab),
        "llama" => sentencepiece_json(vocab),
        other => Err(Error::Tokenizer(format!(
            "tokenizer model {other:?} is not supported (byte-level BPE \"gpt2\" and SentencePiece \"llama\" are)"
        ))),
    }
}

/// Token type of `id` (normal where the file lists none).
fn token_type(vocab: &GgufVocab, id: usize) -> i32 {
    vocab.token_types.get(id).copied().unwrap_or(TOKEN_TYPE_NORMAL)
}

/// The vocabulary map (the first id of each spelling) and the added tokens: control and
/// unknown tokens (SentencePiece's `<unk>`; the shipped byte-level files type none) as special,
/// user-defined ones as plain added tokens, all matched in text before the model runs, as
/// llama.cpp's `parse_special` does.
fn vocab_and_added(vocab: &GgufVocab) -> (serde_json::Map<String, Value>, Vec<Value>) {
    let mut map = serde_json::Map::with_capacity(vocab.tokens.len());
    let mut added = Vec::new();
    for (id, token) in vocab.tokens.iter().enumerate() {
        map.entry(token.clone()).or_insert(json!(id));
        let ty = token_type(vocab, id);
        let special = ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_UNKNOWN;
        if special || ty == TOKEN_TYPE_USER_DEFINED {
            added.push(json!({
                "id": id, "content": token, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": special,
            }));
        }
    }
    (map, added)
}

/// A SentencePiece BPE vocabulary (see the module): a space mark before the text where the
/// file asks for it, spaces as `▁`, merges ranked by the joined piece's score, byte fallback.
fn sentencepiece_json(vocab: &GgufVocab) -> Result<Value, Error> {
    let n = vocab.tokens.len();
    if vocab.scores.len() != n {
        return Err(Error::Tokenizer(format!(
            "a SentencePiece vocabulary needs one score per token (tokenizer.ggml.scores): {} scores for {n} tokens",
            vocab.scores.len()
        )));
    }
    let (map, added) = vocab_and_added(vocab);
    let id_of = |piece: &str| map.get(piece).and_then(Value::as_u64).map(|id| id as usize);
    // Every split of a normal piece into two pieces that can be symbols (normal pieces, or
    // single characters), best joined score first; for one score, the lower joined id, then
    // the longer left part (any fixed order: the pieces' scores differ in trained models).
    let mut merges: Vec<(f32, usize, usize, &str, &str)> = Vec::new();
    for (id, piece) in vocab.tokens.iter().enumerate() {
        if token_type(vocab, id) != TOKEN_TYPE_NORMAL || id_of(piece) != Some(id) {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(at);
            let symbol =
                |p: &str| id_of(p).is_some_and(|i| token_type(vocab, i) == TOKEN_TYPE_NORMAL || p.chars().count() == 1);
            if symbol(left) && symbol(right) {
                merges.push((vocab.scores[id], id, usize::MAX - left.len(), left, right));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges: Vec<[&str; 2]> = merges.iter().map(|m| [m.3, m.4]).collect();
    let replace_spaces = json!({"type": "Replace", "pattern": {"String": " "}, "content": SPM_SPACE});
    let normalizer = if vocab.add_space_prefix {
        json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPM_SPACE}, replace_spaces]})
    } else {
        replace_spaces
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": SPM_SPACE}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if vocab.add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let unk = vocab.unk.and_then(|id| vocab.tokens.get(id as usize)).cloned();
    let bpe = Bpe { unk, fuse_unk: true, byte_fallback: true, merges: json!(merges) };
    Ok(document(added, normalizer, Value::Null, json!({"type": "Sequence", "decoders": decoders}), map, bpe))
}

/// The BPE model's settings that differ between the two vocabulary kinds.
struct Bpe {
    unk: Option<String>,
    fuse_unk: bool,
    byte_fallback: bool,
    merges: Value,
}

/// A `tokenizer.json` document: a BPE model over `vocab`, and the pipeline around it.
fn document(
    added: Vec<Value>,
    normalizer: Value,
    pre_tokenizer: Value,
    decoder: Value,
    vocab: serde_json::Map<String, Value>,
    bpe: Bpe,
) -> Value {
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": decoder,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": bpe.unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": bpe.fuse_unk, "byte_fallback": bpe.byte_fallback,
            "ignore_merges": false, "vocab": vocab, "merges": bpe.merges,
        },
    })
}

/// A byte-level BPE vocabulary with its merges and pre-tokenizer.
fn byte_level_json(vocab: &GgufVocab) -> Result<Value, Error> {
    let (normalizer, pre_tokenizer) = pre_tokenizer(&vocab.pre)?;
    let (map, added) = vocab_and_added(vocab);
    let decoder = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
    let bpe = Bpe { unk: None, fuse_unk: false, byte_fallback: false, merges: json!(vocab.merges) };
    Ok(document(added, normalizer, pre_tokenizer, decoder, map, bpe))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Two SentencePiece BPE vocabularies (Llama 2's settings and Gemma's) as llama.cpp's
    /// converter writes them to GGUF, and Google's sentencepiece's ids for test strings
    /// (`scripts/fixtures/make_spm_fixture.py`): ours must be the same, id for id, including
    /// byte fallback, runs of spaces, the space put before the text (or not), and user-defined
    /// markers matched in the text.
    #[test]
    fn sentencepiece_vocabularies_tokenize_as_sentencepiece_does() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/spm/vocabs.json");
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for (name, v) in doc.as_object().unwrap() {
            let strings = |k: &str| -> Vec<String> {
                v[k].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect()
            };
            let vocab = GgufVocab {
                model: "llama".into(),
                pre: "default".into(),
                tokens: strings("tokens"),
                merges: Vec::new(),
                token_types: v["token_types"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap() as i32).collect(),
                scores: v["scores"].as_array().unwrap().iter().map(|s| s.as_f64().unwrap() as f32).collect(),
                add_space_prefix: v["add_space_prefix"].as_bool().unwrap(),
                unk: v["unk_id"].as_u64().map(|u| u as u32),
            };
            let tok = from_gguf_vocab(&vocab).unwrap();
            let mut checked = 0;
            for case in v["cases"].as_array().unwrap() {
                let text = case["text"].as_str().unwrap();
                let want: Vec<u32> =
                    case["ids"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect();
                assert_eq!(encode(&tok, text).unwrap(), want, "{name}: {text:?}");
                // Decoding gives the text back (sentencepiece drops the leading space it added).
                assert_eq!(tok.decode(&want, false).unwrap(), text, "{name}: decoding {want:?}");
                checked += 1;
            }
            assert!(checked >= 15, "{name}: {checked} cases");
        }
    }

    #[test]
    fn a_sentencepiece_vocabulary_without_scores_is_refused() {
        let vocab = GgufVocab {
            model: "llama".into(),
            pre: "default".into(),
            tokens: vec!["<unk>".into(), "a".into()],
            merges: Vec::new(),
            token_types: vec![2, 1],
            scores: Vec::new(),
            add_space_prefix: true,
            unk: Some(0),
        };
        let err = from_gguf_vocab(&vocab).unwrap_err().to_string();
        assert!(err.contains("tokenizer.ggml.scores"), "{err}");
        let err = from_gguf_vocab(&GgufVocab { model: "t5".into(), ..vocab }).unwrap_err().to_string();
        assert!(err.contains("\"t5\" is not supported"), "{err}");
    }
}
