//! Where documents come from: text files and folders of them (one document per file), JSON
//! Lines (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`; one document per line, its text in one field)
//! and Parquet (`.parquet`; one document per row, its text in one column).
//!
//! Each file's format comes from its name. Files are read as streams: a JSONL file of any size
//! is read one line at a time, a Parquet file one row group at a time. A line or row that is
//! not a document (not JSON, no text field, a null) is handed to the caller as a
//! [`Record::Bad`] with its file and line, so the pipeline can count it, report it and go on.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::corpus::collect_files_where;
use super::error::{DataError, DataResult};

/// A file's layout, from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    Text,
    Jsonl,
    JsonlGz,
    JsonlZst,
    Parquet,
}

impl InputFormat {
    /// The format of a file by its name: `.jsonl`, `.jsonl.gz`, `.jsonl.zst`, `.parquet`, and
    /// text for `.txt`, `.md` and names without an extension. `None` for anything else.
    pub fn of(path: &Path) -> Option<InputFormat> {
        let name = path.file_name()?.to_string_lossy().to_lowercase();
        let format = if name.ends_with(".jsonl") || name.ends_with(".ndjson") {
            InputFormat::Jsonl
        } else if name.ends_with(".jsonl.gz") || name.ends_with(".ndjson.gz") {
            InputFormat::JsonlGz
        } else if name.ends_with(".jsonl.zst") || name.ends_with(".ndjson.zst") {
            InputFormat::JsonlZst
        } else if name.ends_with(".parquet") {
            InputFormat::Parquet
        } else if name.ends_with(".txt") || name.ends_with(".md") || !name.contains('.') {
            InputFormat::Text
        } else {
            return None;
        };
        Some(format)
    }
}

/// The files of a source: its inputs expanded (folders walked in name order), each with its
/// format. In a folder, files of an unknown format are skipped unless `file_filter` asks for
/// them by suffix (then they are read as text); a file named directly must have a known
/// format, or be matched by the filter.
pub fn source_files(inputs: &[PathBuf], file_filter: Option<&str>) -> DataResult<Vec<(PathBuf, InputFormat)>> {
    let known = |path: &Path| {
        let by_filter = file_filter.is_some_and(|suffix| path.to_string_lossy().ends_with(suffix));
        match file_filter {
            Some(_) => by_filter,
            None => InputFormat::of(path).is_some(),
        }
    };
    let files = collect_files_where(inputs, file_filter, &known)?;
    files
        .into_iter()
        .map(|path| match InputFormat::of(&path) {
            Some(format) => Ok((path, format)),
            None if file_filter.is_some_and(|suffix| path.to_string_lossy().ends_with(suffix)) => Ok((path, InputFormat::Text)),
            None => Err(DataError::UnknownFormat { path }),
        })
        .collect()
}

/// One document, or a line/row that is not one.
#[derive(Debug)]
pub enum Record {
    Document { text: String, line: u64 },
    Bad { line: u64, reason: String },
}

/// Counts the bytes read from a file (compressed bytes, for a compressed one): progress.
struct Counting<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Reads every record of `path` in order, handing each to `visit`; `bytes_read` grows as the
/// file is read. An error of `visit` stops the reading and is returned.
pub fn read_records(
    path: &Path,
    format: InputFormat,
    text_field: &str,
    bytes_read: &Arc<AtomicU64>,
    visit: &mut dyn FnMut(Record) -> DataResult<()>,
) -> DataResult<()> {
    let open = || -> DataResult<Counting<File>> {
        let file = File::open(path).map_err(|e| DataError::io("open", path, e))?;
        Ok(Counting { inner: file, read: bytes_read.clone() })
    };
    match format {
        InputFormat::Text => {
            let mut bytes = Vec::new();
            open()?.read_to_end(&mut bytes).map_err(|e| DataError::io("read", path, e))?;
            let text =
                String::from_utf8(bytes).map_err(|e| DataError::NotUtf8 { path: path.to_owned(), offset: e.utf8_error().valid_up_to() })?;
            visit(Record::Document { text, line: 1 })
        }
        InputFormat::Jsonl => read_jsonl(path, BufReader::with_capacity(1 << 20, open()?), text_field, visit),
        InputFormat::JsonlGz => {
            let decoder = flate2::read::MultiGzDecoder::new(BufReader::with_capacity(1 << 20, open()?));
            read_jsonl(path, BufReader::with_capacity(1 << 20, decoder), text_field, visit)
        }
        InputFormat::JsonlZst => {
            let decoder = zstd::stream::read::Decoder::new(open()?).map_err(|e| DataError::io("start decompressing", path, e))?;
            read_jsonl(path, BufReader::with_capacity(1 << 20, decoder), text_field, visit)
        }
        InputFormat::Parquet => {
            read_parquet(path, text_field, visit)?;
            bytes_read.fetch_add(std::fs::metadata(path).map(|m| m.len()).unwrap_or(0), Ordering::Relaxed);
            Ok(())
        }
    }
}

