//! A loaded model and what its loaders share: the decoder, its tokenizer, special tokens and
//! chat template. Below the loaders (`gguf`, `hf`, `load`), which all build these.

use crate::decoder::Decoder;
use crate::{tokenizer, Error};
use shared::chat::{ChatMessage, ChatTemplate};
use std::path::PathBuf;
use tokenizers::Tokenizer;

/// Token ids with a fixed role.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
    /// Whether prompts start with BOS.
    pub add_bos: bool,
    /// Ids that end a generation: EOS and the chat end-of-turn tokens the vocabulary has.
    pub stop: Vec<u32>,
}

impl SpecialTokens {
    /// Fills `stop` from `eos` and the end-of-turn tokens found in the tokenizer.
    pub(crate) fn with_stop_tokens(mut self, tok: &Tokenizer) -> Self {
        let mut stop: Vec<u32> = self.eos.into_iter().collect();
        for t in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>"] {
            if let Some(id) = tok.token_to_id(t) {
                if !stop.contains(&id) {
                    stop.push(id);
                }
            }
        }
        self.stop = stop;
        self
    }

    /// The texts of BOS and EOS, as a chat template prints them.
    pub(crate) fn chat_tokens(&self, tok: &Tokenizer) -> shared::chat::ChatTokens {
        shared::chat::ChatTokens {
            bos: self.bos.and_then(|id| tok.id_to_token(id)),
            eos: self.eos.and_then(|id| tok.id_to_token(id)),
        }
    }

    /// The id used to pad batches: PAD, else EOS, else 0.
    pub fn pad_id(&self) -> u32 {
        self.pad.or(self.eos).unwrap_or(0)
    }
}

/// A model with everything needed to talk to it.
pub struct LoadedModel {
    pub model: Decoder,
    pub tokenizer: Tokenizer,
    pub special: SpecialTokens,
    /// The model's own chat template (its Jinja source kept for export); `None`: a plain layout.
    pub chat: Option<ChatTemplate>,
    /// Where the weights came from.
    pub path: PathBuf,
    /// The sha256 of the weights file when the load already knew it (a pack file records it).
    pub weights_sha256: Option<String>,
}

/// A model's hyper-parameters, tokenizer, special tokens and chat template: everything a
/// load needs besides the weights.
pub struct ModelMeta {
    pub cfg: crate::config::DecoderConfig,
    pub tokenizer: Tokenizer,
    pub special: SpecialTokens,
    pub chat: Option<ChatTemplate>,
}

impl LoadedModel {
    /// Token ids of `text` (special tokens in the text are parsed), with BOS first when
    /// `add_bos` and the model wants it, unless the text starts with BOS already (chat
    /// templates such as Llama 3's and Gemma's print it: transformers then adds none either).
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, Error> {
        let mut ids = Vec::new();
        if add_bos && self.special.add_bos {
            let bos_text = self.special.bos.and_then(|id| self.tokenizer.id_to_token(id));
            if !bos_text.is_some_and(|b| text.starts_with(&b)) {
                ids.extend(self.special.bos);
            }
        }
        ids.extend(tokenizer::encode(&self.tokenizer, text)?);
        Ok(ids)
    }

    /// Token ids of an input's text, read as plain text: it cannot spell a special token
    /// (`tokenizer::encode_text`).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, Error> {
        tokenizer::encode_text(&self.tokenizer, text)
    }

    /// Token ids of a prompt body: its field values (user input) read as plain text, the
    /// template's own markers as their special tokens (`tokenizer::encode_with_plain`).
    /// Trainer, evaluator and server all tokenize bodies with this.
    pub fn encode_body(&self, parts: &shared::task::PromptParts) -> Result<Vec<u32>, Error> {
        tokenizer::encode_with_plain(&self.tokenizer, &parts.body, &parts.fields)
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32]) -> Result<String, Error> {
        tokenizer::decode(&self.tokenizer, ids)
    }

    /// How task prompts are laid out for this model, in words: `tasks --show`, the server's
    /// log and `GET /v1/tasks` say it.
    pub fn prompt_layout(&self) -> &'static str {
        match self.chat.as_ref().map(ChatTemplate::system_turn) {
            Some(shared::chat::SystemTurn::Own) => "the model's chat template",
            Some(shared::chat::SystemTurn::FirstUserTurn) => {
                "the model's chat template (it has no system turn: the system text opens the first user turn)"
            }
            None => "a plain layout (the model has no chat template)",
        }
    }

    /// A one-turn chat prompt ending with an open assistant turn.
    pub fn chat_prompt(&self, user: &str, system: Option<&str>) -> Result<String, Error> {
        let chat = self.chat.as_ref().ok_or_else(|| Error::Invalid("this model has no chat template".into()))?;
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(ChatMessage::new("system", s));
        }
        messages.push(ChatMessage::new("user", user));
        Ok(chat.render(&messages, true)?)
    }
}
