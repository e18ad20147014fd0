use super::*;
use crate::data::corpus::tests::scratch_dir;
use crate::data::meta::{load_meta, open_train, open_val, verify_prepared};
use crate::data::sources::tests::write_parquet;
use crate::data::{clean_text, is_prepared, TokenFile};

fn write(path: &Path, text: &str) {
    if let Some(parent) = path.parent() {
        let _ = fs::create_dir_all(parent);
    }
    let _ = fs::write(path, text);
}

fn options(inputs: Vec<PathBuf>, out: PathBuf) -> PrepareOptions {
    PrepareOptions { file_filter: Some(".txt".into()), vocab_size: 300, val_fraction: 0.25, seed: 7, ..PrepareOptions::new(inputs, out) }
}

const PLAYS: [&str; 5] = [
    "To be, or not to be, that is the question:\r\nWhether 'tis nobler in the mind to suffer",
    "Now is the winter of our discontent\n\n\n\nMade glorious summer by this sun of York;",
    "Friends, Romans, countrymen,   lend me your ears;\nI come to bury Caesar, not to praise him.",
    "All the world's a stage,\nAnd all the men and women merely players;",
    "If music be the food of love, play on;\nGive me excess of it, that, surfeiting,",
];

/// Every document of a split, decoded.
fn documents(dir: &Path, meta: &Meta, tokens: &TokenFile) -> DataResult<Vec<String>> {
    let tok = Tokenizer::load(&dir.join(TOKENIZER_JSON))?;
    let ids: Vec<u32> = tokens.window(0, tokens.len())?.into_iter().map(|i| i as u32).collect();
    ids.split(|&id| id == meta.eot_id).filter(|d| !d.is_empty()).map(|d| tok.decode(d)).collect()
}

fn no_tmp_left(dir: &Path) -> bool {
    !fs::read_dir(dir).map(|entries| entries.flatten().any(|e| e.file_name().to_string_lossy().contains(".tmp-"))).unwrap_or(false)
}

