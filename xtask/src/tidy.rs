//! `cargo xtask tidy`: source hygiene checks that rustc and clippy don't do.
//!
//! - every `.rs` file under `crates/`, `tests/src` and `xtask/src` starts (after blank
//!   lines) with a `//!` module doc comment;
//! - no `.rs` file under `crates/` contains an ignored test or a todo/unimplemented macro.
//!
//! Also runs as a `#[test]`, so `cargo test` catches the same problems.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Directories (relative to the root) whose `.rs` files need a `//!` module doc.
const DOC_DIRS: &[&str] = &["crates", "tests/src", "xtask/src"];
/// Directory (relative to the root) in which [`FORBIDDEN_MARKERS`] may not appear.
const MARKER_DIR: &str = "crates";
/// `#[ignore` also catches `#[ignore = "reason"]`.
const FORBIDDEN_MARKERS: &[&str] = &["#[ignore", "todo!(", "unimplemented!("];

/// Runs the checks and fails listing every offending file.
pub(crate) fn run(root: &Path) -> Result<()> {
    let problems = check(root)?;
    if !problems.is_empty() {
        bail!(
            "tidy: {} problem(s):\n  {}",
            problems.len(),
            problems.join("\n  ")
        );
    }
    println!("tidy: ok");
    Ok(())
}

/// Returns one message per problem, with paths relative to `root`.
pub(crate) fn check(root: &Path) -> Result<Vec<String>> {
    let mut problems = Vec::new();

    for dir in DOC_DIRS {
        for file in rust_files(&root.join(dir))? {
            let text = read(&file)?;
            if !starts_with_module_doc(&text) {
                problems.push(format!(
                    "{}: missing `//!` module doc comment at the top",
                    relative(root, &file)
                ));
            }
        }
    }

    for file in rust_files(&root.join(MARKER_DIR))? {
        let text = read(&file)?;
        for marker in FORBIDDEN_MARKERS {
            if text.contains(marker) {
                problems.push(format!(
                    "{}: contains `{marker}` (see STYLE.md, TESTING)",
                    relative(root, &file)
                ));
            }
        }
    }
    Ok(problems)
}

fn starts_with_module_doc(text: &str) -> bool {
    text.lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .is_some_and(|line| line.starts_with("//!"))
}

/// All `.rs` files below `dir`, sorted; skips `target` and hidden directories.
/// A missing `dir` has no files.
fn rust_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    if dir.is_dir() {
        collect_rust_files(dir, &mut files)?;
    }
    files.sort();
    Ok(files)
}

fn collect_rust_files(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    let entries = fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let file_type = entry
            .file_type()
            .with_context(|| format!("reading {}", path.display()))?;
        if file_type.is_dir() {
            if name != "target" && !name.starts_with('.') {
                collect_rust_files(&path, files)?;
            }
        } else if file_type.is_file() && name.ends_with(".rs") {
            files.push(path);
        }
    }
    Ok(())
}

fn read(file: &Path) -> Result<String> {
    fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))
}

fn relative(root: &Path, file: &Path) -> String {
    file.strip_prefix(root)
        .unwrap_or(file)
        .display()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_is_tidy() {
        let root = crate::project_root().unwrap();
        let problems = check(&root).unwrap();
        assert!(
            problems.is_empty(),
            "tidy problems:\n{}",
            problems.join("\n")
        );
    }

    #[test]
    fn module_doc_may_follow_blank_lines_only() {
        assert!(starts_with_module_doc("\n\n//! Docs.\nfn f() {}\n"));
        assert!(!starts_with_module_doc("// Not a doc.\n//! Docs.\n"));
        assert!(!starts_with_module_doc("fn f() {}\n"));
        assert!(!starts_with_module_doc(""));
    }
}
