//! Everything qemu-io prints that is a pure function of numbers and bytes.
//!
//! All functions return complete lines including the trailing `\n`, except
//! the small building blocks ([`cvtstr`], [`format_size`], [`format_rate`],
//! [`format_time`], [`format_time_csv`]) which return bare text.

use std::fmt::Write as _;
use std::time::Duration;

const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

/// qemu-io's human form ("cvtstr"): `bytes` with `%f` (six decimals, a
/// `.000000` suffix removed), or the largest binary unit not above the value
/// with `%.3f` (a `.000` suffix removed).
pub fn cvtstr(value: f64) -> String {
    let mut unit = None;
    for (i, _) in UNITS.iter().enumerate() {
        let size = (1u64 << (10 * (i + 1))) as f64;
        if value >= size {
            unit = Some(i);
        }
    }
    match unit {
        None => {
            let s = format!("{value:.6}");
            let s = s.strip_suffix(".000000").unwrap_or(&s);
            format!("{s} bytes")
        }
        Some(i) => {
            let size = (1u64 << (10 * (i + 1))) as f64;
            let s = format!("{:.3}", value / size);
            let s = s.strip_suffix(".000").unwrap_or(&s);
            format!("{s} {}", UNITS[i])
        }
    }
}

/// A byte count in human form (`1 MiB`, `512 bytes`, `1.500 KiB`).
pub fn format_size(bytes: u64) -> String {
    cvtstr(bytes as f64)
}

/// A byte rate in human form, with `/sec` (`7.467 MiB/sec`, `0 bytes/sec`).
pub fn format_rate(bytes_per_sec: f64) -> String {
    format!("{}/sec", cvtstr(bytes_per_sec))
}

fn secs(elapsed: Duration) -> f64 {
    elapsed.as_secs_f64()
}

/// `H:MM:SS.ss` (hours unpadded).
fn hms(elapsed: Duration) -> String {
    let whole = elapsed.as_secs();
    let h = whole / 3600;
    let m = (whole % 3600) / 60;
    let s = (whole % 60) as f64 + f64::from(elapsed.subsec_nanos()) / 1e9;
    format!("{h}:{m:02}:{s:05.2}")
}

/// Elapsed time in the summary line: `SS.ss sec` when the whole-seconds part
/// is 0 (hundredths rounded, so 0.9951 s is `01.00 sec`), else `H:MM:SS.ss`.
pub fn format_time(elapsed: Duration) -> String {
    if elapsed.as_secs() == 0 {
        format!("{:05.2} sec", secs(elapsed))
    } else {
        hms(elapsed)
    }
}

/// Elapsed time in the `-C` line: always `H:MM:SS.ss`.
pub fn format_time_csv(elapsed: Duration) -> String {
    hms(elapsed)
}

/// The verb of a summary line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// `read`, `readv`, `aio_read`
    Read,
    /// `write` (also `-z`), `writev`, `aio_write`
    Wrote,
    /// `discard`
    Discard,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Read => "read",
            Verb::Wrote => "wrote",
            Verb::Discard => "discard",
        }
    }
}

/// The figures of one finished request, as reported by the summary lines.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub verb: Verb,
    /// bytes actually transferred (`<done>` in `<done>/<requested>`)
    pub done: u64,
    /// bytes requested
    pub requested: u64,
    /// offset of the request (first element for vectored requests)
    pub offset: u64,
    /// number of operations (always 1 for qemu-io's commands)
    pub ops: u64,
    pub elapsed: Duration,
}

impl Stats {
    fn rates(&self) -> (f64, f64) {
        // qemu-io never sees a zero interval; guard against dividing by zero.
        let t = secs(self.elapsed).max(1e-9);
        (self.done as f64 / t, self.ops as f64 / t)
    }

    /// The two normal lines:
    /// `<verb> <done>/<requested> bytes at offset <offset>` and
    /// `<size>, <ops> ops; <time> (<rate>/sec and <opsrate> ops/sec)`.
    pub fn summary(&self) -> String {
        let (rate, ops_rate) = self.rates();
        format!(
            "{} {}/{} bytes at offset {}\n{}, {} ops; {} ({} and {:.4} ops/sec)\n",
            self.verb.as_str(),
            self.done,
            self.requested,
            self.offset,
            format_size(self.done),
            self.ops,
            format_time(self.elapsed),
            format_rate(rate),
            ops_rate
        )
    }

