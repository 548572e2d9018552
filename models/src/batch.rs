//! Padded token batches and the key/value cache.

use crate::Error;
use candle_core::{Device, Tensor};

/// Which side of a short sequence gets the padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// Pad before the tokens: every row's last token sits in the last column (generation).
    Left,
    /// Pad after the tokens (training, scoring).
    Right,
}

/// A rectangular batch of token ids with a mask of which entries are real tokens, and
/// optionally a branch id per entry (a depth-1 token tree, see [`TokenBatch::with_branches`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBatch {
    ids: Vec<Vec<u32>>,
    mask: Vec<Vec<bool>>,
    branches: Option<Vec<Vec<u32>>>,
    segments: Option<Vec<Vec<u32>>>,
}

impl TokenBatch {
    /// Pads `sequences` to the longest with `pad_id`.
    pub fn new(sequences: &[Vec<u32>], pad_id: u32, padding: Padding) -> Result<Self, Error> {
        let len = sequences.iter().map(Vec::len).max().unwrap_or(0);
        if sequences.is_empty() || len == 0 {
            return Err(Error::Invalid("a batch needs at least one non-empty sequence".into()));
        }
        let mut ids = Vec::with_capacity(sequences.len());
        let mut mask = Vec::with_capacity(sequences.len());
        for seq in sequences {
            let pad = len - seq.len();
            let (row, m): (Vec<u32>, Vec<bool>) = match padding {
                Padding::Left => (
                    std::iter::repeat_n(pad_id, pad).chain(seq.iter().copied()).collect(),
                    std::iter::repeat_n(false, pad).chain(std::iter::repeat_n(true, seq.len())).collect(),
                ),
                Padding::Right => (
                    seq.iter().copied().chain(std::iter::repeat_n(pad_id, pad)).collect(),
                    std::iter::repeat_n(true, seq.len()).chain(std::iter::repeat_n(false, pad)).collect(),
                ),
            };
            ids.push(row);
            mask.push(m);
        }
        Ok(Self { ids, mask, branches: None, segments: None })
    }

    /// One unpadded sequence.
    pub fn single(ids: &[u32]) -> Result<Self, Error> {
        Self::new(&[ids.to_vec()], 0, Padding::Right)
    }

    /// Rows of a batch where every row has the same length and no padding.
    pub fn from_rows(rows: Vec<Vec<u32>>) -> Result<Self, Error> {
        let len = rows.first().map(Vec::len).unwrap_or(0);
        if len == 0 || rows.iter().any(|r| r.len() != len) {
            return Err(Error::Invalid("rows must be non-empty and of equal length".into()));
        }
        let mask = rows.iter().map(|r| vec![true; r.len()]).collect();
        Ok(Self { ids: rows, mask, branches: None, segments: None })
    }

    /// Rows with an explicit mask (`false` entries are padding), e.g. finished rows of a
    /// generation step.
    pub fn with_mask(ids: Vec<Vec<u32>>, mask: Vec<Vec<bool>>) -> Result<Self, Error> {
        let len = ids.first().map(Vec::len).unwrap_or(0);
        if len == 0 || ids.len() != mask.len() || ids.iter().zip(&mask).any(|(i, m)| i.len() != len || m.len() != len) {
            return Err(Error::Invalid("ids and mask must be non-empty rows of one length".into()));
        }
        Ok(Self { ids, mask, branches: None, segments: None })
    }

    /// Rows with an explicit mask and a branch id per entry: 0 for the trunk, `k > 0` for
    /// branch `k`. A token attends to the cache, to the real trunk tokens before it, and to the
    /// real tokens before it in its own branch, never to another branch; its rotary position is
    /// what it would have if its branch alone followed the trunk. Several continuations of one
    /// prompt (the candidate answers of constrained scoring) thus run in one sequence, each
    /// computing what it would compute alone. A forward of such a batch reads a cache but
    /// leaves it unchanged ([`crate::Decoder::forward`]).
    pub fn with_branches(ids: Vec<Vec<u32>>, mask: Vec<Vec<bool>>, branches: Vec<Vec<u32>>) -> Result<Self, Error> {
        let mut batch = Self::with_mask(ids, mask)?;
        if branches.len() != batch.ids.len() || branches.iter().any(|b| b.len() != batch.seq_len()) {
            return Err(Error::Invalid("branch ids must have the shape of the token ids".into()));
        }
        batch.branches = Some(branches);
        Ok(batch)
    }

