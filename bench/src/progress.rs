//! Progress that stays visible in logs.
//!
//! indicatif draws nothing when stderr is not a terminal, which is how the bench runs on a lent
//! GPU machine (output redirected to a file): a run cut off by a time limit then leaves no trace
//! of where the time went. Without a terminal every message is also written as a plain,
//! timestamped line.

use std::{
    io::{IsTerminal, stderr},
    time::Instant,
};

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    bar: ProgressBar,
    start: Instant,
    lines: bool,
}

impl Progress {
    /// A bar of `len` steps, or a spinner when `len` is `None`.
    pub fn new(len: Option<u64>) -> Self {
        let style = ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
        )
        .expect("valid template");
        let bar = match len {
            Some(n) => ProgressBar::new(n),
            None => ProgressBar::new_spinner(),
        }
        .with_style(style);
        Self {
            bar,
            start: Instant::now(),
            lines: !stderr().is_terminal(),
        }
    }

    fn line(&self, msg: &str) {
        if self.lines {
            let pos = match self.bar.length() {
                Some(len) => format!(" {}/{len}", self.bar.position()),
                None => String::new(),
            };
            eprintln!("[{:8.1}s{pos}] {msg}", self.start.elapsed().as_secs_f64());
        }
    }

    pub fn set_message(&self, msg: impl Into<String>) {
        let msg = msg.into();
        self.line(&msg);
        self.bar.set_message(msg);
    }

    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
    }

    pub fn finish_with_message(&self, msg: impl Into<String>) {
        let msg = msg.into();
        self.line(&msg);
        self.bar.finish_with_message(msg);
    }
}