    /// The `-C` line: `<bytes>,<ops>,<H:MM:SS.ss>,<bytes/sec %.3f>,<ops/sec %.3f>`.
    pub fn csv(&self) -> String {
        let (rate, ops_rate) = self.rates();
        format!(
            "{},{},{},{:.3},{:.3}\n",
            self.done,
            self.ops,
            format_time_csv(self.elapsed),
            rate,
            ops_rate
        )
    }

    /// What a command prints for its statistics: nothing with `-q` (which
    /// wins over `-C`), the CSV line with `-C`, else the two summary lines.
    pub fn report(&self, csv: bool, quiet: bool) -> String {
        if quiet {
            String::new()
        } else if csv {
            self.csv()
        } else {
            self.summary()
        }
    }
}

/// The `-v` dump: 16 bytes a line starting at `offset` (not aligned),
/// `%08x:` + two spaces + `%02x ` per byte + one space + ASCII column where
/// only `[0-9A-Za-z]` are shown (else `.`). A partial last line is not padded.
pub fn hexdump(offset: u64, data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len() * 5);
    for (i, chunk) in data.chunks(16).enumerate() {
        let _ = write!(out, "{:08x}:  ", offset + 16 * i as u64);
        for b in chunk {
            let _ = write!(out, "{b:02x} ");
        }
        out.push(' ');
        for &b in chunk {
            out.push(if b.is_ascii_alphanumeric() {
                b as char
            } else {
                '.'
            });
        }
        out.push('\n');
    }
    out
}

/// `Pattern verification failed at offset <abs offset>, <len> bytes`.
pub fn pattern_failed(offset: u64, len: u64) -> String {
    format!("Pattern verification failed at offset {offset}, {len} bytes\n")
}

/// Check `data[start..start+len]` against `pattern`; on mismatch return the
/// message for absolute offset `request_offset + start`.
pub fn verify_pattern(
    request_offset: u64,
    data: &[u8],
    pattern: u8,
    start: u64,
    len: u64,
) -> Option<String> {
    let s = usize::try_from(start).ok()?;
    let e = usize::try_from(start + len).ok()?;
    let region = data.get(s..e)?;
    if region.iter().all(|&b| b == pattern) {
        None
    } else {
        Some(pattern_failed(request_offset + start, len))
    }
}

/// `<what> failed: <strerror>` (stdout), e.g. `read failed: Input/output error`.
/// `what` is `read`, `write`, `readv`, `writev`, `discard`; an `aio_read`
/// completion error says `readv`, an `aio_write` one `aio_write`.
pub fn io_failed(what: &str, strerror: &str) -> String {
    format!("{what} failed: {strerror}\n")
}

/// The `length` command's output.
pub fn length_line(len: u64) -> String {
    format!("{}\n", format_size(len))
}

/// One `map` line:
/// `<len human> (0x<len hex>) bytes <    allocated|not allocated> at offset <off human> (0x<off hex>)`.
pub fn map_line(offset: u64, len: u64, allocated: bool) -> String {
    format!(
        "{} (0x{:x}) bytes {} at offset {} (0x{:x})\n",
        format_size(len),
        len,
        if allocated {
            "    allocated"
        } else {
            "not allocated"
        },
        format_size(offset),
        offset
    )
}

/// The `alloc` command's output:
/// `<allocated>/<count> bytes allocated at offset <off human>`.
pub fn alloc_line(offset: u64, allocated: u64, count: u64) -> String {
    format!(
        "{allocated}/{count} bytes allocated at offset {}\n",
        format_size(offset)
    )
}

/// The first three lines of `info`.
pub fn info_lines(format_name: &str, cluster_size: u64, vm_state_offset: u64) -> String {
    format!(
        "format name: {format_name}\ncluster size: {}\nvm state offset: {}\n",
        format_size(cluster_size),
        format_size(vm_state_offset)
    )
}

/// `aio_read -i` / `aio_write -i`.
pub fn injecting_invalid(write: bool) -> String {
    format!(
        "injecting invalid {} request\n",
        if write { "write" } else { "read" }
    )
}

/// `write -s FILE` failures (stderr): `<path>: <strerror>`.
pub fn source_file_error(path: &str, strerror: &str) -> String {
    format!("{path}: {strerror}\n")
}

