//! What a caller asks to run: a shell command line or an argv.
//!
//! The HTTP exec, the CLI and the MCP tool take either form. A string is a command line run
//! by the workspace's shell (`bash -c` when bash exists, else `sh -c`): pipes, `&&`, quoting
//! and `cd` work as in a terminal. An array is an argv, executed directly with no shell in
//! between, as `podman exec` and the original Python API's `command: List[str]` do.

use std::fmt;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::validate;

/// Most arguments of an argv.
pub const MAX_ARGS: usize = 4096;

/// A command to run in a workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Command {
    /// A command line for the workspace's shell.
    Shell(String),
    /// A program and its arguments, executed directly (no shell).
    Argv(Vec<String>),
}

impl Default for Command {
    fn default() -> Self {
        Command::Shell(String::new())
    }
}

impl From<&str> for Command {
    fn from(line: &str) -> Self {
        Command::Shell(line.to_string())
    }
}

impl From<String> for Command {
    fn from(line: String) -> Self {
        Command::Shell(line)
    }
}

impl From<Vec<String>> for Command {
    fn from(argv: Vec<String>) -> Self {
        Command::Argv(argv)
    }
}

impl Command {
    /// Checks the command; an error names the field at fault relative to `field`
    /// (`command`, or `command[2]` for an argv's third element).
    pub fn validate(&self, field: &str) -> Result<(), (String, String)> {
        match self {
            Command::Shell(line) => validate::command(line).map_err(|m| (field.to_string(), m)),
            Command::Argv(argv) => {
                if argv.is_empty() {
                    return Err((field.to_string(), "an argv must hold at least the program".into()));
                }
                if argv.len() > MAX_ARGS {
                    return Err((field.to_string(), format!("an argv has at most {MAX_ARGS} elements")));
                }
                if argv[0].trim().is_empty() {
                    return Err((format!("{field}[0]"), "the program must not be empty".into()));
                }
                let mut total = 0usize;
                for (i, arg) in argv.iter().enumerate() {
                    if arg.contains('\0') {
                        return Err((format!("{field}[{i}]"), "contains a NUL byte".into()));
                    }
                    total += arg.len();
                    if total > 1024 * 1024 {
                        return Err((format!("{field}[{i}]"), "the argv is longer than 1 MiB".into()));
                    }
                }
                Ok(())
            }
        }
    }

    /// The shell command line, if this is one.
    pub fn as_shell(&self) -> Option<&str> {
        match self {
            Command::Shell(line) => Some(line),
            Command::Argv(_) => None,
        }
    }

    /// A one-line rendering for logs and listings: the line itself, or the argv quoted for a
    /// POSIX shell.
    pub fn display(&self) -> String {
        match self {
            Command::Shell(line) => line.clone(),
            Command::Argv(argv) => argv.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" "),
        }
    }
}

/// Quotes `arg` for a POSIX shell when it holds anything but plain characters.
pub fn shell_quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', "'\\''"))
    }
}

/// Accepts a string or an array of strings. An element of another type is reported at its
/// index (`command[1]`) by `serde_path_to_error`, which tracks sequence positions.
impl<'de> Deserialize<'de> for Command {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Command;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a command line (string) or an argv (array of strings)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Command, E> {
                Ok(Command::Shell(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Command, E> {
                Ok(Command::Shell(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Command, A::Error> {
                let mut argv = Vec::new();
                while let Some(arg) = seq.next_element::<String>()? {
                    argv.push(arg);
                }
                Ok(Command::Argv(argv))
            }
        }
        d.deserialize_any(V)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Command, (String, String)> {
        let mut de = serde_json::Deserializer::from_str(json);
        serde_path_to_error::deserialize(&mut de).map_err(|e| (e.path().to_string(), e.inner().to_string()))
    }

    #[test]
    fn a_string_is_a_shell_line_and_an_array_an_argv() {
        assert_eq!(
            parse(r#""echo hi | wc -c""#).unwrap(),
            Command::Shell("echo hi | wc -c".into())
        );
        assert_eq!(
            parse(r#"["sh", "-c", "echo one"]"#).unwrap(),
            Command::Argv(vec!["sh".into(), "-c".into(), "echo one".into()])
        );
        assert_eq!(
            serde_json::to_string(&Command::Argv(vec!["ls".into()])).unwrap(),
            r#"["ls"]"#
        );
        assert_eq!(serde_json::to_string(&Command::from("ls -l")).unwrap(), r#""ls -l""#);
    }

    #[test]
    fn a_wrong_element_is_named_by_its_index() {
        let (path, message) = parse(r#"["ls", 3]"#).unwrap_err();
        assert_eq!(path, "[1]");
        assert!(message.contains("expected a string"), "{message}");
        let (_, message) = parse("7").unwrap_err();
        assert!(message.contains("a command line (string) or an argv"), "{message}");
        assert!(parse("null").is_err());
    }

    #[test]
    fn validation_names_the_element() {
        assert_eq!(
            Command::Argv(vec![]).validate("command").unwrap_err().0,
            "command",
            "an empty argv"
        );
        assert_eq!(
            Command::Argv(vec!["".into()]).validate("command").unwrap_err().0,
            "command[0]"
        );
        assert_eq!(
            Command::Argv(vec!["ls".into(), "a\0b".into()])
                .validate("command")
                .unwrap_err()
                .0,
            "command[1]"
        );
        Command::Argv(vec!["printf".into(), "".into()])
            .validate("command")
            .unwrap();
        assert_eq!(Command::from("  ").validate("command").unwrap_err().0, "command");
        Command::from("true").validate("command").unwrap();
    }

    #[test]
    fn argv_renders_quoted() {
        let c = Command::Argv(vec!["sh".into(), "-c".into(), "echo 'a b'".into()]);
        assert_eq!(c.display(), r#"sh -c 'echo '\''a b'\'''"#);
        assert_eq!(shell_quote(""), "''");
    }
}
