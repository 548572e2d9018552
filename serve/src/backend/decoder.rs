//! The engine: scores rows on the base model, each through its own adapter version, on the
//! scheduler's worker thread (never on the async runtime).
//!
//! A batch may mix tasks and adapter versions. Rows are ordered by (task, version), so each
//! version's rows form one run for the per-row LoRA ([`Adapters::PerRow`]) and one block of
//! the stacked prefix cache. Each (task, version) prefix (system text and instruction start)
//! is computed once and kept while that version lives; the bodies of all rows then run as
//! one batch on top of their stacked prefixes ([`KvCache::stack`]), the bodies of one version
//! packed side by side into shared rows without padding ([`score_packed`]).

use super::{InputError, KeptField, TaskEntryError, WeightsError};
use crate::contract::{AdapterVersion, Compute, Row, TaskEntry, VersionWeights};
use crate::metrics::Metrics;
use candle_core::DType;
use models::scoring::{score_packed, score_rows};
use models::{Adapters, Decoder, KvCache, LoadedModel, LogitsAt, LoraAdapter, Mode, TokenBatch};
use shared::adapter::Manifest;
use shared::task::{AnswerScoring, Task};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Weak};

/// How the engine computes.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// Reuse each (task, version) prefix's keys and values.
    pub prefix_cache: bool,
    /// Run each version on its merged copy of the base (one forward per version in a batch).
    pub merged: bool,
    /// Pack the inputs of one (task, version) into shared rows of up to this many tokens, each
    /// input a segment of its own ([`score_packed`]): a batch costs the sum of its inputs'
    /// lengths, not inputs times the longest. 0: one input per padded row.
    pub pack_tokens: usize,
}

/// A cached prefix and the version it belongs to (`None`: zero-shot, lives forever).
struct CachedPrefix {
    owner: Option<Weak<AdapterVersion>>,
    cache: KvCache,
}

/// Most prefixes kept; beyond, the cache starts over (prefixes are cheap to recompute).
const MAX_PREFIXES: usize = 256;

/// The base model plus the prefix cache.
pub struct Engine {
    model: Arc<LoadedModel>,
    opts: EngineOptions,
    prefixes: HashMap<(String, u64), CachedPrefix>,
    metrics: Arc<Metrics>,
}

impl Engine {
    /// An engine over `model`.
    pub fn new(model: Arc<LoadedModel>, opts: EngineOptions, metrics: Arc<Metrics>) -> Self {
        Self { model, opts, prefixes: HashMap::new(), metrics }
    }

    /// Tokens per packed row (0: one input per padded row).
    pub fn pack_tokens(&self) -> usize {
        self.opts.pack_tokens
    }

    /// Packs into rows of `tokens` (0: pads one input per row), as `tuning` decides.
    pub fn set_pack_tokens(&mut self, tokens: usize) {
        self.opts.pack_tokens = tokens;
    }

    /// Candidate log-probabilities `[row][label]` of every row.
    fn score_rows(&mut self, rows: &[&Row]) -> Result<Vec<Vec<f64>>, models::Error> {
        // Forget prefixes of versions nobody holds any more.
        self.prefixes.retain(|_, p| p.owner.as_ref().is_none_or(|w| w.strong_count() > 0));
        if self.prefixes.len() > MAX_PREFIXES {
            self.prefixes.clear();
        }
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by(|&a, &b| rows[a].key().cmp(&rows[b].key()).then(rows[a].body.len().cmp(&rows[b].body.len())));
        let mut out: Vec<Vec<f64>> = vec![Vec::new(); rows.len()];
        let model = self.model.clone();
        if self.opts.merged {
            // One forward per version, each on its merged weights.
            for group in order.chunk_by(|&a, &b| rows[a].key().1 == rows[b].key().1) {
                let decoder = rows[group[0]].version.as_ref().and_then(|v| v.merged()).unwrap_or(&model.model);
                let scores = self.run(decoder, group, rows, false)?;
                for (&i, s) in group.iter().zip(scores) {
                    out[i] = s;
                }
            }
        } else {
            let scores = self.run(&model.model, &order, rows, true)?;
            for (&i, s) in order.iter().zip(scores) {
                out[i] = s;
            }
        }
        Ok(out)
    }

