//! Chat and instruction data: conversations rendered with a chat template into tokens and a
//! loss mask, so that fine-tuning learns only the assistant's answers.
//!
//! **The template** ([`ChatTemplate`], stored as `chat_template.json` with the data, and from
//! there with every checkpoint and registry version) turns a conversation into text, one
//! message after another:
//!
//! ```text
//! System: You are terse.⏎User: Who wrote Hamlet?⏎Assistant: Shakespeare.<|endoftext|>⏎
//! ```
//!
//! each message is its role's prefix, its content and the end of turn; an assistant's content is
//! followed by `<|endoftext|>`, which the model learns to say when it has answered (serving
//! stops there). Each piece is tokenized on its own, in training and in serving alike, so the
//! ids of a prompt are the same in both. The prompt for a reply is the conversation so far
//! followed by the assistant's prefix.
//!
//! **The mask** is 1 on the tokens of assistants' contents and their `<|endoftext|>`, 0
//! elsewhere (prefixes, other roles, padding): the loss counts only the targets under a 1.
//!
//! **Samples are whole conversations**: each is padded with `<|endoftext|>` (mask 0) to
//! `block_size` tokens, so sample *i* of the stream is conversation *i* and attention never
//! crosses two conversations. A longer conversation is cut at `block_size` (counted in the
//! report); one with no assistant token left is dropped. The sampler's guarantees (each sample
//! once per epoch, the same order on any world size) hold as for any stream.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::{DataError, DataResult};
use super::meta::{Meta, SourceReport, ValSplit, FORMAT_VERSION, META_JSON, TOKENIZER_JSON};
use super::shards::ShardWriter;
use super::tokenizer::Tokenizer;
use super::tokens::TokenDtype;

/// The template's file in a prepared folder, a checkpoint and a registry version.
pub const CHAT_TEMPLATE_JSON: &str = "chat_template.json";

/// How messages become text. See the module documentation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatTemplate {
    pub name: String,
    pub system: String,
    pub user: String,
    pub assistant: String,
    /// After every message (after an assistant's `<|endoftext|>`).
    pub end_of_turn: String,
}

impl Default for ChatTemplate {
    fn default() -> Self {
        ChatTemplate {
            name: "troupe-chat-1".into(),
            system: "System: ".into(),
            user: "User: ".into(),
            assistant: "Assistant: ".into(),
            end_of_turn: "\n".into(),
        }
    }
}