    /// [`TokenBatch::with_branches`] with several independent sequences packed into each row
    /// (a padding-free batch): `segments` gives every entry's sequence id. A token attends only
    /// to the cache and to tokens of its own segment (its trunk, and its own branch), and takes
    /// the rotary position it would have if its segment alone followed the cache. Rows of
    /// different lengths thus cost no padding beyond that of the few packed rows.
    pub fn with_segments(
        ids: Vec<Vec<u32>>,
        mask: Vec<Vec<bool>>,
        branches: Vec<Vec<u32>>,
        segments: Vec<Vec<u32>>,
    ) -> Result<Self, Error> {
        let mut batch = Self::with_branches(ids, mask, branches)?;
        if segments.len() != batch.ids.len() || segments.iter().any(|s| s.len() != batch.seq_len()) {
            return Err(Error::Invalid("segment ids must have the shape of the token ids".into()));
        }
        batch.segments = Some(segments);
        Ok(batch)
    }

    /// Number of rows.
    pub fn batch_size(&self) -> usize {
        self.ids.len()
    }

    /// Number of columns.
    pub fn seq_len(&self) -> usize {
        self.ids[0].len()
    }

    /// The padded ids.
    pub fn ids(&self) -> &[Vec<u32>] {
        &self.ids
    }

    /// `true` where a real token sits.
    pub fn mask(&self) -> &[Vec<bool>] {
        &self.mask
    }

    /// Branch id of every entry (0: trunk), `None` for a batch without branches.
    pub fn branches(&self) -> Option<&[Vec<u32>]> {
        self.branches.as_deref()
    }

    /// Segment id of every entry, `None` for a batch with one sequence per row.
    pub fn segments(&self) -> Option<&[Vec<u32>]> {
        self.segments.as_deref()
    }

    /// Column of each row's last real token (`None` for an all-padding row).
    pub fn last_real(&self) -> Vec<Option<usize>> {
        self.mask.iter().map(|m| m.iter().rposition(|&x| x)).collect()
    }

    /// `[batch, seq]` u32 tensor of the ids.
    pub fn ids_tensor(&self, device: &Device) -> Result<Tensor, Error> {
        let flat: Vec<u32> = self.ids.iter().flatten().copied().collect();
        Ok(Tensor::from_vec(flat, (self.batch_size(), self.seq_len()), device)?)
    }
}

/// Keys and values of every layer for the tokens seen so far, with their padding mask.
///
/// A cache built for one row (a shared prompt prefix) can be [`KvCache::expand_batch`]ed to
/// many rows; the expansion is differentiable, so its gradient is the sum over rows.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    mask: Vec<Vec<bool>>,
}