/// The longest JSONL line read (a larger one is a bad record, read past without holding it).
const MAX_LINE_BYTES: usize = 256 << 20;

fn read_jsonl(path: &Path, mut reader: impl BufRead, text_field: &str, visit: &mut dyn FnMut(Record) -> DataResult<()>) -> DataResult<()> {
    let mut line = Vec::new();
    let mut number = 0u64;
    loop {
        line.clear();
        let n = read_line_bounded(&mut reader, &mut line).map_err(|e| DataError::io("read", path, e))?;
        if n == 0 {
            return Ok(());
        }
        number += 1;
        if n > MAX_LINE_BYTES {
            visit(Record::Bad { line: number, reason: format!("the line is {n} bytes, over the limit of {MAX_LINE_BYTES}") })?;
            continue;
        }
        let trimmed = line.trim_ascii();
        if trimmed.is_empty() {
            continue;
        }
        visit(parse_json_line(trimmed, text_field, number))?;
    }
}

/// Reads one line (without its `\n`) into `out`, keeping at most `MAX_LINE_BYTES + 1` bytes of
/// it; returns the line's full length including the newline (0 at the end of the file).
fn read_line_bounded(reader: &mut impl BufRead, out: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut total = 0;
    loop {
        let available = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(total);
        }
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], Some(i + 1)),
            None => (available, None),
        };
        if out.len() <= MAX_LINE_BYTES {
            let room = MAX_LINE_BYTES + 1 - out.len();
            out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        let used = done.unwrap_or(available.len());
        total += used;
        reader.consume(used);
        if done.is_some() {
            return Ok(total);
        }
    }
}

