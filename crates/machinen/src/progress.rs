//! Progress reporting for long work: a bar or spinner on a terminal, silence
//! when stderr is piped or the caller asked for quiet/JSON output.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Whether to draw progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProgressMode {
    /// Draw when stderr is a terminal.
    #[default]
    Auto,
    /// Never draw.
    Quiet,
}

impl ProgressMode {
    fn enabled(self) -> bool {
        self == ProgressMode::Auto && std::io::stderr().is_terminal()
    }

    /// A spinner with a message; finish it with [`Step::done`].
    pub fn step(self, msg: impl Into<String>) -> Step {
        let msg = msg.into();
        if !self.enabled() {
            tracing::info!("{msg}");
            return Step { bar: None };
        }
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_message(msg);
        bar.enable_steady_tick(Duration::from_millis(120));
        Step { bar: Some(bar) }
    }
}

/// One step of long work.
pub struct Step {
    bar: Option<ProgressBar>,
}

impl Step {
    /// Replace the step's message.
    pub fn message(&self, msg: impl Into<String>) {
        if let Some(b) = &self.bar {
            b.set_message(msg.into());
        }
    }

    /// Finish the step, leaving a final line on the terminal.
    pub fn done(mut self, msg: impl Into<String>) {
        let msg = msg.into();
        match self.bar.take() {
            Some(b) => b.finish_with_message(msg),
            None => tracing::info!("{msg}"),
        }
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            if !b.is_finished() {
                b.finish_and_clear();
            }
        }
    }
}
