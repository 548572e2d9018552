//! Chat templates. Both supported families use ChatML (`<|im_start|>role\n…<|im_end|>\n`); the
//! model's own template only adds a default system message, which is read from it.

use serde::{Deserialize, Serialize};

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    /// A message with a role (`system`, `user`, `assistant`).
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.to_string(), content: content.to_string() }
    }
}

/// How a model wants conversations laid out.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTemplate {
    /// System message inserted when a conversation has none (Qwen2.5 and SmolLM2 have one).
    pub default_system: Option<String>,
}

impl ChatTemplate {
    /// Reads a Jinja chat template as found in GGUF (`tokenizer.chat_template`) or
    /// `tokenizer_config.json`. Only ChatML templates are understood.
    pub fn from_jinja(source: &str) -> Option<Self> {
        if !source.contains("<|im_start|>") {
            return None;
        }
        Some(Self { default_system: default_system(source) })
    }

    /// The prompt text for `messages`; with `add_generation_prompt` it ends with an open
    /// assistant turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> String {
        let mut out = String::new();
        if messages.first().is_none_or(|m| m.role != "system") {
            if let Some(system) = &self.default_system {
                out.push_str(&format!("<|im_start|>system\n{system}<|im_end|>\n"));
            }
        }
        for m in messages {
            out.push_str(&format!("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.content));
        }
        if add_generation_prompt {
            out.push_str("<|im_start|>assistant\n");
        }
        out
    }
}

/// The literal system text a ChatML Jinja template inserts by default, if any.
fn default_system(source: &str) -> Option<String> {
    let marker = "<|im_start|>system";
    let mut rest = source;
    while let Some(i) = rest.find(marker) {
        rest = &rest[i + marker.len()..];
        let body = rest.strip_prefix("\\n").or_else(|| rest.strip_prefix('\n'));
        if let Some(body) = body {
            if let Some(end) = body.find("<|im_end|>") {
                let text = &body[..end];
                if !text.is_empty() && !text.contains('{') && !text.contains('\'') && !text.contains('+') {
                    return Some(text.replace("\\n", "\n"));
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_default_system_from_jinja() {
        let src = "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}{%- endif %}";
        let t = ChatTemplate::from_jinja(src).unwrap();
        assert_eq!(t.default_system.as_deref(), Some("You are Qwen, a helpful assistant."));
        let text = t.render(&[ChatMessage::new("user", "hi")], true);
        assert_eq!(text, "<|im_start|>system\nYou are Qwen, a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
        let own = t.render(&[ChatMessage::new("system", "S"), ChatMessage::new("user", "u")], false);
        assert_eq!(own, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nu<|im_end|>\n");
    }

    #[test]
    fn non_chatml_is_refused() {
        assert!(ChatTemplate::from_jinja("[INST] {{ m }} [/INST]").is_none());
    }
}
