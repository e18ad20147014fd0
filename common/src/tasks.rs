//! Evaluation tasks built from a prepared folder's held-out split, and troupe's own scoring of
//! them: the repository's tasks for `troupe tasks`, and the items that lm-evaluation-harness
//! scores through `troupe serve` with the task files in `evals/lm_eval/`.
//!
//! **next line** (multiple choice): a line of the held-out text, and four candidates for the
//! line after it: the true one and three lines from elsewhere in the split. Each candidate is
//! scored by the sum of its tokens' log-probabilities after the context; the likeliest one is
//! the model's answer (lm-evaluation-harness's `acc`). **next line, generated**: given the
//! line and the first word of the next, the model continues greedily until a newline; the
//! answer counts when it is the rest of the true line exactly (`exact_match`).
//!
//! Tokens are split between context and continuation as lm-evaluation-harness splits them, so
//! that both score the very same token sequences: the context's trailing whitespace (here the
//! newline after it) moves to the continuation, the whole text is tokenized, and the
//! continuation is what follows the context's own tokens.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::{self, Tokenizer, EOT_TOKEN};
use crate::model::{self, Gpt, Rng, Sampling};

/// Candidates per item of the multiple-choice task.
pub const CHOICES: usize = 4;

/// One item of the next-line tasks (a line of `items.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub id: usize,
    /// A line of the held-out text, without its newline.
    pub context: String,
    /// The candidates for the next line, each without a newline.
    pub choices: Vec<String>,
    /// Which of `choices` is the true next line.
    pub gold: usize,
    /// The first word of the true next line (the generated task's prompt ends with it).
    pub prefix: String,
    /// The rest of the true next line, from the space after `prefix` (what the generated task
    /// must produce).
    pub rest: String,
}

/// What building items can fail on.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error(transparent)]
    Data(#[from] data::DataError),
    #[error("{0}")]
    Invalid(String),
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: std::path::PathBuf, source: std::io::Error },
}

/// Up to `count` items from the held-out split of the prepared folder `dir`: pairs of
/// consecutive non-empty lines, each with three distractor lines drawn with `seed`, of which
/// only those whose every candidate fits with the context in `max_tokens` tokens (so that no
/// tool has to cut them), evenly spaced over the split.
pub fn build_items(dir: &Path, count: usize, max_tokens: usize, seed: u64) -> Result<Vec<Item>, TaskError> {
    let meta = data::load_meta(dir)?;
    let tokenizer = Tokenizer::load(&dir.join(data::TOKENIZER_JSON))?;
    let val = data::open_val(dir, &meta)?;
    let ids: Vec<u32> = val.window(0, val.len())?.into_iter().map(|t| t as u32).collect();
    let text = tokenizer.decode(&ids)?;
    let lines: Vec<&str> = text.split('\n').map(str::trim_end).collect();
    let usable = |l: &str| l.trim().len() >= 2 && !l.contains(EOT_TOKEN);
    let pairs: Vec<usize> = (0..lines.len().saturating_sub(1)).filter(|&i| usable(lines[i]) && usable(lines[i + 1])).collect();
    let pool: Vec<&str> = lines.iter().copied().filter(|l| usable(l)).collect();
    if pairs.is_empty() || pool.len() < CHOICES + 1 {
        return Err(TaskError::Invalid(format!("the held-out split of {} has too few lines for next-line items", dir.display())));
    }
    let tokens = |s: &str| -> Result<usize, TaskError> { Ok(tokenizer.encode(s)?.len()) };
    let mut rng = Rng::new(seed);
    let mut fitting = Vec::new();
    for &i in &pairs {
        let (context, truth) = (lines[i], lines[i + 1]);
        // The generated task needs a first word and a rest.
        let Some(space) = truth.trim_start().find(' ').map(|at| at + truth.len() - truth.trim_start().len()) else { continue };
        let (prefix, rest) = truth.split_at(space);
        let mut choices = vec![truth.to_string()];
        let mut tries = 0;
        while choices.len() < CHOICES && tries < 100 {
            tries += 1;
            let pick = pool[(rng.next_u64() % pool.len() as u64) as usize];
            if !choices.iter().any(|c| c == pick) {
                choices.push(pick.to_string());
            }
        }
        if choices.len() < CHOICES {
            continue;
        }
        let longest = choices.iter().map(|c| tokens(&format!("{context}\n{c}"))).collect::<Result<Vec<_>, _>>()?;
        if longest.into_iter().max().unwrap_or(0) + 1 > max_tokens {
            continue;
        }
        // The true line's place among the candidates, drawn too.
        let gold = (rng.next_u64() % CHOICES as u64) as usize;
        choices.swap(0, gold);
        fitting.push(Item { id: 0, context: context.to_string(), choices, gold, prefix: prefix.to_string(), rest: rest.to_string() });
    }
    let stride = fitting.len().div_ceil(count.max(1)).max(1);
    Ok(fitting.into_iter().step_by(stride).take(count).enumerate().map(|(id, item)| Item { id, ..item }).collect())
}

