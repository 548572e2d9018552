//! Chat templates: the model's own Jinja template (`tokenizer_config.json`'s `chat_template`,
//! GGUF's `tokenizer.chat_template`), rendered with minijinja the way transformers'
//! `apply_chat_template` renders it, so an adapter trains and serves on the prompt the model
//! was tuned for.
//!
//! As transformers does: blocks are trimmed (`trim_blocks`, `lstrip_blocks`), Python's string
//! methods work (`.strip()`, `.split()`, ...), `raise_exception` fails the render, and the
//! special tokens (`bos_token`, `eos_token`) are in the context. Two choices are Verdict's, for
//! prompts that stay the same from one run to the next: the date a template prints is fixed
//! ([`TEMPLATE_DATE`]), and `enable_thinking` is false (a classifier answers without a thinking
//! block). A template that refuses a system turn (Gemma 2) gets the system text at the start of
//! the first user turn, as Gemma 3's own template does.

use std::sync::Arc;

use minijinja::{Environment, ErrorKind, Value};
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

    /// The message as a template sees it: a map with `role` and `content`.
    fn to_value(&self) -> Value {
        Value::from(std::collections::BTreeMap::from([
            ("role", Value::from(self.role.as_str())),
            ("content", Value::from(self.content.as_str())),
        ]))
    }
}

/// The date every template sees (`date_string`, `strftime_now`): Llama 3's templates print
/// "Today Date" into the system turn, and a prompt that changed daily would change under a
/// trained adapter. It is the default those templates fall back on.
pub const TEMPLATE_DATE: (i32, u32, u32) = (2024, 7, 26);

/// The special tokens' texts a template may print.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
}

/// Why a chat template cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("the chat template does not parse: {0}")]
    Parse(String),
    #[error("the chat template cannot render a conversation: {0}")]
    Render(String),
}

/// Where a template puts the system text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemTurn {
    /// The template renders system turns itself.
    Own,
    /// The template refuses or drops a system turn: its text opens the first user turn.
    FirstUserTurn,
}

/// A model's chat template, parsed once.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Arc<Environment<'static>>,
    source: Arc<str>,
    tokens: ChatTokens,
    system: SystemTurn,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("bytes", &self.source.len()).field("system", &self.system).finish()
    }
}

/// Two templates are the same when they are parsed from the same source with the same tokens.
impl PartialEq for ChatTemplate {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source && self.tokens == other.tokens
    }
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Parses a Jinja chat template and checks that it renders a system + user conversation
    /// (else that it renders one with the system text in the user turn).
    pub fn from_jinja(source: &str, tokens: ChatTokens) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .expect("the default delimiters");
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_function("strftime_now", |format: String| strftime(&format, TEMPLATE_DATE));
        env.add_template_owned(NAME, source.to_string()).map_err(|e| ChatError::Parse(describe(&e)))?;
        let mut template = Self { env: Arc::new(env), source: source.into(), tokens, system: SystemTurn::Own };
        // Probe with a system text no template would print by itself.
        const PROBE: &str = "VERDICT-SYSTEM-PROBE";
        let probe = [ChatMessage::new("system", PROBE), ChatMessage::new("user", "u")];
        match template.render_raw(&probe, true) {
            Ok(text) if text.contains(PROBE) => {}
            first => {
                template.system = SystemTurn::FirstUserTurn;
                let text = template.render(&probe, true)?;
                if !text.contains(PROBE) {
                    let why = first.err().map_or_else(|| "the system text is dropped".into(), |e| e.to_string());
                    return Err(ChatError::Render(why));
                }
            }
        }
        Ok(template)
    }

    /// The Jinja source as the model file carried it.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where this template puts a system turn.
    pub fn system_turn(&self) -> SystemTurn {
        self.system
    }

    /// The prompt text for `messages`; with `add_generation_prompt` it ends with an open
    /// assistant turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, ChatError> {
        match (self.system, messages.split_first()) {
            (SystemTurn::FirstUserTurn, Some((system, rest))) if system.role == "system" => {
                let mut folded = rest.to_vec();
                match folded.first_mut() {
                    Some(first) => first.content = format!("{}\n\n{}", system.content, first.content),
                    None => folded.push(ChatMessage::new("user", &system.content)),
                }
                self.render_raw(&folded, add_generation_prompt)
            }
            _ => self.render_raw(messages, add_generation_prompt),
        }
    }

    fn render_raw(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, ChatError> {
        let (y, m, d) = TEMPLATE_DATE;
        let ctx = minijinja::context! {
            messages => Value::from(messages.iter().map(ChatMessage::to_value).collect::<Vec<_>>()),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.tokens.bos.as_deref().unwrap_or(""),
            eos_token => self.tokens.eos.as_deref().unwrap_or(""),
            tools => Value::from(()),
            documents => Value::from(()),
            enable_thinking => false,
            date_string => strftime("%d %b %Y", (y, m, d)).expect("a known format"),
        };
        let template = self.env.get_template(NAME).map_err(|e| ChatError::Parse(describe(&e)))?;
        template.render(ctx).map_err(|e| ChatError::Render(describe(&e)))
    }
}

