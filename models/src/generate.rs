//! Greedy decoding with the KV cache, for smoke tests and the `generate` command.

use crate::batch::{KvCache, TokenBatch};
use crate::decoder::{Decoder, LogitsAt, Mode};
use crate::lora::LoraAdapter;
use crate::Error;

/// Greedily extends `prompt` by up to `max_new` tokens, stopping after a token in `stop`.
/// Returns only the new tokens.
pub fn greedy(
    model: &Decoder,
    prompt: &[u32],
    max_new: usize,
    stop: &[u32],
    adapter: Option<&LoraAdapter>,
) -> Result<Vec<u32>, Error> {
    let mut cache = KvCache::new(model.config().num_layers);
    let mut out = Vec::new();
    let mut next = TokenBatch::single(prompt)?;
    for _ in 0..max_new {
        let logits = model
            .forward(&next, Some(&mut cache), adapter, Mode::Inference, LogitsAt::Last)?
            .logits
            .expect("logits requested");
        let id = logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
        out.push(id);
        if stop.contains(&id) {
            break;
        }
        next = TokenBatch::single(&[id])?;
    }
    Ok(out)
}