impl KvCache {
    /// An empty cache for a model with `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![None; num_layers], mask: Vec::new() }
    }

    /// Number of cached positions (including padding).
    pub fn seq_len(&self) -> usize {
        self.mask.first().map(Vec::len).unwrap_or(0)
    }

    /// Rows in the cache (0 when empty).
    pub fn batch_size(&self) -> usize {
        self.mask.len()
    }

    /// Which cached positions are real tokens.
    pub fn mask(&self) -> &[Vec<bool>] {
        &self.mask
    }

    /// Real tokens cached per row: the next token's rotary position.
    pub fn real_lens(&self) -> Vec<usize> {
        self.mask.iter().map(|m| m.iter().filter(|&&x| x).count()).collect()
    }

    /// The cached keys and values of a layer.
    pub fn layer(&self, layer: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(layer).and_then(Option::as_ref)
    }

    pub(crate) fn set_layer(&mut self, layer: usize, kv: (Tensor, Tensor)) {
        self.layers[layer] = Some(kv);
    }

    pub(crate) fn append_mask(&mut self, new: &[Vec<bool>]) {
        if self.mask.is_empty() {
            self.mask = vec![Vec::new(); new.len()];
        }
        for (m, n) in self.mask.iter_mut().zip(new) {
            m.extend_from_slice(n);
        }
    }

    /// A cache whose row `i` is this cache's row `rows[i]` (rows may repeat): continuing
    /// several candidates from one prompt.
    pub fn select_rows(&self, rows: &[usize]) -> Result<Self, Error> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.batch_size()) {
            return Err(Error::Invalid(format!("row {bad} outside a cache of {} rows", self.batch_size())));
        }
        let idx = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), rows.len(), &Device::Cpu)?;
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref()
                    .map(|(k, v)| {
                        let idx = idx.to_device(k.device())?;
                        Ok::<_, Error>((k.index_select(&idx, 0)?, v.index_select(&idx, 0)?))
                    })
                    .transpose()
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { layers, mask: rows.iter().map(|&r| self.mask[r].clone()).collect() })
    }

    /// The rows of several caches in one (e.g. the prefixes of different tasks in one batch).
    /// Shorter caches are padded on the left with masked positions, so every row attends to
    /// exactly its own tokens and keeps its rotary positions.
    pub fn stack(parts: &[KvCache]) -> Result<Self, Error> {
        let Some(first) = parts.first() else {
            return Err(Error::Invalid("no caches to stack".into()));
        };
        if parts.iter().any(|p| p.batch_size() == 0 || p.layers.len() != first.layers.len()) {
            return Err(Error::Invalid("stacked caches must be non-empty and of one model".into()));
        }
        let len = parts.iter().map(KvCache::seq_len).max().unwrap_or(0);
        let pad = |t: &Tensor, by: usize| -> Result<Tensor, Error> {
            if by == 0 {
                return Ok(t.clone());
            }
            let mut dims = t.dims().to_vec();
            dims[2] = by;
            Ok(Tensor::cat(&[&Tensor::zeros(dims, t.dtype(), t.device())?, t], 2)?)
        };
        let mut layers = Vec::with_capacity(first.layers.len());
        for l in 0..first.layers.len() {
            let mut ks = Vec::with_capacity(parts.len());
            let mut vs = Vec::with_capacity(parts.len());
            for p in parts {
                let Some((k, v)) = p.layers[l].as_ref() else {
                    return Err(Error::Invalid(format!("layer {l} is missing from a stacked cache")));
                };
                let by = len - p.seq_len();
                ks.push(pad(k, by)?);
                vs.push(pad(v, by)?);
            }
            layers.push(Some((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?)));
        }
        let mut mask = Vec::new();
        for p in parts {
            for m in &p.mask {
                mask.push(std::iter::repeat_n(false, len - m.len()).chain(m.iter().copied()).collect());
            }
        }
        Ok(Self { layers, mask })
    }

    /// A one-row cache repeated for `rows` rows (a shared prefix for a whole batch).
    pub fn expand_batch(&self, rows: usize) -> Result<Self, Error> {
        if self.batch_size() != 1 {
            return Err(Error::Invalid(format!(
                "only a one-row cache can be expanded, this has {}",
                self.batch_size()
            )));
        }
        let expand = |t: &Tensor| -> Result<Tensor, Error> {
            let mut dims = t.dims().to_vec();
            dims[0] = rows;
            Ok(t.broadcast_as(dims)?.contiguous()?)
        };
        let layers = self
            .layers
            .iter()
            .map(|l| l.as_ref().map(|(k, v)| Ok::<_, Error>((expand(k)?, expand(v)?))).transpose())
            .collect::<Result<_, _>>()?;
        Ok(Self { layers, mask: vec![self.mask[0].clone(); rows] })
    }
}
