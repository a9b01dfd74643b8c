//! qemu-img's `-p` progress output: `    (12.34/100%)` followed by `\r` on stdout, printed when
//! the figure moved by more than the minimum step since the last line, at the start and at 100; the
//! end prints 100% and ends the line.

use std::cell::Cell;
use std::io::Write;

pub struct Progress {
    pub enabled: bool,
    /// Single precision, as qemu-img keeps it (the comparisons round the same way).
    current: Cell<f32>,
    last_print: Cell<f32>,
    min_skip: f32,
}

impl Progress {
    pub fn new(enabled: bool, min_skip: f32) -> Progress {
        Progress {
            enabled,
            current: Cell::new(0.0),
            last_print: Cell::new(0.0),
            min_skip,
        }
    }

    fn print(&self, end: &str) {
        if self.enabled {
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "    ({:.2}/100%)\r{end}", self.current.get());
            let _ = out.flush();
        }
    }

    /// The first line (0%).
    pub fn start(&self) {
        self.current.set(0.0);
        self.last_print.set(0.0);
        self.print("");
    }

    /// Set the figure (percent) and print it if it moved enough.
    pub fn set(&self, percent: f64) {
        self.apply((percent as f32).min(100.0));
    }

    fn apply(&self, cur: f32) {
        self.current.set(cur);
        let last = self.last_print.get();
        if cur > last + self.min_skip || cur < last - self.min_skip || cur == 100.0 {
            self.last_print.set(cur);
            self.print("");
        }
    }

    /// Move the figure by `delta` percent of `max` (qemu-img's single-precision sum).
    pub fn add(&self, delta: f32, max: i32) {
        let cur = (self.current.get() + delta / 100.0 * max as f32).min(100.0);
        self.apply(cur);
    }

    /// End the line without a last figure (compare).
    pub fn end_line(&self) {
        if self.enabled {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out);
            let _ = out.flush();
        }
    }

    /// 100% and the end of the line.
    pub fn finish(&self) {
        self.current.set(100.0);
        self.print("\n");
    }
}
