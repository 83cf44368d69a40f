//! File tools on top of exec: path checks, the shell scripts that read, write and list
//! files inside a workspace, and the parsing of what they print.
//!
//! Files are reached through the workspace's own shell, as the workspace user, so they
//! obey the container's permissions and need no host access to the volume. The path goes
//! to the script in an environment variable, never into the command text, so no quoting
//! can break out of it; file content travels on stdin (write) and stdout (read) as raw
//! bytes. Paths are limited to `/workspace` and `/tmp`: the places an agent works in.

use conductor_core::validate;

/// Directories the file tools may touch (with everything under them).
pub const ROOTS: [&str; 2] = ["/workspace", "/tmp"];
/// The environment variable the scripts read the path from.
pub const PATH_VAR: &str = "MCP_PATH";
/// Most bytes `read_file` returns.
pub const READ_LIMIT: usize = 256 * 1024;
/// Most bytes `write_file` accepts.
pub const WRITE_LIMIT: usize = 10 * 1024 * 1024;
/// Most entries `list_files` returns.
pub const LIST_LIMIT: usize = 1000;
/// Deepest `list_files` descends.
pub const MAX_DEPTH: u32 = 10;

/// Exit codes the scripts use for their own checks.
pub const EXIT_MISSING: i64 = 3;
pub const EXIT_WRONG_KIND: i64 = 4;

/// Checks a path given to a file tool: absolute, under `/workspace` or `/tmp`, no NUL,
/// no `..` component.
pub fn check_path(path: &str) -> Result<(), String> {
    validate::container_path(path).map_err(|m| format!("invalid path: {m}"))?;
    let inside = ROOTS
        .iter()
        .any(|root| path == *root || path.strip_prefix(root).is_some_and(|rest| rest.starts_with('/')));
    if !inside {
        return Err(format!(
            "invalid path {path:?}: file tools work under /workspace and /tmp only (absolute paths, e.g. /workspace/src/main.py)"
        ));
    }
    Ok(())
}

/// Prints the file's size on the first line, then at most [`READ_LIMIT`] bytes of it.
pub fn read_script() -> String {
    format!(
        r#"P="${PATH_VAR}"
if [ ! -e "$P" ]; then echo "no such file: $P" >&2; exit {EXIT_MISSING}; fi
if [ -d "$P" ]; then echo "$P is a directory; use list_files" >&2; exit {EXIT_WRONG_KIND}; fi
size=$(wc -c < "$P") || exit 1
echo $size
head -c {READ_LIMIT} -- "$P""#
    )
}

/// Splits the output of [`read_script`] into the file's size and its (first) bytes.
pub fn parse_read(out: &[u8]) -> Result<(u64, &[u8]), String> {
    let nl = out
        .iter()
        .position(|b| *b == b'\n')
        .ok_or("the workspace did not report the file size")?;
    let size = std::str::from_utf8(&out[..nl])
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .ok_or("the workspace reported an unreadable file size")?;
    Ok((size, &out[nl + 1..]))
}

/// Writes stdin to the file, creating missing parent directories.
pub fn write_script() -> String {
    format!(
        r#"P="${PATH_VAR}"
if [ -d "$P" ]; then echo "$P is a directory" >&2; exit {EXIT_WRONG_KIND}; fi
mkdir -p -- "$(dirname -- "$P")" && cat > "$P""#
    )
}

/// Prints up to [`LIST_LIMIT`] + 1 entries under the directory, `depth` levels deep, as
/// NUL-separated (type, size, relative path, link target) records.
pub fn list_script(depth: u32) -> String {
    let fields = 4 * (LIST_LIMIT + 1);
    format!(
        r#"P="${PATH_VAR}"
if [ ! -e "$P" ]; then echo "no such directory: $P" >&2; exit {EXIT_MISSING}; fi
if [ ! -d "$P" ]; then echo "$P is not a directory; use read_file" >&2; exit {EXIT_WRONG_KIND}; fi
find "$P" -mindepth 1 -maxdepth {depth} -printf '%y\0%s\0%P\0%l\0' | head -z -n {fields}"#
    )
}

/// One entry found by [`list_script`].
#[derive(Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: char,
    pub size: u64,
    pub path: String,
    pub target: String,
}