/// `write -s FILE` with an empty file (stderr).
pub fn source_file_empty(path: &str) -> String {
    format!("{path}: file is empty\n")
}

/// Fill a write buffer of `len` bytes by repeating `source` (`write -s`).
pub fn fill_from_source(source: &[u8], len: usize) -> Vec<u8> {
    if source.is_empty() {
        return vec![0; len];
    }
    source.iter().copied().cycle().take(len).collect()
}

/// The interactive prompt (stdout, no newline).
pub const PROMPT: &str = "qemu-io> ";

/// Dispatcher error when a command needs an image and none is open (stderr).
pub const NO_FILE_OPEN: &str = "no file open, try 'help open'\n";

/// Byte read buffers are pre-filled with (visible through drivers that
/// leave buffers untouched).
pub const READ_FILL_BYTE: u8 = 0xab;

/// Default write pattern byte.
pub const DEFAULT_WRITE_PATTERN: u8 = 0xcd;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        let cases: &[(u64, &str)] = &[
            (0, "0 bytes"),
            (1, "1 bytes"),
            (512, "512 bytes"),
            (1023, "1023 bytes"),
            (1024, "1 KiB"),
            (1025, "1.001 KiB"),
            (1264, "1.234 KiB"),
            (1536, "1.500 KiB"),
            (2047, "1.999 KiB"),
            (3584, "3.500 KiB"),
            (4096, "4 KiB"),
            (10240, "10 KiB"),
            (10752, "10.500 KiB"),
            (65535, "63.999 KiB"),
            (65536, "64 KiB"),
            (100352, "98 KiB"),
            (102400, "100 KiB"),
            (1047552, "1023 KiB"),
            (1048575, "1023.999 KiB"),
            (1048576, "1 MiB"),
            (1048577, "1 MiB"),
            (1049000, "1 MiB"),
            (1049100, "1 MiB"),
            (1049600, "1.001 MiB"),
            (1572864, "1.500 MiB"),
            (0x120000, "1.125 MiB"),
            (0x130000, "1.188 MiB"),
            (0x1d0000, "1.812 MiB"),
            (104857600, "100 MiB"),
            (536870912, "512 MiB"),
            (1073741823, "1024 MiB"),
            (1073741824, "1 GiB"),
            (1610612736, "1.500 GiB"),
            (2147483136, "2 GiB"),
            (1649267441664, "1.500 TiB"),
            (1 << 50, "1 PiB"),
            (1688849860263936, "1.500 PiB"),
            (1 << 60, "1 EiB"),
            (4 << 60, "4 EiB"),
        ];
        for &(n, s) in cases {
            assert_eq!(format_size(n), s, "{n}");
        }
    }

    #[test]
    fn rates() {
        assert_eq!(format_rate(0.0), "0 bytes/sec");
        assert_eq!(format_rate(41.489769), "41.489769 bytes/sec");
        assert_eq!(format_rate(1022.840418), "1022.840418 bytes/sec");
        assert_eq!(format_rate(7.467 * 1048576.0), "7.467 MiB/sec");
        assert_eq!(format_rate(2.496 * 1024.0), "2.496 KiB/sec");
    }

    #[test]
    fn times() {
        let ms = Duration::from_millis;
        assert_eq!(format_time(Duration::ZERO), "00.00 sec");
        assert_eq!(format_time(ms(5)), "00.01 sec");
        assert_eq!(format_time(ms(19)), "00.02 sec");
        assert_eq!(format_time(ms(100)), "00.10 sec");
        assert_eq!(format_time(ms(500)), "00.50 sec");
        assert_eq!(format_time(ms(950)), "00.95 sec");
        assert_eq!(format_time(Duration::from_micros(995_100)), "01.00 sec");
        assert_eq!(format_time(ms(1000)), "0:00:01.00");
        assert_eq!(format_time(ms(1500)), "0:00:01.50");
        assert_eq!(format_time(ms(1580)), "0:00:01.58");
        assert_eq!(format_time(ms(1996)), "0:00:02.00");
        assert_eq!(format_time(ms(12340)), "0:00:12.34");
        assert_eq!(format_time(ms(61510)), "0:01:01.51");
        assert_eq!(format_time(ms(1083390)), "0:18:03.39");
        assert_eq!(format_time(ms(4281520)), "1:11:21.52");
        assert_eq!(format_time_csv(ms(0)), "0:00:00.00");
        assert_eq!(format_time_csv(ms(1500)), "0:00:01.50");
        assert_eq!(format_time_csv(ms(10000)), "0:00:10.00");
    }

    fn stats(verb: Verb, n: u64, offset: u64, elapsed: Duration) -> Stats {
        Stats {
            verb,
            done: n,
            requested: n,
            offset,
            ops: 1,
            elapsed,
        }
    }

    #[test]
    fn summaries() {
        // 512 bytes in 1/1.9977 s etc.: reconstruct from the documented samples.
        let s = stats(Verb::Read, 512, 0, Duration::from_nanos(500_575_000));
        assert_eq!(
            s.summary(),
            "read 512/512 bytes at offset 0\n\
             512 bytes, 1 ops; 00.50 sec (1022.823753 bytes/sec and 1.9977 ops/sec)\n"
        );
        let s = stats(Verb::Read, 512, 0, Duration::from_millis(12340));
        assert_eq!(
            s.summary(),
            "read 512/512 bytes at offset 0\n\
             512 bytes, 1 ops; 0:00:12.34 (41.491086 bytes/sec and 0.0810 ops/sec)\n"
        );
        let s = stats(Verb::Read, 0, 0, Duration::from_millis(1500));
        assert_eq!(
            s.summary(),
            "read 0/0 bytes at offset 0\n\
             0 bytes, 1 ops; 0:00:01.50 (0 bytes/sec and 0.6667 ops/sec)\n"
        );
        let s = stats(Verb::Wrote, 65536, 65536, Duration::from_millis(1));
        assert!(s.summary().starts_with(
            "wrote 65536/65536 bytes at offset 65536\n64 KiB, 1 ops; 00.00 sec (62.500 MiB/sec and 1000.0000 ops/sec)\n"
        ));
        let s = stats(Verb::Discard, 1, 1, Duration::from_millis(1));
        assert!(
            s.summary()
                .starts_with("discard 1/1 bytes at offset 1\n1 bytes, 1 ops; 00.00 sec (")
        );
        let s = stats(Verb::Read, 20, 4294967312, Duration::from_micros(5));
        assert!(
            s.summary()
                .starts_with("read 20/20 bytes at offset 4294967312\n20 bytes, 1 ops; ")
        );
    }

    #[test]
    fn csv_and_report() {
        let s = stats(Verb::Read, 512, 0, Duration::from_millis(1500));
        assert_eq!(s.csv(), "512,1,0:00:01.50,341.333,0.667\n");
        let s = stats(Verb::Read, 512, 0, Duration::from_secs(10));
        assert_eq!(s.csv(), "512,1,0:00:10.00,51.200,0.100\n");
        assert_eq!(s.report(true, true), "");
        assert_eq!(s.report(false, true), "");
        assert_eq!(s.report(true, false), s.csv());
        assert_eq!(s.report(false, false), s.summary());
    }

    #[test]
    fn hexdumps() {
        let all: Vec<u8> = (0..=255).collect();
        let d = hexdump(4096, &all);
        let lines: Vec<&str> = d.lines().collect();
        assert_eq!(lines.len(), 16);
        assert_eq!(
            lines[0],
            "00001000:  00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f  ................"
        );
        assert_eq!(
            lines[2],
            "00001020:  20 21 22 23 24 25 26 27 28 29 2a 2b 2c 2d 2e 2f  ................"
        );
        assert_eq!(
            lines[3],
            "00001030:  30 31 32 33 34 35 36 37 38 39 3a 3b 3c 3d 3e 3f  0123456789......"
        );
        assert_eq!(
            lines[4],
            "00001040:  40 41 42 43 44 45 46 47 48 49 4a 4b 4c 4d 4e 4f  .ABCDEFGHIJKLMNO"
        );
        assert_eq!(
            lines[5],
            "00001050:  50 51 52 53 54 55 56 57 58 59 5a 5b 5c 5d 5e 5f  PQRSTUVWXYZ....."
        );
        assert_eq!(
            lines[6],
            "00001060:  60 61 62 63 64 65 66 67 68 69 6a 6b 6c 6d 6e 6f  .abcdefghijklmno"
        );
        assert_eq!(
            lines[7],
            "00001070:  70 71 72 73 74 75 76 77 78 79 7a 7b 7c 7d 7e 7f  pqrstuvwxyz....."
        );
        assert_eq!(
            lines[15],
            "000010f0:  f0 f1 f2 f3 f4 f5 f6 f7 f8 f9 fa fb fc fd fe ff  ................"
        );
        assert_eq!(
            hexdump(4099, &all[3..24]),
            "00001003:  03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f 10 11 12  ................\n\
             00001013:  13 14 15 16 17  .....\n"
        );
        assert_eq!(
            hexdump(4096, &all[..5]),
            "00001000:  00 01 02 03 04  .....\n"
        );
        assert_eq!(
            hexdump(0x100000010, &[0xab; 20]),
            "100000010:  ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab  ................\n\
             100000020:  ab ab ab ab  ....\n"
        );
        assert_eq!(
            hexdump(0, b"abababababababab"),
            "00000000:  61 62 61 62 61 62 61 62 61 62 61 62 61 62 61 62  abababababababab\n"
        );
        assert_eq!(hexdump(0, &[]), "");
    }

    #[test]
    fn pattern_messages() {
        assert_eq!(
            pattern_failed(0, 1024),
            "Pattern verification failed at offset 0, 1024 bytes\n"
        );
        let mut data = vec![0xab; 512];
        data.extend([0xcd; 512]);
        assert_eq!(
            verify_pattern(0, &data, 0xab, 0, 1024).as_deref(),
            Some("Pattern verification failed at offset 0, 1024 bytes\n")
        );
        assert_eq!(verify_pattern(0, &data, 0xab, 0, 512), None);
        assert_eq!(
            verify_pattern(0, &data, 0xcd, 500, 100).as_deref(),
            Some("Pattern verification failed at offset 500, 100 bytes\n")
        );
        let buf: Vec<u8> = (0..=255).collect();
        assert_eq!(
            verify_pattern(4096, &buf, 0x10, 16, 16).as_deref(),
            Some("Pattern verification failed at offset 4112, 16 bytes\n")
        );
    }

    #[test]
    fn other_lines() {
        assert_eq!(
            io_failed("read", "Input/output error"),
            "read failed: Input/output error\n"
        );
        assert_eq!(length_line(1 << 20), "1 MiB\n");
        assert_eq!(length_line(0), "0 bytes\n");
        assert_eq!(
            map_line(0, 1 << 20, true),
            "1 MiB (0x100000) bytes     allocated at offset 0 bytes (0x0)\n"
        );
        assert_eq!(
            map_line(0x130000, 0x1d0000, false),
            "1.812 MiB (0x1d0000) bytes not allocated at offset 1.188 MiB (0x130000)\n"
        );
        assert_eq!(
            map_line(65536, 0x8800, true),
            "34 KiB (0x8800) bytes     allocated at offset 64 KiB (0x10000)\n"
        );
        assert_eq!(
            alloc_line(0, 512, 512),
            "512/512 bytes allocated at offset 0 bytes\n"
        );
        assert_eq!(
            alloc_line(65535, 1, 2),
            "1/2 bytes allocated at offset 63.999 KiB\n"
        );
        assert_eq!(
            alloc_line(1, 0, 1),
            "0/1 bytes allocated at offset 1 bytes\n"
        );
        assert_eq!(
            alloc_line(1 << 20, 0, 65536),
            "0/65536 bytes allocated at offset 1 MiB\n"
        );
        assert_eq!(
            info_lines("qcow2", 65536, 512 << 20),
            "format name: qcow2\ncluster size: 64 KiB\nvm state offset: 512 MiB\n"
        );
        assert_eq!(
            info_lines("raw", 0, 0),
            "format name: raw\ncluster size: 0 bytes\nvm state offset: 0 bytes\n"
        );
        assert_eq!(injecting_invalid(false), "injecting invalid read request\n");
        assert_eq!(injecting_invalid(true), "injecting invalid write request\n");
        assert_eq!(source_file_empty("empty.bin"), "empty.bin: file is empty\n");
        assert_eq!(
            source_file_error("nofile.bin", "No such file or directory"),
            "nofile.bin: No such file or directory\n"
        );
        assert_eq!(fill_from_source(b"ab", 5), b"ababa");
    }
}
