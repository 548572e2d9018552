//! Every random draw of a training run, seeded from `--seed` and where the run stands (step,
//! epoch, micro-batch), never from a generator that carries state across steps: a run resumed
//! from a checkpoint draws what the uninterrupted run would have drawn. One place for the
//! constants, so that two draws cannot share a stream by accident.

/// Mixes the seed for dropout masks.
const DROPOUT: u64 = 0x2545_F491_4F6C_DD1D;
/// Mixes the seed for sampled rollouts (the 64-bit golden ratio).
const ROLLOUT: u64 = 0x9E37_79B9_7F4A_7C15;
/// Spreads epochs and pair draws apart (the 32-bit golden ratio).
const SPREAD: u64 = 0x9E37_79B9;
/// Set apart the dev pairs of a reward model from its training pairs.
const DEV_PAIRS: u64 = 0xDE5;

/// The order of task `task`'s examples in epoch `epoch`.
pub fn task_order(seed: u64, epoch: u64, task: u64) -> u64 {
    seed ^ (epoch << 20) ^ (task << 40)
}

/// The order of epoch `epoch`'s batches.
pub fn epoch_order(seed: u64, epoch: u64) -> u64 {
    seed.wrapping_add(epoch.wrapping_mul(SPREAD))
}

/// Dropout of micro-batch `pos`, counted over the run (`(step - 1) * grad_accum + micro`).
pub fn dropout(seed: u64, pos: u64) -> u64 {
    seed.wrapping_mul(DROPOUT) ^ pos
}

/// PPO's dropout: micro-batch `micro` of mini-batch `mini` of epoch `epoch` of step `step`.
pub fn ppo_dropout(seed: u64, step: u64, epoch: u64, mini: u64, micro: u64) -> u64 {
    seed.wrapping_mul(DROPOUT) ^ (step << 24) ^ (epoch << 16) ^ (mini << 8) ^ micro
}

/// The responses sampled at rollout step `step`.
pub fn rollout(seed: u64, step: u64) -> u64 {
    seed.wrapping_mul(ROLLOUT) ^ step
}

/// The order of the rollout's rows in PPO epoch `epoch` of step `step`.
pub fn ppo_shuffle(seed: u64, step: u64, epoch: u64) -> u64 {
    seed ^ (step << 16) ^ epoch
}

/// The wrong labels of the reward model's pairs at micro-batch `pos`.
pub fn pairs(seed: u64, pos: u64) -> u64 {
    seed ^ pos.wrapping_mul(SPREAD)
}

/// The wrong labels of the reward model's dev pairs (the same at every evaluation).
pub fn dev_pairs(seed: u64) -> u64 {
    seed ^ DEV_PAIRS
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The draws of one run are apart from each other: the same position gives different seeds
    /// for different purposes, and neighbouring positions differ.
    #[test]
    fn draws_for_different_purposes_do_not_share_a_seed() {
        let s = 7;
        let all = [dropout(s, 3), rollout(s, 3), ppo_shuffle(s, 3, 0), pairs(s, 3), dev_pairs(s), epoch_order(s, 3)];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a, b, "{all:?}");
            }
        }
        assert_ne!(dropout(s, 3), dropout(s, 4));
        assert_ne!(ppo_dropout(s, 1, 0, 0, 1), ppo_dropout(s, 1, 0, 1, 0));
        assert_ne!(ppo_dropout(s, 1, 1, 0, 0), ppo_dropout(s, 2, 0, 0, 0));
    }
}
