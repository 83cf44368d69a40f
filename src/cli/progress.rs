//! Live progress for long operations: a spinner showing the current step, and with
//! `--verbose` every output line above it.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use conductor_core::engine::{Progress, ProgressSink};
use indicatif::{ProgressBar, ProgressStyle};

/// A spinner for one long operation, with a sink the service reports into. When stderr is
/// not a terminal (CI logs), steps and results are printed as plain lines instead.
pub struct Spinner {
    pub bar: ProgressBar,
    prefix: String,
    plain: bool,
}

impl Spinner {
    pub fn new(prefix: &str) -> Self {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed:>3}] {prefix:.bold} {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_prefix(prefix.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        let plain = !std::io::stderr().is_terminal();
        Spinner {
            bar,
            prefix: prefix.to_string(),
            plain,
        }
    }

    pub fn sink(&self, verbose: bool) -> ProgressSink {
        let bar = self.bar.clone();
        let (plain, prefix) = (self.plain, self.prefix.clone());
        Arc::new(move |p: Progress| match p {
            Progress::Step { index, total, text } if plain => eprintln!("{prefix}: step {index}/{total}: {text}"),
            Progress::Step { index, total, text } => bar.set_message(format!("step {index}/{total}: {text}")),
            Progress::Line(line) if plain => {
                if verbose || line.starts_with("STEP ") {
                    eprintln!("{prefix}: {line}");
                }
            }
            Progress::Line(line) => {
                if verbose {
                    bar.println(format!("  {line}"));
                } else if let Some(step) = line.strip_prefix("STEP ") {
                    bar.set_message(format!("step {step}"));
                }
            }
        })
    }

    pub fn finish(&self, message: String) {
        if self.plain {
            eprintln!("{}: {message}", self.prefix);
        }
        self.bar.finish_with_message(message);
    }
}
