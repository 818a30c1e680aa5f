//! Chat templates: the GGUF's Jinja `tokenizer.chat_template`, rendered with minijinja.
//!
//! Owns turning a list of chat messages into the prompt text the model was trained on.
//! A model without a template gets ChatML.

use minijinja::{Environment, Error as JinjaError, ErrorKind, context};
use serde::Serialize;

use super::EngineError;

/// ChatML, for models whose GGUF carries no template.
const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// One chat message, content already flattened to text.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The Jinja source (`/tokenizer_info` hands it to clients that render prompts themselves).
    source: String,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// Compiles `source` (or ChatML when `None`).
    pub fn new(source: Option<&str>, bos: &str, eos: &str) -> Result<Self, EngineError> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
        });
        let source = source.unwrap_or(CHATML).to_string();
        env.add_template_owned("chat", source.clone())
            .map_err(|e| EngineError::Model(format!("chat template does not compile: {e}")))?;
        Ok(Self { env, source, bos: bos.to_string(), eos: eos.to_string() })
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` followed by the assistant's generation prompt.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        let tmpl = self.env.get_template("chat").expect("added in new");
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => &self.bos,
            eos_token => &self.eos,
        })
        .map_err(|e| EngineError::Template(e.to_string()))
    }
}

/// Where each message's rendered text starts in the prompt (byte offsets), found by
/// rendering growing prefixes of the conversation: chunking never cuts across them.
pub fn segment_starts(template: &ChatTemplate, messages: &[ChatMessage]) -> Vec<usize> {
    let mut starts = vec![0];
    let mut prev = String::new();
    for i in 1..messages.len() {
        if let Ok(text) = template.render_prefix(&messages[..i]) {
            if text.len() > prev.len() {
                starts.push(text.len());
                prev = text;
            }
        }
    }
    starts
}

impl ChatTemplate {
    fn render_prefix(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        let tmpl = self.env.get_template("chat").expect("added in new");
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => false,
            bos_token => &self.bos,
            eos_token => &self.eos,
        })
        .map_err(|e| EngineError::Template(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into() }
    }

    #[test]
    fn chatml_fallback_renders_with_generation_prompt() {
        let t = ChatTemplate::new(None, "", "").unwrap();
        let out = t.render(&[msg("user", "hi")]).unwrap();
        assert_eq!(out, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn raise_exception_becomes_a_template_error() {
        let t = ChatTemplate::new(Some("{{ raise_exception('roles must alternate') }}"), "", "").unwrap();
        let err = t.render(&[msg("user", "hi")]).unwrap_err().to_string();
        assert!(err.contains("roles must alternate"), "{err}");
    }

    #[test]
    fn segment_starts_follow_messages() {
        let t = ChatTemplate::new(None, "", "").unwrap();
        let m = [msg("system", "s"), msg("user", "u")];
        let starts = segment_starts(&t, &m);
        let full = t.render(&m).unwrap();
        assert_eq!(starts.len(), 2);
        assert!(full[starts[1]..].starts_with("<|im_start|>user"));
    }
}
