//! Live progress for long operations: a spinner showing the current step, and with
//! `--verbose` every output line above it. Batch builds get one spinner per running build
//! and an overall line (`images 3/7 done`) below them ([`Board`]).
//!
//! When stderr is not a terminal (CI logs) the same information is printed as plain lines,
//! each prefixed with the image it belongs to, so concurrent builds stay readable.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use conductor_core::engine::{Progress, ProgressSink};
use conductor_service::images::BatchProgress;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// What one progress event shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Shown {
    Nothing,
    /// Replaces the spinner's message (terminal only).
    Message(String),
    /// A line of its own: above the spinner on a terminal, a plain line otherwise.
    Line(String),
}

/// Whether `line` is the build's own echo of `step` ("STEP 3/11: RUN …" right after the
/// step was reported).
fn echoes(line: &str, step: Option<&(u32, u32, String)>) -> bool {
    step.is_some_and(|(index, total, text)| line == format!("STEP {index}/{total}: {text}"))
}

/// Decides what an event shows. `last_step` is the step reported last (the engine reports
/// each step, then passes on the build's own "STEP …" line, which is not shown again).
/// Plain: steps always, other output with `verbose` (a "STEP" line nobody parsed also
/// without). Terminal: steps in the spinner's message, output above it with `verbose`.
pub(crate) fn shown(event: &Progress, verbose: bool, plain: bool, last_step: Option<&(u32, u32, String)>) -> Shown {
    match event {
        Progress::Step { index, total, text } if plain => Shown::Line(format!("step {index}/{total}: {text}")),
        Progress::Step { index, total, text } => Shown::Message(format!("step {index}/{total}: {text}")),
        Progress::Line(line) if plain && echoes(line, last_step) => Shown::Nothing,
        Progress::Line(line) if plain && (verbose || line.starts_with("STEP ")) => Shown::Line(line.clone()),
        Progress::Line(line) if !plain && verbose => Shown::Line(format!("  {line}")),
        Progress::Line(line) if !plain && !echoes(line, last_step) => match line.strip_prefix("STEP ") {
            Some(step) => Shown::Message(format!("step {step}")),
            None => Shown::Nothing,
        },
        Progress::Line(_) => Shown::Nothing,
    }
}