fn parse_json_line(line: &[u8], text_field: &str, number: u64) -> Record {
    let bad = |reason: String| Record::Bad { line: number, reason };
    let value: serde_json::Value = match serde_json::from_slice(line) {
        Ok(value) => value,
        Err(e) => return bad(format!("not JSON: {e}")),
    };
    match value.get(text_field) {
        Some(serde_json::Value::String(_)) => {}
        Some(other) => return bad(format!("field {text_field:?} is not a string but {}", json_kind(other))),
        None if value.is_object() => return bad(format!("no field {text_field:?} (use --text-field to name the one with the text)")),
        None => return bad(format!("not a JSON object but {}", json_kind(&value))),
    }
    match value {
        serde_json::Value::Object(mut map) => match map.remove(text_field) {
            Some(serde_json::Value::String(text)) => Record::Document { text, line: number },
            _ => bad(format!("no string field {text_field:?}")),
        },
        _ => bad("not a JSON object".into()),
    }
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Reads the `text_field` column of a Parquet file, row group by row group; each row is a
/// document (its number counts from 1, as a line would).
fn read_parquet(path: &Path, text_field: &str, visit: &mut dyn FnMut(Record) -> DataResult<()>) -> DataResult<()> {
    use parquet::basic::Type as PhysicalType;
    use parquet::column::reader::ColumnReader;
    use parquet::file::reader::{FileReader, SerializedFileReader};

    let bad_file = |reason: String| DataError::BadInput { path: path.to_owned(), reason };
    let file = File::open(path).map_err(|e| DataError::io("open", path, e))?;
    let reader = SerializedFileReader::new(file).map_err(|e| bad_file(format!("not a readable Parquet file: {e}")))?;
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let column = (0..schema.num_columns()).find(|&i| schema.column(i).path().string() == text_field).ok_or_else(|| {
        let names: Vec<String> = (0..schema.num_columns()).map(|i| schema.column(i).path().string()).collect();
        bad_file(format!("it has no column {text_field:?} (its columns: {}); use --text-field to name one", names.join(", ")))
    })?;
    if schema.column(column).physical_type() != PhysicalType::BYTE_ARRAY {
        return Err(bad_file(format!("column {text_field:?} holds {:?}, not text", schema.column(column).physical_type())));
    }
    let nullable = schema.column(column).max_def_level() > 0;
    let mut row = 0u64;
    const BATCH: usize = 1024;
    for group in 0..reader.num_row_groups() {
        let group_reader = reader.get_row_group(group).map_err(|e| bad_file(format!("row group {group}: {e}")))?;
        let rows_in_group = group_reader.metadata().num_rows().max(0) as usize;
        let ColumnReader::ByteArrayColumnReader(mut values) =
            group_reader.get_column_reader(column).map_err(|e| bad_file(format!("row group {group}: {e}")))?
        else {
            return Err(bad_file(format!("column {text_field:?} is not a byte array column")));
        };
        let mut read_rows = 0usize;
        while read_rows < rows_in_group {
            let mut texts = Vec::with_capacity(BATCH);
            let mut def_levels = Vec::with_capacity(BATCH);
            let (records, value_count, _) = values
                .read_records(BATCH, if nullable { Some(&mut def_levels) } else { None }, None, &mut texts)
                .map_err(|e| bad_file(format!("row group {group}: {e}")))?;
            if records == 0 {
                break;
            }
            let mut next_value = 0;
            for i in 0..records {
                row += 1;
                let present = !nullable || def_levels.get(i).is_some_and(|&d| d > 0);
                if !present || next_value >= value_count {
                    visit(Record::Bad { line: row, reason: format!("column {text_field:?} is null") })?;
                    continue;
                }
                let bytes = texts[next_value].data().to_vec();
                next_value += 1;
                match String::from_utf8(bytes) {
                    Ok(text) => visit(Record::Document { text, line: row })?,
                    Err(e) => {
                        visit(Record::Bad { line: row, reason: format!("not UTF-8 (first bad byte at {})", e.utf8_error().valid_up_to()) })?
                    }
                }
            }
            read_rows += records;
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::data::corpus::tests::scratch_dir;

    fn records(path: &Path, format: InputFormat) -> DataResult<Vec<Record>> {
        let mut out = Vec::new();
        read_records(path, format, "text", &Arc::new(AtomicU64::new(0)), &mut |r| {
            out.push(r);
            Ok(())
        })?;
        Ok(out)
    }

    /// A Parquet file with one optional text column `column`, written with the parquet crate.
    pub(crate) fn write_parquet(path: &Path, column: &str, texts: &[Option<&str>]) {
        use parquet::data_type::{ByteArray, ByteArrayType};
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        let schema = parquet::schema::parser::parse_message_type(&format!("message doc {{ optional binary {column} (UTF8); }}")).unwrap();
        let file = File::create(path).unwrap();
        let mut writer = SerializedFileWriter::new(file, Arc::new(schema), Arc::new(WriterProperties::builder().build())).unwrap();
        // Two row groups, so that reading goes over a boundary.
        for part in texts.chunks(texts.len().div_ceil(2).max(1)) {
            let mut group = writer.next_row_group().unwrap();
            let mut col = group.next_column().unwrap().unwrap();
            let values: Vec<ByteArray> = part.iter().flatten().map(|t| ByteArray::from(*t)).collect();
            let defs: Vec<i16> = part.iter().map(|t| i16::from(t.is_some())).collect();
            col.typed::<ByteArrayType>().write_batch(&values, Some(&defs), None).unwrap();
            col.close().unwrap();
            group.close().unwrap();
        }
        writer.close().unwrap();
    }

    #[test]
    fn formats_come_from_file_names() {
        for (name, want) in [
            ("a.jsonl", Some(InputFormat::Jsonl)),
            ("a.JSONL.gz", Some(InputFormat::JsonlGz)),
            ("b.jsonl.zst", Some(InputFormat::JsonlZst)),
            ("c.parquet", Some(InputFormat::Parquet)),
            ("d.txt", Some(InputFormat::Text)),
            ("README", Some(InputFormat::Text)),
            ("e.csv", None),
            ("f.json", None),
        ] {
            assert_eq!(InputFormat::of(Path::new(name)), want, "{name}");
        }
    }

    #[test]
    fn jsonl_lines_become_documents_and_bad_lines_are_named() -> DataResult<()> {
        let dir = scratch_dir("sources-jsonl");
        let text = "{\"text\": \"first\", \"id\": 1}\n\nnot json\n{\"body\": \"x\"}\n{\"text\": 5}\n[1]\n{\"text\": \"last\"}";
        let plain = dir.join("a.jsonl");
        std::fs::write(&plain, text).unwrap();
        let gz = dir.join("a.jsonl.gz");
        let mut enc = flate2::write::GzEncoder::new(File::create(&gz).unwrap(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, text.as_bytes()).unwrap();
        enc.finish().unwrap();
        let zst = dir.join("a.jsonl.zst");
        std::fs::write(&zst, zstd::encode_all(text.as_bytes(), 3).unwrap()).unwrap();
        for (path, format) in [(&plain, InputFormat::Jsonl), (&gz, InputFormat::JsonlGz), (&zst, InputFormat::JsonlZst)] {
            let got = records(path, format)?;
            let docs: Vec<(&str, u64)> = got
                .iter()
                .filter_map(|r| match r {
                    Record::Document { text, line } => Some((text.as_str(), *line)),
                    _ => None,
                })
                .collect();
            assert_eq!(docs, vec![("first", 1), ("last", 7)], "{format:?}");
            let bad: Vec<(u64, &str)> = got
                .iter()
                .filter_map(|r| match r {
                    Record::Bad { line, reason } => Some((*line, reason.as_str())),
                    _ => None,
                })
                .collect();
            assert_eq!(bad.iter().map(|b| b.0).collect::<Vec<_>>(), vec![3, 4, 5, 6], "{format:?}: {bad:?}");
            assert!(bad[0].1.starts_with("not JSON"), "{bad:?}");
            assert!(bad[1].1.contains("no field \"text\"") && bad[1].1.contains("--text-field"), "{bad:?}");
            assert!(bad[2].1.contains("not a string but a number"), "{bad:?}");
            assert!(bad[3].1.contains("not a JSON object but an array"), "{bad:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn parquet_rows_become_documents_nulls_are_bad_and_a_missing_column_is_named() -> DataResult<()> {
        let dir = scratch_dir("sources-parquet");
        let path = dir.join("docs.parquet");
        write_parquet(&path, "text", &[Some("one"), None, Some("three"), Some("four"), Some("five")]);
        let got = records(&path, InputFormat::Parquet)?;
        let docs: Vec<(String, u64)> = got
            .iter()
            .filter_map(|r| match r {
                Record::Document { text, line } => Some((text.clone(), *line)),
                _ => None,
            })
            .collect();
        assert_eq!(docs, vec![("one".into(), 1), ("three".into(), 3), ("four".into(), 4), ("five".into(), 5)]);
        assert!(matches!(&got[1], Record::Bad { line: 2, reason } if reason.contains("null")), "{got:?}");

        let other = dir.join("other.parquet");
        write_parquet(&other, "content", &[Some("x")]);
        let err = records(&other, InputFormat::Parquet).unwrap_err().to_string();
        assert!(err.contains("other.parquet") && err.contains("no column \"text\"") && err.contains("content"), "{err}");
        std::fs::write(dir.join("broken.parquet"), b"PAR1 not really").unwrap();
        let err = records(&dir.join("broken.parquet"), InputFormat::Parquet).unwrap_err().to_string();
        assert!(err.contains("broken.parquet") && err.contains("not a readable Parquet file"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn a_file_of_unknown_format_named_directly_is_refused_by_name() {
        let dir = scratch_dir("sources-unknown");
        let csv = dir.join("data.csv");
        std::fs::write(&csv, "a,b").unwrap();
        std::fs::write(dir.join("doc.txt"), "text").unwrap();
        let err = source_files(std::slice::from_ref(&csv), None).unwrap_err().to_string();
        assert!(err.contains("data.csv") && err.contains(".jsonl"), "{err}");
        // In a folder it is skipped.
        let files = source_files(std::slice::from_ref(&dir), None).unwrap();
        assert_eq!(files, vec![(dir.join("doc.txt"), InputFormat::Text)]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