#[test]
fn a_folder_of_text_is_prepared_into_shards_that_hold_exactly_the_cleaned_documents() -> DataResult<()> {
    let dir = scratch_dir("prepare");
    let corpus = dir.join("corpus");
    for (i, play) in PLAYS.iter().enumerate() {
        write(&corpus.join(format!("play{i}.txt")), play);
    }
    write(&corpus.join("nested/dup.txt"), &format!("{}\n\n", PLAYS[0])); // equal once cleaned
    write(&corpus.join("blank.txt"), " \n\t\n");
    write(&corpus.join("notes.md"), "filtered out");
    let out = dir.join("prepared");

    let meta = prepare(&PrepareOptions { shard_tokens: 16, ..options(vec![corpus.clone()], out.clone()) })?;
    assert_eq!(meta.files_read, 7);
    assert_eq!(meta.documents, 5);
    assert_eq!(meta.dropped.get("exact_duplicate"), Some(&1));
    assert_eq!(meta.dropped.get("empty"), Some(&1));
    assert_eq!(meta.train_documents + meta.val_documents, 5);
    assert!(meta.val_documents >= 1 && meta.train_documents >= 1);
    assert!(meta.train.len() > 1, "16-token shards: several of them");
    assert_eq!(meta.dtype, TokenDtype::U16);
    assert!(meta.unigram_entropy_nats > 0.0 && meta.unigram_entropy_nats < (meta.vocab_size as f64).ln());
    assert!(is_prepared(&out));
    assert_eq!(load_meta(&out)?, meta);
    assert_eq!(verify_prepared(&out)?, meta);
    assert!(no_tmp_left(&dir));

    let train = documents(&out, &meta, &open_train(&out, &meta)?)?;
    let val = documents(&out, &meta, &open_val(&out, &meta)?)?;
    assert_eq!((train.len() as u64, val.len() as u64), (meta.train_documents, meta.val_documents));
    assert_eq!(train.iter().chain(&val).map(|t| t.len() as u64).sum::<u64>(), meta.train_bytes + meta.val_bytes);
    for text in train.iter().chain(&val) {
        assert!(PLAYS.iter().any(|p| clean_text(p) == *text), "{text:?} is not a cleaned input");
    }
    // A second prepare into the same folder refuses rather than mixing outputs.
    assert!(matches!(prepare(&options(vec![corpus], out.clone())), Err(DataError::OutputExists { .. })));
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn prepare_is_deterministic_whatever_the_thread_count() -> DataResult<()> {
    let dir = scratch_dir("prepare-det");
    for i in 0..40 {
        write(&dir.join(format!("in/{i}.txt")), &crate::data::generated_text(3000, i));
    }
    let a = prepare(&PrepareOptions { threads: 1, ..options(vec![dir.join("in")], dir.join("a")) })?;
    let b = prepare(&PrepareOptions { threads: 3, ..options(vec![dir.join("in")], dir.join("b")) })?;
    assert_eq!(a.train, b.train);
    assert_eq!(a.val, b.val);
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn missing_input_is_named_and_leaves_no_output() {
    let dir = scratch_dir("prepare-missing");
    let missing = dir.join("no-such-corpus");
    let out = dir.join("out");
    let Err(err) = prepare(&options(vec![missing.clone()], out.clone())) else {
        panic!("a missing input must fail");
    };
    let msg = err.to_string();
    assert!(msg.contains(&missing.display().to_string()) && msg.contains("does not exist"), "{msg}");
    assert!(!out.exists() && no_tmp_left(&dir));
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn bad_options_are_refused() {
    let out = PathBuf::from("/tmp/unused");
    let base = options(vec![PathBuf::from("/tmp")], out);
    let source = |name: &str, weight: f64| Source { name: name.into(), inputs: vec![PathBuf::from("/tmp")], weight };
    for bad in [
        PrepareOptions { val_fraction: 1.0, ..base.clone() },
        PrepareOptions { val_fraction: f64::NAN, ..base.clone() },
        PrepareOptions { vocab_size: 10, ..base.clone() },
        PrepareOptions { sources: vec![], ..base.clone() },
        PrepareOptions { sources: vec![source("a b", 1.0)], ..base.clone() },
        PrepareOptions { sources: vec![source("a", 1.0), source("a", 1.0)], ..base.clone() },
        PrepareOptions { sources: vec![source("a", -1.0)], ..base.clone() },
        PrepareOptions { sources: vec![source("a", 0.0)], ..base.clone() },
    ] {
        assert!(matches!(prepare(&bad), Err(DataError::InvalidOption { .. })), "{bad:?}");
    }
}

#[test]
fn nothing_left_after_filtering_is_an_error_naming_the_reasons() {
    let dir = scratch_dir("prepare-empty");
    write(&dir.join("in/a.txt"), "\n \n");
    write(&dir.join("in/b.txt"), "short");
    let opts = options(vec![dir.join("in")], dir.join("out"));
    let err = prepare(&PrepareOptions { filters: FilterConfig { min_chars: 10, ..FilterConfig::default() }, ..opts }).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("no document is left") && msg.contains("1 empty") && msg.contains("1 too_short"), "{msg}");
    assert!(!dir.join("out").exists() && no_tmp_left(&dir));
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn two_documents_still_give_one_validation_document() -> DataResult<()> {
    let dir = scratch_dir("prepare-two");
    write(&dir.join("in/a.txt"), PLAYS[0]);
    write(&dir.join("in/b.txt"), PLAYS[1]);
    let meta = prepare(&PrepareOptions { val_fraction: 0.01, ..options(vec![dir.join("in")], dir.join("out")) })?;
    assert_eq!((meta.train_documents, meta.val_documents), (1, 1));
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

/// Words of a synthetic language, so that sources are told apart by their vocabulary.
fn words(seed: u64, n: usize, prefix: &str) -> String {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            format!("{prefix}{}", (state >> 33) % 50)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A JSONL.zst, a Parquet and a text-folder source in one call with weights: each source's
/// share of the train stream's tokens matches its weight within 1 %, each keeps its own
/// validation split, and the report accounts for every record.
#[test]
fn three_sources_of_three_formats_are_mixed_by_weight() -> DataResult<()> {
    let dir = scratch_dir("prepare-mix");
    // Web: 300 JSONL documents (+2 bad lines), zstd-compressed.
    let mut jsonl = String::new();
    for i in 0..300 {
        jsonl.push_str(&serde_json::json!({ "text": words(i, 60, "web"), "url": i }).to_string());
        jsonl.push('\n');
    }
    jsonl.push_str("not json\n{\"body\": 1}\n");
    let web = dir.join("web.jsonl.zst");
    fs::write(&web, zstd::encode_all(jsonl.as_bytes(), 3).map_err(|e| DataError::io("compress", &web, e))?)
        .map_err(|e| DataError::io("write", &web, e))?;
    // Chat: 80 Parquet rows.
    let chat = dir.join("chat.parquet");
    let rows: Vec<String> = (0..80).map(|i| words(1000 + i, 40, "chat")).collect();
    write_parquet(&chat, "text", &rows.iter().map(|r| Some(r.as_str())).collect::<Vec<_>>());
    // Books: 10 text files.
    for i in 0..10 {
        write(&dir.join(format!("books/{i}.txt")), &words(5000 + i, 400, "book"));
    }
    let sources = vec![
        Source { name: "web".into(), inputs: vec![web], weight: 0.5 },
        Source { name: "chat".into(), inputs: vec![chat], weight: 0.3 },
        Source { name: "books".into(), inputs: vec![dir.join("books")], weight: 0.2 },
    ];
    let out = dir.join("mixed");
    let meta = prepare(&PrepareOptions {
        sources,
        file_filter: None,
        vocab_size: 400,
        val_fraction: 0.1,
        shard_tokens: 5000,
        ..PrepareOptions::new(Vec::new(), out.clone())
    })?;
    let web = &meta.sources[0];
    assert_eq!((web.records, web.bad_records, web.files), (302, 2, 1));
    assert_eq!(meta.sources[1].records, 80);
    assert_eq!(meta.sources[2].files, 10);
    for s in &meta.sources {
        assert_eq!(s.documents_kept, s.train_documents + s.val_documents, "{}: every kept document is in a split", s.name);
        assert_eq!(s.records - s.bad_records, s.documents_kept + s.dropped.values().sum::<u64>(), "{}: every record accounted for", s.name);
    }
    assert_eq!(meta.val.iter().map(|v| v.source.as_str()).collect::<Vec<_>>(), vec!["web", "chat", "books"]);
    assert!(meta.val.iter().all(|v| !v.shards.is_empty()), "each source has validation documents");
    assert!(!fs::read_dir(&out)
        .map_err(|e| DataError::io("list", &out, e))?
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("mix-")));

    // Shares of the stream, counted from the tokens themselves: each source's words are its own.
    let tok = Tokenizer::load(&out.join(TOKENIZER_JSON))?;
    let train = open_train(&out, &meta)?;
    let ids: Vec<u32> = train.window(0, train.len())?.into_iter().map(|i| i as u32).collect();
    let mut tokens_of = BTreeMap::<&str, u64>::new();
    for doc in ids.split_inclusive(|&id| id == meta.eot_id) {
        let text = tok.decode(&doc[..doc.len() - 1])?;
        let source = ["web", "chat", "book"].into_iter().find(|p| text.starts_with(p)).expect("a known source");
        *tokens_of.entry(source).or_default() += doc.len() as u64;
    }
    for (source, weight, report) in [("web", 0.5, 0), ("chat", 0.3, 1), ("book", 0.2, 2)] {
        let share = tokens_of[source] as f64 / ids.len() as f64;
        println!("{source}: {:.2} % of the train stream (weight {weight}), epochs {:.2}", share * 100.0, meta.sources[report].epochs);
        assert!((share - weight).abs() < 0.01, "{source}: share {share} vs weight {weight}");
        assert_eq!(meta.sources[report].mixed_tokens, tokens_of[source]);
    }
    assert!(meta.sources[1].epochs > 1.0, "chat is up-sampled");
    verify_prepared(&out)?;
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn bad_records_are_counted_and_too_many_stop_with_the_first_ones_named() {
    let dir = scratch_dir("prepare-bad");
    let mut lines = String::new();
    for i in 0..20 {
        lines.push_str(&serde_json::json!({ "text": words(i, 30, "w") }).to_string());
        lines.push('\n');
    }
    for _ in 0..5 {
        lines.push_str("{\"content\": \"x\"}\n");
    }
    let file = dir.join("data.jsonl");
    write(&file, &lines);
    let base = PrepareOptions { file_filter: None, vocab_size: 300, ..PrepareOptions::new(vec![file.clone()], dir.join("ok")) };
    let meta = prepare(&base).unwrap();
    assert_eq!(meta.sources[0].bad_records, 5);
    let err = prepare(&PrepareOptions { max_bad_records: 3, out: dir.join("stopped"), ..base.clone() }).unwrap_err().to_string();
    assert!(err.contains("4 records are not documents") && err.contains("data.jsonl:21: no field \"text\""), "{err}");
    assert!(!dir.join("stopped").exists() && no_tmp_left(&dir));
    // A Parquet file without the column, named with its columns.
    let parquet = dir.join("rows.parquet");
    write_parquet(&parquet, "body", &[Some("x")]);
    let err =
        prepare(&PrepareOptions { out: dir.join("pq"), ..PrepareOptions::new(vec![parquet], dir.join("pq")) }).unwrap_err().to_string();
    assert!(err.contains("rows.parquet") && err.contains("no column \"text\"") && err.contains("body"), "{err}");
    assert!(!dir.join("pq").exists() && no_tmp_left(&dir));
    let _ = fs::remove_dir_all(&dir);
}

/// A word-level tokenizer.json with `n` words (`w0` …) and the separator: a vocabulary over
/// 65,536 without training one.
pub(crate) fn word_tokenizer(n: usize) -> String {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<|endoftext|>".into(), 0.into());
    vocab.insert("[UNK]".into(), 1.into());
    for i in 0..n {
        vocab.insert(format!("w{i}"), (i + 2).into());
    }
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    })
    .to_string()
}

#[test]
fn a_given_tokenizer_above_65536_ids_gives_u32_shards() -> DataResult<()> {
    let dir = scratch_dir("prepare-u32");
    let tokenizer = dir.join("tokenizer.json");
    write(&tokenizer, &word_tokenizer(100_000));
    for i in 0..20u64 {
        let text: Vec<String> = (0..50).map(|j| format!("w{}", 60_000 + (i * 997 + j * 131) % 40_000)).collect();
        write(&dir.join(format!("in/{i}.txt")), &text.join(" "));
    }
    let out = dir.join("out");
    let meta = prepare(&PrepareOptions { tokenizer: Some(tokenizer), ..options(vec![dir.join("in")], out.clone()) })?;
    assert_eq!(meta.dtype, TokenDtype::U32);
    assert_eq!(meta.vocab_size, 100_002);
    let train = open_train(&out, &meta)?;
    let ids = train.window(0, train.len())?;
    assert!(ids.iter().any(|&id| id > 65_535), "ids above u16 are stored whole");
    assert!(ids.iter().all(|&id| id < 100_002));
    assert!(meta.tokenizer.starts_with("given: "));
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

/// A folder written by format 1 (one u16 `train.bin` and `val.bin`) still loads.
#[test]
fn a_format_1_folder_still_loads() -> DataResult<()> {
    let dir = scratch_dir("prepare-v1");
    let ids: [u16; 6] = [5, 6, 7, 0, 8, 0];
    let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    write(&dir.join("tokenizer.json"), "{}");
    fs::write(dir.join("train.bin"), &bytes).map_err(|e| DataError::io("write", &dir, e))?;
    fs::write(dir.join("val.bin"), &bytes[..4]).map_err(|e| DataError::io("write", &dir, e))?;
    let meta = serde_json::json!({
        "format_version": 1, "vocab_size": 300, "eot_id": 0, "documents": 3, "duplicates_dropped": 1, "empty_dropped": 0,
        "train_documents": 2, "val_documents": 1, "train_tokens": 6, "val_tokens": 2, "train_bytes": 10, "val_bytes": 3,
        "train_sha256": hex::encode(Sha256::digest(&bytes)), "val_sha256": hex::encode(Sha256::digest(&bytes[..4])),
        "unigram_entropy_nats": 1.5, "sources": ["corpus"], "files_read": 4, "file_filter": null, "val_fraction": 0.1, "seed": 1
    });
    write(&dir.join("meta.json"), &meta.to_string());
    let meta = verify_prepared(&dir)?;
    assert_eq!((meta.format_version, meta.dtype, meta.train_tokens), (1, TokenDtype::U16, 6));
    assert_eq!(open_train(&dir, &meta)?.window(0, 6)?, vec![5, 6, 7, 0, 8, 0]);
    assert_eq!(open_val(&dir, &meta)?.len(), 2);
    // Another version is refused with the way out.
    write(&dir.join("meta.json"), "{\"format_version\": 9}");
    let err = load_meta(&dir).unwrap_err().to_string();
    assert!(err.contains("format version 9") && err.contains("troupe prepare"), "{err}");
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}
