//! Cedar's diagnostics as text that points at the source: `file:line:col: message`, plus help
//! and related diagnostics, so a broken policy file can be fixed from the log alone.

use std::path::Path;

use cedar_policy::ffi::DetailedError;

/// Cedar's message for an error, with its causes and help.
pub(super) fn detailed<E: std::error::Error + ?Sized>(err: &E) -> String
where
    for<'a> DetailedError: From<&'a E>,
{
    render(None, None, &DetailedError::from(err))
}

/// Renders a Cedar diagnostic as `file:line:col: message` (plus help and
/// related diagnostics). `src` is the text the spans point into.
pub(super) fn render(path: Option<&Path>, src: Option<&str>, err: &DetailedError) -> String {
    let mut out = String::new();
    if let Some(path) = path {
        out.push_str(&path.display().to_string());
        if let (Some(src), Some(label)) = (src, err.source_locations.first()) {
            let (line, col) = line_col(src, label.loc.start);
            out.push_str(&format!(":{line}:{col}"));
        }
        out.push_str(": ");
    }
    out.push_str(&err.message);
    if let Some(src) = src {
        if let Some(label) = err.source_locations.first() {
            let start = label.loc.start.min(src.len());
            let end = label.loc.end.clamp(start, src.len());
            let snippet = src.get(start..end).unwrap_or("").trim();
            if !snippet.is_empty() {
                let first_line = snippet.lines().next().unwrap_or("");
                out.push_str(&format!("\n    at: {first_line}"));
                if let Some(text) = &label.label {
                    out.push_str(&format!(" ({text})"));
                }
            }
        }
    }
    if let Some(help) = &err.help {
        out.push_str(&format!("\n    help: {help}"));
    }
    for related in &err.related {
        out.push('\n');
        out.push_str(&render(path, src, related));
    }
    out
}

/// 1-based line and column of byte `offset` in `src`.
pub(super) fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(src.len());
    while !src.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(before.chars().count(), |nl| {
        before[nl + 1..].chars().count()
    }) + 1;
    (line, col)
}