fn plain() -> bool {
    !std::io::stderr().is_terminal()
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} [{elapsed:>3}] {prefix:.bold} {wide_msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

/// A spinner for one long operation, with a sink the service reports into. When stderr is
/// not a terminal (CI logs), steps and results are printed as plain lines instead.
pub struct Spinner {
    pub bar: ProgressBar,
    prefix: String,
    plain: bool,
}

impl Spinner {
    pub fn new(prefix: &str) -> Self {
        Self::with_bar(ProgressBar::new_spinner(), prefix, prefix, plain())
    }

    fn with_bar(bar: ProgressBar, prefix: &str, shown_prefix: &str, plain: bool) -> Self {
        bar.set_style(spinner_style());
        bar.set_prefix(shown_prefix.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        Spinner {
            bar,
            prefix: prefix.to_string(),
            plain,
        }
    }

    pub fn sink(&self, verbose: bool) -> ProgressSink {
        let bar = self.bar.clone();
        let (plain, prefix) = (self.plain, self.prefix.clone());
        let last_step: Mutex<Option<(u32, u32, String)>> = Mutex::new(None);
        Arc::new(move |p: Progress| {
            let Ok(mut last) = last_step.lock() else { return };
            match shown(&p, verbose, plain, last.as_ref()) {
                Shown::Nothing => {}
                Shown::Message(m) => bar.set_message(m),
                Shown::Line(l) if plain => eprintln!("{prefix}: {l}"),
                Shown::Line(l) => bar.println(l),
            }
            if let Progress::Step { index, total, text } = p {
                *last = Some((index, total, text));
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

/// "1m 05s", "42s".
fn duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// The overall line of a batch build: "images: 3/7 done, 1 failed, 2m 05s; building
/// fullstack, python-ml" (without the time when `elapsed` is `None`: a terminal shows it
/// ticking).
pub(crate) fn overall_line(progress: BatchProgress, elapsed: Option<Duration>, running: &[String]) -> String {
    let BatchProgress { done, failed, total } = progress;
    let mut line = format!("images: {done}/{total} done");
    if failed > 0 {
        line.push_str(&format!(", {failed} failed"));
    }
    if let Some(elapsed) = elapsed {
        line.push_str(&format!(", {}", duration(elapsed)));
    }
    if !running.is_empty() {
        line.push_str(&format!("; building {}", running.join(", ")));
    }
    line
}

/// Progress of a batch of builds: one spinner per running build, the overall line below.
pub struct Board {
    multi: MultiProgress,
    overall: ProgressBar,
    plain: bool,
    started: Instant,
    width: usize,
}

impl Board {
    /// A board for `total` builds whose names are at most `width` characters.
    pub fn new(total: usize, width: usize) -> Self {
        let plain = plain();
        let multi = if plain {
            MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
        } else {
            MultiProgress::new()
        };
        let overall = multi.add(ProgressBar::new(total as u64));
        overall.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed:>3}] {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        overall.enable_steady_tick(Duration::from_millis(120));
        Board {
            multi,
            overall,
            plain,
            started: Instant::now(),
            width,
        }
    }

    /// A spinner for one build, above the overall line.
    pub fn spinner(&self, name: &str) -> Spinner {
        let bar = self.multi.insert_before(&self.overall, ProgressBar::new_spinner());
        Spinner::with_bar(bar, name, &format!("{name:<width$}", width = self.width), self.plain)
    }

    /// Shows the overall state; printed as a line of its own when not on a terminal.
    pub fn update(&self, progress: BatchProgress, running: &[String]) {
        self.overall.set_position((progress.done + progress.failed) as u64);
        if self.plain {
            eprintln!("{}", overall_line(progress, Some(self.started.elapsed()), running));
        } else {
            self.overall.set_message(overall_line(progress, None, running));
        }
    }

    /// Prints a line above the spinners (a plain line when not on a terminal).
    pub fn println(&self, line: String) {
        if self.plain {
            eprintln!("{line}");
        } else {
            let _ = self.multi.println(line);
        }
    }

    /// Ends the overall line with its final state.
    pub fn finish(&self, progress: BatchProgress) {
        let line = overall_line(progress, Some(self.started.elapsed()), &[]);
        if self.plain {
            eprintln!("{line}");
        }
        self.overall.set_position((progress.done + progress.failed) as u64);
        self.overall
            .set_style(ProgressStyle::with_template("{msg}").unwrap_or_else(|_| ProgressStyle::default_bar()));
        self.overall.finish_with_message(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds events through [`shown`] as a sink does.
    fn render(events: &[Progress], verbose: bool, plain: bool) -> Vec<Shown> {
        let mut last = None;
        let mut out = Vec::new();
        for e in events {
            let s = shown(e, verbose, plain, last.as_ref());
            if s != Shown::Nothing {
                out.push(s);
            }
            if let Progress::Step { index, total, text } = e {
                last = Some((*index, *total, text.clone()));
            }
        }
        out
    }

    /// What an image build reports: each step, then the build's own line for it.
    fn build_events() -> Vec<Progress> {
        vec![
            Progress::Step {
                index: 3,
                total: 11,
                text: "RUN apt-get update".into(),
            },
            Progress::Line("STEP 3/11: RUN apt-get update".into()),
            Progress::Line("Get:1 http://deb.debian.org/debian bookworm InRelease".into()),
            Progress::Step {
                index: 4,
                total: 11,
                text: "WORKDIR /workspace".into(),
            },
            Progress::Line("STEP 4/11: WORKDIR /workspace".into()),
        ]
    }

    #[test]
    fn plain_output_shows_each_step_once() {
        assert_eq!(
            render(&build_events(), false, true),
            vec![
                Shown::Line("step 3/11: RUN apt-get update".into()),
                Shown::Line("step 4/11: WORKDIR /workspace".into()),
            ]
        );
        assert_eq!(
            render(&build_events(), true, true),
            vec![
                Shown::Line("step 3/11: RUN apt-get update".into()),
                Shown::Line("Get:1 http://deb.debian.org/debian bookworm InRelease".into()),
                Shown::Line("step 4/11: WORKDIR /workspace".into()),
            ],
            "verbose adds the output, not the step again"
        );
    }

    #[test]
    fn a_step_line_nobody_parsed_is_still_shown() {
        let events = [Progress::Line("STEP 1/2: FROM x".into())];
        assert_eq!(
            render(&events, false, true),
            vec![Shown::Line("STEP 1/2: FROM x".into())]
        );
        assert_eq!(
            render(&events, false, false),
            vec![Shown::Message("step 1/2: FROM x".into())]
        );
    }

    #[test]
    fn terminal_output_keeps_steps_in_the_message() {
        assert_eq!(
            render(&build_events(), false, false),
            vec![
                Shown::Message("step 3/11: RUN apt-get update".into()),
                Shown::Message("step 4/11: WORKDIR /workspace".into()),
            ]
        );
        let verbose = render(&build_events(), true, false);
        assert_eq!(
            verbose.len(),
            5,
            "the raw output, steps included, above the spinner: {verbose:?}"
        );
        assert_eq!(verbose[1], Shown::Line("  STEP 3/11: RUN apt-get update".into()));
    }

    #[test]
    fn the_overall_line_counts_and_names_the_running_builds() {
        let progress = |done, failed, total| BatchProgress { done, failed, total };
        assert_eq!(
            overall_line(
                progress(3, 0, 7),
                Some(Duration::from_secs(125)),
                &["fullstack".into(), "python-ml".into()]
            ),
            "images: 3/7 done, 2m 05s; building fullstack, python-ml"
        );
        assert_eq!(
            overall_line(progress(6, 1, 7), Some(Duration::from_secs(42)), &[]),
            "images: 6/7 done, 1 failed, 42s"
        );
        assert_eq!(
            overall_line(progress(0, 0, 2), None, &["base".into()]),
            "images: 0/2 done; building base"
        );
    }
}
