//! Progress of a training stage: an indicatif bar on a terminal, and plain log lines otherwise (a bar draws
//! nothing when stderr is a file, and long runs are usually logged to one).

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Log lines per stage when stderr is not a terminal.
const LOG_LINES: usize = 40;

pub struct Progress {
    bar: ProgressBar,
    name: &'static str,
    total: usize,
    done: usize,
    started: Instant,
}

impl Progress {
    pub fn new(name: &'static str, total: usize) -> Self {
        let style =
            ProgressStyle::with_template("{prefix:>5} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg} (eta {eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
        let bar = ProgressBar::new(total as u64).with_style(style).with_prefix(name);
        bar.enable_steady_tick(Duration::from_millis(500));
        Self { bar, name, total, done: 0, started: Instant::now() }
    }

    /// A line above the bar (or in the log).
    pub fn println(&self, line: impl AsRef<str>) {
        if self.bar.is_hidden() {
            eprintln!("{}: {}", self.name, line.as_ref());
        } else {
            self.bar.println(line.as_ref());
        }
    }

    /// One step done; `message` shows the current loss.
    pub fn step(&mut self, message: impl FnOnce() -> String) {
        self.done += 1;
        self.bar.inc(1);
        let every = (self.total / LOG_LINES).max(1);
        if self.bar.is_hidden() {
            if self.done.is_multiple_of(every) || self.done == self.total {
                let seconds = self.started.elapsed().as_secs_f64();
                let left = seconds / self.done as f64 * (self.total - self.done) as f64;
                eprintln!(
                    "{}: step {}/{} {} ({:.2} s/step, {:.0} s elapsed, {:.0} s left)",
                    self.name,
                    self.done,
                    self.total,
                    message(),
                    seconds / self.done as f64,
                    seconds,
                    left
                );
            }
        } else if self.done.is_multiple_of(5) || self.done == self.total {
            self.bar.set_message(message());
        }
    }

    pub fn finish(&self, message: impl AsRef<str>) {
        self.bar.finish_with_message(message.as_ref().to_string());
        if self.bar.is_hidden() {
            eprintln!("{}: done in {:.0} s: {}", self.name, self.started.elapsed().as_secs_f64(), message.as_ref());
        }
    }
}