/// Writes `items` as JSON lines.
pub fn write_items(path: &Path, items: &[Item]) -> Result<(), TaskError> {
    let mut text = String::new();
    for item in items {
        text.push_str(&serde_json::to_string(item).map_err(|e| TaskError::Invalid(e.to_string()))?);
        text.push('\n');
    }
    std::fs::write(path, text).map_err(|source| TaskError::Io { what: "cannot write", path: path.to_path_buf(), source })
}

/// Reads items written by [`write_items`]; a bad line is named.
pub fn read_items(path: &Path) -> Result<Vec<Item>, TaskError> {
    let text = std::fs::read_to_string(path).map_err(|source| TaskError::Io { what: "cannot read", path: path.to_path_buf(), source })?;
    let mut items = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let item: Item = serde_json::from_str(line)
            .map_err(|e| TaskError::Invalid(format!("{} line {}: not a next-line item: {e}", path.display(), n + 1)))?;
        if item.choices.is_empty() || item.gold >= item.choices.len() {
            return Err(TaskError::Invalid(format!(
                "{} line {}: gold {} is not one of its {} choices",
                path.display(),
                n + 1,
                item.gold,
                item.choices.len()
            )));
        }
        items.push(item);
    }
    Ok(items)
}

/// troupe's answer to one item.
#[derive(Debug, Clone, Serialize)]
pub struct Scored {
    pub id: usize,
    /// Sum of the log-probabilities of each candidate's tokens after the context.
    pub loglikelihoods: Vec<f64>,
    /// The likeliest candidate (the first of equals).
    pub predicted: usize,
    /// The greedy continuation of the context and the next line's first word, up to the first
    /// newline.
    pub generated: String,
}

/// What [`score`] reports: the items' answers and both tasks' accuracy.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub items: Vec<Scored>,
    /// Share of items whose likeliest candidate is the true line.
    pub next_line_acc: f64,
    /// Share of items whose greedy continuation is the rest of the true line exactly.
    pub next_line_gen_exact_match: f64,
}

/// Scores `items` with `model`: each candidate's log-likelihood and a greedy continuation of
/// at most `max_gen_tokens` tokens (see the module docs for how tokens are split).
pub fn score(model: &Gpt, tokenizer: &Tokenizer, items: &[Item], max_gen_tokens: usize) -> anyhow::Result<Report> {
    let vocab_limit = tokenizer.vocab_size();
    let encode = |s: &str| -> anyhow::Result<Vec<i64>> { Ok(tokenizer.encode(s)?.into_iter().map(i64::from).collect()) };
    let mut out = Vec::with_capacity(items.len());
    let (mut correct, mut exact) = (0usize, 0usize);
    for item in items {
        let context = encode(&item.context)?;
        anyhow::ensure!(!context.is_empty(), "item {}: the context is empty", item.id);
        let mut loglikelihoods = Vec::with_capacity(item.choices.len());
        for choice in &item.choices {
            let whole = encode(&format!("{}\n{choice}", item.context))?;
            let continuation = whole.get(context.len()..).unwrap_or_default();
            let tokens: Vec<i64> = context.iter().chain(continuation).copied().collect();
            let scored = model.score_tokens(&tokens, 0, vocab_limit)?;
            // scored[k] is the log-probability of tokens[k + 1].
            loglikelihoods.push(scored[context.len() - 1..].iter().map(|s| f64::from(s.logprob)).sum());
        }
        let predicted = loglikelihoods.iter().enumerate().fold(0, |best, (i, &ll)| if ll > loglikelihoods[best] { i } else { best });
        correct += usize::from(predicted == item.gold);
        let prompt = encode(&format!("{}\n{}", item.context, item.prefix))?;
        let greedy = Sampling { temperature: 0.0, top_k: None, top_p: 1.0 };
        let text = model::continuation(model, tokenizer, &prompt, max_gen_tokens, greedy, 0)?;
        let generated = text.split('\n').next().unwrap_or_default().split(EOT_TOKEN).next().unwrap_or_default().to_string();
        exact += usize::from(generated == item.rest);
        out.push(Scored { id: item.id, loglikelihoods, predicted, generated });
    }
    let n = items.len().max(1) as f64;
    Ok(Report { items: out, next_line_acc: correct as f64 / n, next_line_gen_exact_match: exact as f64 / n })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_round_trip_and_a_bad_line_is_named() {
        let dir = std::env::temp_dir().join(format!("troupe-tasks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("items.jsonl");
        let item =
            Item { id: 0, context: "a".into(), choices: vec!["b".into(), "c".into()], gold: 1, prefix: "c".into(), rest: String::new() };
        write_items(&path, std::slice::from_ref(&item)).unwrap();
        assert_eq!(read_items(&path).unwrap(), vec![item]);
        std::fs::write(&path, "{\"id\": 0}\n").unwrap();
        let e = read_items(&path).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("not a next-line item"), "{e}");
        std::fs::write(&path, r#"{"id":0,"context":"a","choices":["b"],"gold":3,"prefix":"b","rest":""}"#).unwrap();
        let e = read_items(&path).unwrap_err().to_string();
        assert!(e.contains("gold 3 is not one of its 1 choices"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