impl ChatTemplate {
    /// The template stored in a folder, or the default one when there is none.
    pub fn load_or_default(dir: &Path) -> DataResult<ChatTemplate> {
        let path = dir.join(CHAT_TEMPLATE_JSON);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| DataError::BadInput { path, reason: format!("not a chat template: {e}") }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ChatTemplate::default()),
            Err(e) => Err(DataError::io("read", &path, e)),
        }
    }

    fn prefix(&self, role: Role) -> &str {
        match role {
            Role::System => &self.system,
            Role::User => &self.user,
            Role::Assistant => &self.assistant,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

/// The JSONL layout of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatFormat {
    /// `{"messages": [{"role": "system" | "user" | "assistant", "content": "…"}, …]}`
    Chat,
    /// `{"prompt": "…", "completion": "…"}`: a user message and the assistant's answer.
    Instruct,
}

/// One JSONL line as messages; the error says what is wrong (the caller adds file and line).
pub fn parse_line(line: &str, format: ChatFormat) -> Result<Vec<Message>, String> {
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let text = |key: &str| -> Result<String, String> {
        value.get(key).and_then(|v| v.as_str()).map(str::to_string).ok_or_else(|| format!("no \"{key}\" string"))
    };
    match format {
        ChatFormat::Instruct => Ok(vec![
            Message { role: Role::User, content: text("prompt")? },
            Message { role: Role::Assistant, content: text("completion")? },
        ]),
        ChatFormat::Chat => {
            let messages = value.get("messages").and_then(|m| m.as_array()).ok_or("no \"messages\" list")?;
            let mut out = Vec::with_capacity(messages.len());
            for (i, m) in messages.iter().enumerate() {
                let role = m.get("role").and_then(|r| r.as_str()).ok_or_else(|| format!("message {i} has no \"role\""))?;
                let role = match role {
                    "system" => Role::System,
                    "user" => Role::User,
                    "assistant" => Role::Assistant,
                    other => return Err(format!("message {i} has role {other:?}; roles are system, user and assistant")),
                };
                let content = m.get("content").and_then(|c| c.as_str()).ok_or_else(|| format!("message {i} has no \"content\" string"))?;
                out.push(Message { role, content: content.to_string() });
            }
            if !out.iter().any(|m| m.role == Role::Assistant) {
                return Err("no assistant message: nothing to learn".into());
            }
            Ok(out)
        }
    }
}

/// A conversation as token ids and their loss mask; with `reply_prompt`, followed by the
/// assistant's prefix (the prompt the model continues).
pub fn render(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    messages: &[Message],
    reply_prompt: bool,
) -> DataResult<(Vec<u32>, Vec<bool>)> {
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    let push = |text: &str, trained: bool, ids: &mut Vec<u32>, mask: &mut Vec<bool>| -> DataResult<()> {
        let piece = tokenizer.encode(text)?;
        mask.extend(std::iter::repeat_n(trained, piece.len()));
        ids.extend(piece);
        Ok(())
    };
    for m in messages {
        let assistant = m.role == Role::Assistant;
        push(template.prefix(m.role), false, &mut ids, &mut mask)?;
        push(&m.content, assistant, &mut ids, &mut mask)?;
        if assistant {
            ids.push(tokenizer.eot_id());
            mask.push(true);
        }
        push(&template.end_of_turn, false, &mut ids, &mut mask)?;
    }
    if reply_prompt {
        push(&template.assistant, false, &mut ids, &mut mask)?;
    }
    Ok((ids, mask))
}

pub struct ChatPrepareOptions {
    pub inputs: Vec<PathBuf>,
    pub format: ChatFormat,
    pub out: PathBuf,
    /// The model's tokenizer (`troupe import`'s output has it).
    pub tokenizer: PathBuf,
    /// Tokens per conversation: the model's `block_size`.
    pub block_size: usize,
    pub val_fraction: f64,
    pub seed: u64,
    pub shard_tokens: u64,
}

/// Prepares chat or instruction JSONL into `out`: token and mask shards, `meta.json`, the
/// tokenizer and the chat template. Written into a temporary folder renamed into place.
pub fn prepare_chat(opts: &ChatPrepareOptions) -> DataResult<Meta> {
    if opts.block_size < 2 {
        return Err(DataError::InvalidOption { field: "block_size", reason: "must be at least 2".into() });
    }
    if !(0.0..1.0).contains(&opts.val_fraction) {
        return Err(DataError::InvalidOption { field: "val_fraction", reason: "must be in [0, 1)".into() });
    }
    if opts.out.exists() {
        return Err(DataError::OutputExists { path: opts.out.clone() });
    }
    let name = opts.out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = opts.out.with_file_name(format!("{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| DataError::io("create the folder", &tmp, e))?;
    let result = prepare_into(opts, &tmp).and_then(|meta| {
        std::fs::rename(&tmp, &opts.out).map_err(|e| DataError::io("move the prepared folder into place at", &opts.out, e))?;
        Ok(meta)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn prepare_into(opts: &ChatPrepareOptions, dir: &Path) -> DataResult<Meta> {
    let tokenizer = Tokenizer::load(&opts.tokenizer)?;
    let tokenizer_json = std::fs::read(&opts.tokenizer).map_err(|e| DataError::io("read", &opts.tokenizer, e))?;
    let template = ChatTemplate::default();
    let dtype = TokenDtype::for_vocab(tokenizer.vocab_size());
    let block = opts.block_size;
    let mut train = ShardWriter::new(dir, "train", dtype, opts.shard_tokens).counting(tokenizer.vocab_size());
    let mut train_mask = ShardWriter::new(dir, "train-mask", dtype, opts.shard_tokens);
    let mut val = ShardWriter::new(dir, "val-chat", dtype, opts.shard_tokens);
    let mut val_mask = ShardWriter::new(dir, "val-chat-mask", dtype, opts.shard_tokens);
    let mut report = SourceReport { name: "chat".into(), weight: 1.0, epochs: 1.0, ..SourceReport::default() };
    let (mut truncated, mut no_answer) = (0u64, 0u64);
    for path in &opts.inputs {
        report.inputs.push(path.display().to_string());
        report.files += 1;
        let file = std::fs::File::open(path).map_err(|e| DataError::io("open", path, e))?;
        for (n, line) in BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|e| DataError::io("read", path, e))?;
            report.bytes_read += line.len() as u64 + 1;
            if line.trim().is_empty() {
                continue;
            }
            report.records += 1;
            let messages = parse_line(&line, opts.format)
                .map_err(|reason| DataError::BadInput { path: path.clone(), reason: format!("line {}: {reason}", n + 1) })?;
            let (mut ids, mut mask) = render(&tokenizer, &template, &messages, false)?;
            if ids.len() > block {
                ids.truncate(block);
                mask.truncate(block);
                truncated += 1;
            }
            // Position 0 is never a target; a conversation must keep an answer after it.
            if !mask.iter().skip(1).any(|&m| m) {
                no_answer += 1;
                continue;
            }
            ids.resize(block, tokenizer.eot_id());
            mask.resize(block, false);
            let mask_ids: Vec<u32> = mask.iter().map(|&m| u32::from(m)).collect();
            let held_out = {
                let digest = Sha256::digest(format!("{}/{line}", opts.seed).as_bytes());
                (u64::from_le_bytes(digest[..8].try_into().expect("8 bytes")) >> 11) as f64 / (1u64 << 53) as f64 <= opts.val_fraction
            };
            report.documents_kept += 1;
            let trained = mask.iter().filter(|&&m| m).count() as u64;
            if held_out {
                val.write(&ids)?;
                val_mask.write(&mask_ids)?;
                report.val_documents += 1;
                report.val_tokens += trained;
            } else {
                train.write(&ids)?;
                train_mask.write(&mask_ids)?;
                report.train_documents += 1;
                report.train_tokens += trained;
            }
        }
    }
    if no_answer > 0 {
        report.dropped.insert("no_answer_within_block".into(), no_answer);
    }
    if truncated > 0 {
        report.dropped.insert("truncated_not_dropped".into(), truncated);
    }
    if report.train_documents == 0 {
        return Err(DataError::NoDocuments { files: opts.inputs.len(), dropped: format!("{:?}", report.dropped) });
    }
    // One more token ends each stream, so that its last conversation's last target exists and
    // the conversation is a whole sample (a stream of n tokens holds (n - 1) / block samples).
    for (tokens, mask) in [(&mut train, &mut train_mask), (&mut val, &mut val_mask)] {
        if tokens.tokens() > 0 {
            tokens.write(&[tokenizer.eot_id()])?;
            mask.write(&[0])?;
        }
    }
    report.mixed_tokens = report.train_tokens;
    let entropy = train.unigram_entropy_nats();
    let (train_tokens, val_tokens) = (train.tokens(), val.tokens());
    let val_split = ValSplit { source: "chat".into(), shards: val.finish()?, mask: val_mask.finish()? };
    let meta = Meta {
        format_version: FORMAT_VERSION,
        vocab_size: tokenizer.vocab_size(),
        eot_id: tokenizer.eot_id(),
        dtype,
        train: train.finish()?,
        train_mask: train_mask.finish()?,
        val: vec![val_split],
        documents: report.documents_kept,
        train_documents: report.train_documents,
        val_documents: report.val_documents,
        train_tokens,
        val_tokens,
        train_bytes: 0,
        val_bytes: 0,
        unigram_entropy_nats: entropy,
        dropped: report.dropped.clone(),
        sources: vec![report],
        files_read: opts.inputs.len() as u64,
        val_fraction: opts.val_fraction,
        seed: opts.seed,
        tokenizer: format!("given: {} (conversations rendered with the chat template {})", opts.tokenizer.display(), template.name),
        filters: troupe_core::config::FilterConfig::default(),
        sample_tokens: Some(block),
    };
    let template_json = serde_json::to_vec_pretty(&template).expect("plain data serialises");
    let meta_json = serde_json::to_vec_pretty(&meta).expect("plain data serialises");
    for (file, bytes) in [(TOKENIZER_JSON, tokenizer_json), (CHAT_TEMPLATE_JSON, template_json), (META_JSON, meta_json)] {
        let path = dir.join(file);
        std::fs::write(&path, bytes).map_err(|e| DataError::io("write", &path, e))?;
    }
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_or_say_what_is_wrong() {
        let ok =
            parse_line(r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#, ChatFormat::Chat)
                .unwrap();
        assert_eq!(ok[1], Message { role: Role::Assistant, content: "hello".into() });
        let instruct = parse_line(r#"{"prompt": "2+2?", "completion": "4"}"#, ChatFormat::Instruct).unwrap();
        assert_eq!(instruct.len(), 2);
        for (line, says) in [
            ("{", "not JSON"),
            (r#"{"text": "x"}"#, "no \"messages\""),
            (r#"{"messages": [{"role": "bot", "content": "x"}]}"#, "role \"bot\""),
            (r#"{"messages": [{"role": "user"}]}"#, "no \"content\""),
            (r#"{"messages": [{"role": "user", "content": "x"}]}"#, "no assistant"),
        ] {
            let err = parse_line(line, ChatFormat::Chat).unwrap_err();
            assert!(err.contains(says), "{line}: {err}");
        }
        assert!(parse_line(r#"{"prompt": "x"}"#, ChatFormat::Instruct).unwrap_err().contains("completion"));
    }
}