    /// Scores `rows[group[..]]` (sorted by key) in one batch on `decoder`; `per_row`: through
    /// each row's adapter, else through none (a merged decoder).
    fn run(
        &mut self,
        decoder: &Decoder,
        group: &[usize],
        rows: &[&Row],
        per_row: bool,
    ) -> Result<Vec<Vec<f64>>, models::Error> {
        let adapter_of = |i: usize| -> Option<&LoraAdapter> {
            if per_row {
                rows[i].version.as_ref().and_then(|v| v.lora())
            } else {
                None
            }
        };
        let candidates: Vec<&[Vec<u32>]> = group.iter().map(|&i| rows[i].task.answers.as_slice()).collect();
        let pad = self.model.special.pad_id();
        let prompts: Vec<Vec<u32>> = if self.opts.prefix_cache {
            group.iter().map(|&i| rows[i].body.clone()).collect()
        } else {
            group.iter().map(|&i| [rows[i].task.prefix_ids.as_slice(), &rows[i].body].concat()).collect()
        };
        // Batch rows: the inputs of one key share rows of about `pack_tokens` tokens (prompt
        // plus candidate branches); `firsts[r]` is an input of row r.
        let costs: Vec<usize> = (0..group.len())
            .map(|k| prompts[k].len() + candidates[k].iter().map(|c| c.len() - 1).sum::<usize>())
            .collect();
        let mut row_of = vec![0; group.len()];
        let mut firsts: Vec<usize> = Vec::new();
        let mut start = 0;
        for same_key in group.chunk_by(|&a, &b| rows[a].key() == rows[b].key()) {
            let n = same_key.len();
            let run = start..start + n;
            // `--pack-tokens 0`: one input per row, in order (what `score_rows` takes).
            let (rows_here, assign) = if self.opts.pack_tokens == 0 {
                (n, (0..n).collect())
            } else {
                let r = costs[run.clone()].iter().sum::<usize>().div_ceil(self.opts.pack_tokens).clamp(1, n);
                (r, pack_rows(&costs[run.clone()], r))
            };
            let base = firsts.len();
            for r in 0..rows_here {
                firsts.push(start + assign.iter().position(|&x| x == r).expect("every row gets an input"));
            }
            for (k, r) in run.zip(assign) {
                row_of[k] = base + r;
            }
            start += n;
        }
        let row_adapters: Vec<Option<&LoraAdapter>> = firsts.iter().map(|&k| adapter_of(group[k])).collect();
        let cache = if self.opts.prefix_cache {
            // One block per run of rows of one key: its prefix, repeated.
            let mut parts = Vec::new();
            let mut start = 0;
            for block in firsts.chunk_by(|&a, &b| rows[group[a]].key() == rows[group[b]].key()) {
                let prefix = self.prefix(decoder, rows[group[block[0]]], row_adapters[start])?;
                parts.push(prefix.expand_batch(block.len())?);
                start += block.len();
            }
            if parts.len() == 1 {
                parts.remove(0)
            } else {
                KvCache::stack(&parts)?
            }
        } else {
            KvCache::new(decoder.config().num_layers)
        };
        let adapters = if per_row { Adapters::PerRow(&row_adapters) } else { Adapters::Same(None) };
        if self.opts.pack_tokens == 0 {
            score_rows(decoder, adapters, cache, &prompts, &candidates, pad)
        } else {
            score_packed(decoder, adapters, cache, &prompts, &candidates, &row_of, pad)
        }
    }

    /// The row's (task, version) prefix cache, computed on first use.
    fn prefix(
        &mut self,
        decoder: &Decoder,
        row: &Row,
        adapter: Option<&LoraAdapter>,
    ) -> Result<KvCache, models::Error> {
        let key = (row.task.task.name.clone(), row.key().1);
        if let Some(p) = self.prefixes.get(&key) {
            self.metrics.prefix_lookup(true);
            return Ok(p.cache.clone());
        }
        self.metrics.prefix_lookup(false);
        let mut cache = KvCache::new(decoder.config().num_layers);
        decoder.forward(
            &TokenBatch::single(&row.task.prefix_ids)?,
            Some(&mut cache),
            adapter,
            Mode::Inference,
            LogitsAt::None,
        )?;
        self.prefixes
            .insert(key, CachedPrefix { owner: row.version.as_ref().map(Arc::downgrade), cache: cache.clone() });
        Ok(cache)
    }
}

/// Spreads inputs of the given token costs over `rows` rows (at most one per input) so the
/// longest row is short: longest first, each to the row with the fewest tokens so far (every
/// row gets at least one input). Returns each input's row.
fn pack_rows(costs: &[usize], rows: usize) -> Vec<usize> {
    let rows = rows.clamp(1, costs.len().max(1));
    let mut order: Vec<usize> = (0..costs.len()).collect();
    order.sort_by(|&a, &b| costs[b].cmp(&costs[a]).then(a.cmp(&b)));
    let mut filled = vec![0usize; rows];
    let mut out = vec![0; costs.len()];
    for k in order {
        let r = (0..rows).min_by_key(|&r| (filled[r], r)).expect("at least one row");
        filled[r] += costs[k];
        out[k] = r;
    }
    out
}