/// Parses the records of [`list_script`], sorted by path.
pub fn parse_list(out: &[u8]) -> Vec<Entry> {
    let fields: Vec<String> = out
        .split(|b| *b == 0)
        .map(|f| String::from_utf8_lossy(f).into_owned())
        .collect();
    let mut entries: Vec<Entry> = fields
        .chunks_exact(4)
        .map(|f| Entry {
            kind: f[0].chars().next().unwrap_or('?'),
            size: f[1].parse().unwrap_or(0),
            path: f[2].clone(),
            target: f[3].clone(),
        })
        .collect();
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    entries
}

/// The listing as a model reads it: one entry per line, directories with a trailing `/`.
pub fn render_list(dir: &str, depth: u32, mut entries: Vec<Entry>) -> String {
    let more = entries.len() > LIST_LIMIT;
    entries.truncate(LIST_LIMIT);
    let mut out = format!(
        "{dir} (depth {depth}): {} entr{}{}\n",
        entries.len(),
        if entries.len() == 1 { "y" } else { "ies" },
        if more { " shown, more exist" } else { "" }
    );
    for e in &entries {
        let line = match e.kind {
            'd' => format!("dir  {:>10}  {}/", "", e.path),
            'f' => format!("file {:>10}  {}", e.size, e.path),
            'l' => format!("link {:>10}  {} -> {}", "", e.path, e.target),
            other => format!("{other:<4} {:>10}  {}", "", e.path),
        };
        out.push_str(&line);
        out.push('\n');
    }
    if more {
        out.push_str(&format!(
            "[only the first {LIST_LIMIT} entries are shown; list a subdirectory or use a smaller depth]\n"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_be_absolute_and_under_the_roots() {
        for ok in [
            "/workspace",
            "/workspace/src/a.py",
            "/tmp",
            "/tmp/x/y",
            "/workspace/./a",
        ] {
            check_path(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, why) in [
            ("workspace/a", "absolute"),
            ("/etc/passwd", "under /workspace and /tmp"),
            ("/workspaces/a", "under /workspace and /tmp"),
            ("/tmpfoo", "under /workspace and /tmp"),
            ("/workspace/../etc/passwd", "'..'"),
            ("/tmp/a\0b", "NUL"),
            ("", "absolute"),
        ] {
            let e = check_path(bad).expect_err(bad);
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn read_output_splits_into_size_and_bytes() {
        assert_eq!(parse_read(b"5\nhello").unwrap(), (5, &b"hello"[..]));
        assert_eq!(parse_read(b"  0\n").unwrap(), (0, &b""[..]));
        assert_eq!(parse_read(b"3\na\nb").unwrap(), (3, &b"a\nb"[..]));
        assert!(parse_read(b"").unwrap_err().contains("size"));
        assert!(parse_read(b"x\n").unwrap_err().contains("size"));
    }

    #[test]
    fn listings_are_sorted_and_typed() {
        let raw = b"f\x0012\x00src/b.py\x00\x00d\x004096\x00src\x00\x00l\x007\x00lib\x00/usr/lib\x00";
        let entries = parse_list(raw);
        assert_eq!(
            entries.iter().map(|e| e.path.as_str()).collect::<Vec<_>>(),
            ["lib", "src", "src/b.py"]
        );
        let text = render_list("/workspace", 2, entries);
        assert_eq!(
            text,
            "/workspace (depth 2): 3 entries\n\
             link             lib -> /usr/lib\n\
             dir              src/\n\
             file         12  src/b.py\n"
        );
    }

    #[test]
    fn long_listings_are_cut_with_a_note() {
        let mut raw = Vec::new();
        for i in 0..=LIST_LIMIT {
            raw.extend_from_slice(format!("f\x001\x00f{i:05}\x00\x00").as_bytes());
        }
        let text = render_list("/tmp", 1, parse_list(&raw));
        assert!(
            text.starts_with("/tmp (depth 1): 1000 entries shown, more exist\n"),
            "{text}"
        );
        assert!(text.ends_with("use a smaller depth]\n"));
        assert_eq!(text.lines().count(), LIST_LIMIT + 2);
    }
}