/// minijinja's message with its cause chain (a `raise_exception`'s text is the cause).
fn describe(e: &minijinja::Error) -> String {
    let mut out = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        out.push_str(&format!(": {c}"));
        cause = c.source();
    }
    out
}

/// `strftime` for the directives chat templates use, on a fixed date.
fn strftime(format: &str, (year, month, day): (i32, u32, u32)) -> Result<String, minijinja::Error> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&name[..3]),
            Some('B') => out.push_str(name),
            Some('%') => out.push('%'),
            other => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "strftime_now: directive %{} is not supported",
                        other.map(String::from).unwrap_or_default()
                    ),
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chatml() -> ChatTemplate {
        let src = "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- for m in messages %}{%- if m.role != 'system' %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";
        ChatTemplate::from_jinja(src, ChatTokens::default()).unwrap()
    }

    #[test]
    fn renders_a_template_with_its_default_system_turn() {
        let t = chatml();
        assert_eq!(t.system_turn(), SystemTurn::Own);
        let text = t.render(&[ChatMessage::new("user", "hi")], true).unwrap();
        assert_eq!(text, "<|im_start|>system\nYou are Qwen, a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
        let own = t.render(&[ChatMessage::new("system", "S"), ChatMessage::new("user", "u")], false).unwrap();
        assert_eq!(own, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nu<|im_end|>\n");
    }

    #[test]
    fn a_template_refusing_system_turns_gets_the_system_text_in_the_first_user_turn() {
        let src = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}{% endfor %}";
        let tokens = ChatTokens { bos: Some("<bos>".into()), eos: None };
        let t = ChatTemplate::from_jinja(src, tokens).unwrap();
        assert_eq!(t.system_turn(), SystemTurn::FirstUserTurn);
        let text = t.render(&[ChatMessage::new("system", "S"), ChatMessage::new("user", "u")], true).unwrap();
        assert_eq!(text, "<bos><user>S\n\nu");
    }

    #[test]
    fn bad_templates_are_refused_with_the_reason() {
        let e = ChatTemplate::from_jinja("{% for m in messages %}", ChatTokens::default()).unwrap_err();
        assert!(matches!(e, ChatError::Parse(_)), "{e}");
        let e = ChatTemplate::from_jinja("{{ raise_exception('no conversations here') }}", ChatTokens::default())
            .unwrap_err();
        assert!(e.to_string().contains("no conversations here"), "{e}");
        // A template that never prints the conversation loses the system text either way.
        let e = ChatTemplate::from_jinja("hello", ChatTokens::default()).unwrap_err();
        assert!(e.to_string().contains("dropped"), "{e}");
    }

    #[test]
    fn the_date_is_fixed_and_formatted_as_strftime_would() {
        assert_eq!(strftime("%d %b %Y", TEMPLATE_DATE).unwrap(), "26 Jul 2024");
        assert_eq!(strftime("%Y-%m-%d (%B, %y) 100%%", TEMPLATE_DATE).unwrap(), "2024-07-26 (July, 24) 100%");
        assert!(strftime("%H", TEMPLATE_DATE).is_err());
    }
}