impl Compute for Engine {
    fn score(&mut self, rows: &[&Row]) -> Result<Vec<Vec<f64>>, models::Error> {
        self.score_rows(rows)
    }

    /// The prompt body, plus the task's prefix when prefixes are not cached.
    fn cost(&self, row: &Row) -> usize {
        row.body.len() + if self.opts.prefix_cache { 0 } else { row.task.prefix_ids.len() }
    }
}

/// A decoder input's prompt body: the task's template around the fields (a cut field's text
/// is its kept tokens decoded), tokenized after the cached prefix, which it must not change.
pub fn prompt_body(
    loaded: &LoadedModel,
    entry: &TaskEntry,
    mut fields: BTreeMap<String, String>,
    kept: &[KeptField],
) -> Result<Vec<u32>, InputError> {
    for f in kept.iter().filter(|f| f.cut) {
        fields.insert(f.name.to_string(), loaded.decode(f.ids).map_err(InputError::Tokenize)?);
    }
    let parts = entry.task.prompt(loaded.chat.as_ref(), &[], &fields).map_err(|e| InputError::Prompt(e.to_string()))?;
    if parts.prefix != entry.prefix_text {
        return Err(InputError::PrefixChanged);
    }
    let body = loaded.encode_body(&parts).map_err(InputError::Tokenize)?;
    let context = loaded.model.config().max_position_embeddings;
    if entry.prefix_ids.len() + body.len() + entry.max_answer_len() > context {
        return Err(InputError::TooLong { context });
    }
    Ok(body)
}

/// A task's constant parts rendered and tokenized for `loaded`'s tokenizer and chat template:
/// the cached prefix and every label's answer tokens.
pub fn task_entry(task: &Task, loaded: &LoadedModel, scoring: AnswerScoring) -> Result<TaskEntry, TaskEntryError> {
    let probe: BTreeMap<String, String> = task.fields.iter().map(|f| (f.clone(), "x".to_string())).collect();
    let parts = task.prompt(loaded.chat.as_ref(), &[], &probe)?;
    let prefix_ids = loaded.encode(&parts.prefix, true).map_err(TaskEntryError::Tokenize)?;
    let scored = task.scored_candidates(scoring, |t| loaded.encode(t, false))?;
    if let Some(why) = &scored.fallback {
        tracing::warn!("{why}");
    }
    let (scoring, answers) = (scored.scoring, scored.candidates);
    Ok(TaskEntry { task: task.clone(), prefix_text: parts.prefix, prefix_ids, answers, scoring: Some(scoring) })
}

/// A version's LoRA adapter from `dir`, its manifest checked against the base and the task,
/// every tensor finite; in merged mode also the base with it folded in.
pub fn load_lora(
    loaded: &LoadedModel,
    dir: &Path,
    manifest: &Manifest,
    base_sha256: &str,
    task: &Task,
    merged: bool,
) -> Result<VersionWeights, WeightsError> {
    manifest.check(base_sha256, task)?;
    let model = &loaded.model;
    let adapter =
        LoraAdapter::load_peft_dir(dir, model.config(), DType::F32, model.device()).map_err(WeightsError::Adapter)?;
    for (name, t) in adapter.named_tensors() {
        let finite = t
            .abs()
            .and_then(|a| a.sum_all())
            .and_then(|s| s.to_dtype(DType::F32))
            .and_then(|s| s.to_scalar::<f32>())
            .map(f32::is_finite)
            .unwrap_or(false);
        if !finite {
            return Err(WeightsError::NotFinite(name.to_string()));
        }
    }
    let merged = if merged { Some(Box::new(model.merged(&adapter).map_err(WeightsError::Merge)?)) } else { None };
    Ok(VersionWeights::Lora { adapter, merged })
}

#[cfg(test)]
mod tests {
    use super::pack_rows;

    #[test]
    fn packing_balances_rows_and_fills_each() {
        // 10 + 9 + 8 + 3 + 2 + 2 = 34 tokens in 2 rows: 10+3+2+2 = 17 and 9+8 = 17.
        let costs = [3, 10, 2, 9, 8, 2];
        let rows = pack_rows(&costs, 2);
        let mut filled = [0; 2];
        for (c, r) in costs.iter().zip(&rows) {
            filled[*r] += c;
        }
        assert_eq!(filled, [17, 17]);
        // As many rows as inputs: one input each.
        let mut one_each = pack_rows(&costs, 6);
        one_each.sort();
        assert_eq!(one_each, vec![0, 1, 2, 3, 4, 5]);
        // One row takes everything; more rows than inputs are not made.
        assert_eq!(pack_rows(&costs, 1), vec![0; 6]);
        assert_eq!(pack_rows(&[5, 4], 9).iter().max(), Some(&1));
    }
}
