//! The method's rule reward, per response: the answer is parsed from the text before the
//! closing tag exactly as the evaluator parses it (`Task::parse_answer`).

use clap::Args;
use shared::task::{Label, Task};

/// Reward values (the method's defaults).
#[derive(Args, Clone, Debug, PartialEq)]
pub struct RuleReward {
    /// Reward for the correct label.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub reward_correct: f64,
    /// Reward for a wrong label.
    #[arg(long, default_value_t = -1.0, allow_negative_numbers = true)]
    pub reward_wrong: f64,
    /// Reward when no answer can be parsed: no closing tag, no label word, or several.
    #[arg(long, default_value_t = -3.0, allow_negative_numbers = true)]
    pub format_penalty: f64,
    /// Score tasks: the reward is `offset - |prediction - gold|`, and `-offset` when no number
    /// is found (default: half the score range, 2.5 for 0..5 as in the method's STS-B reward).
    #[arg(long, allow_negative_numbers = true)]
    pub score_offset: Option<f64>,
}

/// How a response was judged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    Correct,
    Wrong,
    Unparseable,
    /// Score tasks: the absolute error.
    Error(f64),
}

impl RuleReward {
    /// The reward of `text` (the generated answer after the opening tag) for gold `gold`.
    pub fn reward(&self, task: &Task, text: &str, gold: Label) -> (f64, Outcome) {
        self.reward_answer(task, task.parse_answer(text), gold)
    }

    /// The reward of an answer already known (a restricted rollout produced one label's
    /// answer tokens; `None`: unparseable).
    pub fn reward_answer(&self, task: &Task, parsed: Option<Label>, gold: Label) -> (f64, Outcome) {
        match (parsed, gold) {
            (Some(Label::Class(p)), Label::Class(g)) if p == g => (self.reward_correct, Outcome::Correct),
            (Some(Label::Class(_)), Label::Class(_)) => (self.reward_wrong, Outcome::Wrong),
            (Some(Label::Score(p)), Label::Score(g)) => {
                let err = (p - g).abs();
                (self.offset(task) - err, Outcome::Error(err))
            }
            (None, Label::Score(_)) => (-self.offset(task), Outcome::Unparseable),
            _ => (self.format_penalty, Outcome::Unparseable),
        }
    }

    fn offset(&self, task: &Task) -> f64 {
        self.score_offset.unwrap_or_else(|| {
            let words = task.label_words();
            let lo = words.first().and_then(|w| w.parse::<f64>().ok()).unwrap_or(0.0);
            let hi = words.last().and_then(|w| w.parse::<f64>().ok()).unwrap_or(0.0);
            (hi - lo) / 2.0
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::task::TaskRegistry;

    fn rule() -> RuleReward {
        RuleReward { reward_correct: 1.0, reward_wrong: -1.0, format_penalty: -3.0, score_offset: None }
    }

    #[test]
    fn class_rewards_follow_the_method() {
        let reg = TaskRegistry::builtin();
        let mr = reg.get("mr").unwrap();
        let words = mr.label_words();
        let pos = words.iter().position(|w| w == "Positive").unwrap();
        let gold = Label::Class(pos);
        let r = rule();
        assert_eq!(r.reward(mr, " Positive </Judgement>", gold), (1.0, Outcome::Correct));
        assert_eq!(r.reward(mr, " Negative </Judgement>", gold), (-1.0, Outcome::Wrong));
        // No closing tag, both words, neither word: the format penalty.
        assert_eq!(r.reward(mr, " Positive", gold), (-3.0, Outcome::Unparseable));
        assert_eq!(r.reward(mr, " Positive or Negative </Judgement>", gold), (-3.0, Outcome::Unparseable));
        assert_eq!(r.reward(mr, " maybe </Judgement>", gold), (-3.0, Outcome::Unparseable));
        let custom = RuleReward { reward_correct: 2.0, format_penalty: -0.5, ..rule() };
        assert_eq!(custom.reward(mr, " positive </Judgement>", gold).0, 2.0);
        assert_eq!(custom.reward(mr, "", gold).0, -0.5);
    }

    #[test]
    fn score_rewards_are_the_sts_b_form() {
        let reg = TaskRegistry::builtin();
        let t = reg.get("mr-score").unwrap();
        let r = rule();
        // 0..5: offset 2.5; |3 - 4.5| = 1.5 -> 1.0.
        let (v, o) = r.reward(t, " 3 </Judgement>", Label::Score(4.5));
        assert!((v - 1.0).abs() < 1e-12 && o == Outcome::Error(1.5));
        assert_eq!(r.reward(t, " none </Judgement>", Label::Score(4.5)), (-2.5, Outcome::Unparseable));
        assert_eq!(r.reward(t, " 3", Label::Score(4.5)), (-2.5, Outcome::Unparseable));
    }
}
