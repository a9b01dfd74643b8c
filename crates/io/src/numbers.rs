//! Number parsing as qemu-io does it.
//!
//! * [`parse_size`] is qemu-io's "cvtnum": offsets, lengths and counts for
//!   `read`, `write`, `readv`, `writev`, `aio_*`, `discard`, `alloc`, `truncate`,
//!   `sigraise` and the `-s`/`-l` pattern range of `read`.
//! * [`parse_pattern`] is the `-P pattern` byte (strtol base 0, 0..=255).
//! * [`parse_sleep_ms`] is the plain integer parser of `sleep`.
//!
//! All rules were derived from observed behaviour (reference doc §2.6 plus
//! extra black-box runs); the odd cases are pinned down by the unit tests.

/// Largest request length accepted by `read`, `write` (without `-z -n`),
/// `discard`, and each element / the total of `readv`/`writev`/`aio_*`.
pub const MAX_REQUEST_LEN: u64 = 2_147_483_136;

/// Why a number was rejected by [`parse_size`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeError {
    /// `Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- <arg>`
    NonNumeric,
    /// `Parsing error: argument too large -- <arg>`
    TooLarge,
}

impl SizeError {
    /// The exact line (without newline) qemu-io prints on stdout, naming `arg`.
    pub fn message(self, arg: &str) -> String {
        match self {
            SizeError::NonNumeric => format!(
                "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {arg}"
            ),
            SizeError::TooLarge => format!("Parsing error: argument too large -- {arg}"),
        }
    }
}

fn suffix_multiplier(c: u8) -> Option<u64> {
    let shift = match c.to_ascii_lowercase() {
        b'b' => 0,
        b'k' => 10,
        b'm' => 20,
        b'g' => 30,
        b't' => 40,
        b'p' => 50,
        b'e' => 60,
        _ => return None,
    };
    Some(1u64 << shift)
}

/// qemu-io's "cvtnum": parse an offset/length with an optional binary suffix.
///
/// Rules (observed): decimal, or hex with `0x`/`0X` (no suffix, no fraction);
/// a leading `0` is decimal; one optional `+`; one optional suffix
/// `b k m g t p e` (case-insensitive, powers of 1024); a fraction only with a
/// `k`..`e` suffix (or if all its digits are zero), rounded to the nearest byte
/// (half away from zero); results `>= 2^63` are too large. A leading `-`
/// yields "too large" if followed by digits only or by `.digits`, otherwise
/// "non-numeric".
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    use SizeError::*;
    let b = s.as_bytes();
    let (negative, body) = match b.first() {
        Some(b'+') => (false, &b[1..]),
        Some(b'-') => (true, &b[1..]),
        _ => (false, b),
    };
    if negative {
        let all_digits = !body.is_empty() && body.iter().all(u8::is_ascii_digit);
        let dot_digits =
            body.len() > 1 && body[0] == b'.' && body[1..].iter().all(u8::is_ascii_digit);
        return Err(if all_digits || dot_digits {
            TooLarge
        } else {
            NonNumeric
        });
    }
    // Hexadecimal: digits only, no suffix, no fraction.
    if body.len() >= 2 && body[0] == b'0' && (body[1] == b'x' || body[1] == b'X') {
        let digits = &body[2..];
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_hexdigit) {
            return Err(NonNumeric);
        }
        let mut v: u64 = 0;
        for &d in digits {
            let d = (d as char).to_digit(16).unwrap_or(0) as u64;
            v = v
                .checked_mul(16)
                .and_then(|v| v.checked_add(d))
                .ok_or(TooLarge)?;
        }
        return if v >= 1 << 63 { Err(TooLarge) } else { Ok(v) };
    }
    // Decimal: int digits, optional '.' + fraction digits, optional suffix.
    let int_end = body
        .iter()
        .position(|c| !c.is_ascii_digit())
        .unwrap_or(body.len());
    let int_digits = &body[..int_end];
    let mut rest = &body[int_end..];
    let mut frac_digits: Option<&[u8]> = None;
    if rest.first() == Some(&b'.') {
        let f = &rest[1..];
        let fe = f
            .iter()
            .position(|c| !c.is_ascii_digit())
            .unwrap_or(f.len());
        frac_digits = Some(&f[..fe]);
        rest = &f[fe..];
    }
    if int_digits.is_empty() && frac_digits.is_none_or(|f| f.is_empty()) {
        return Err(NonNumeric);
    }
    let mult = match rest {
        [] => None,
        [c] => Some(suffix_multiplier(*c).ok_or(NonNumeric)?),
        _ => return Err(NonNumeric),
    };
    // Integer part; overflow of u64 is "too large" only for a bare integer.
    let mut int: u64 = 0;
    let mut int_overflow = false;
    for &d in int_digits {
        match int
            .checked_mul(10)
            .and_then(|v| v.checked_add((d - b'0') as u64))
        {
            Some(v) => int = v,
            None => int_overflow = true,
        }
    }
    if int_overflow {
        return Err(if frac_digits.is_none() && mult.is_none() {
            TooLarge
        } else {
            NonNumeric
        });
    }
    let mult_v = mult.unwrap_or(1);
    let mut frac_part: u64 = 0;
    if let Some(f) = frac_digits {
        let nonzero = f.iter().any(|&d| d != b'0');
        if nonzero {
            if mult_v == 1 {
                return Err(NonNumeric);
            }
            let text = format!("0.{}", std::str::from_utf8(f).unwrap_or("0"));
            let frac: f64 = text.parse().map_err(|_| NonNumeric)?;
            frac_part = (frac * mult_v as f64).round() as u64;
        }
    }
    let v = int
        .checked_mul(mult_v)
        .and_then(|v| v.checked_add(frac_part))
        .ok_or(TooLarge)?;
    if v >= 1 << 63 { Err(TooLarge) } else { Ok(v) }
}

/// `strtol(s, &end, 0)` accepting the whole string, as a value: optional sign,
/// `0x` hex, leading-`0` octal, else decimal. `None` if not fully numeric.
/// Out-of-range values saturate like strtol does.
fn strtol_base0(s: &str) -> Option<i128> {
    let b = s.as_bytes();
    let (neg, body) = match b.first() {
        Some(b'+') => (false, &b[1..]),
        Some(b'-') => (true, &b[1..]),
        _ => (false, b),
    };
    let (radix, digits) = if body.len() >= 2 && body[0] == b'0' && (body[1] | 0x20) == b'x' {
        (16, &body[2..])
    } else if body.len() > 1 && body[0] == b'0' {
        (8, &body[1..])
    } else {
        (10, body)
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: i128 = 0;
    for &d in digits {
        let d = (d as char).to_digit(radix)? as i128;
        v = (v * radix as i128 + d).min(i64::MAX as i128 + 1);
    }
    let v = if neg { -v } else { v };
    Some(v.clamp(i64::MIN as i128, i64::MAX as i128))
}

/// The `-P pattern` byte: strtol base 0, must be 0..=255.
/// Error text (stdout): `<arg> is not a valid pattern byte`.
pub fn parse_pattern(s: &str) -> Result<u8, String> {
    match strtol_base0(s) {
        Some(v) if (0..=255).contains(&v) => Ok(v as u8),
        _ => Err(format!("{s} is not a valid pattern byte")),
    }
}

/// The `sleep` argument in milliseconds: strtol base 0 (so `010` is octal,
/// `0x10` hex, `08` invalid), non-negative. Overflowing values saturate
/// (qemu-io accepts them and returns at once). Error text (stdout):
/// `<arg> is not a valid number`.
pub fn parse_sleep_ms(s: &str) -> Result<u64, String> {
    match strtol_base0(s) {
        Some(v) if v >= 0 => Ok(v as u64),
        _ => Err(format!("{s} is not a valid number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> u64 {
        parse_size(s).unwrap_or_else(|e| panic!("{s}: {e:?}"))
    }
    fn nn(s: &str) {
        assert_eq!(parse_size(s), Err(SizeError::NonNumeric), "{s}");
    }
    fn big(s: &str) {
        assert_eq!(parse_size(s), Err(SizeError::TooLarge), "{s}");
    }

    #[test]
    fn plain_and_hex() {
        assert_eq!(ok("0"), 0);
        assert_eq!(ok("512"), 512);
        assert_eq!(ok("010"), 10);
        assert_eq!(ok("08"), 8);
        assert_eq!(ok("+5"), 5);
        assert_eq!(ok("0x200"), 512);
        assert_eq!(ok("0X1B"), 27);
        assert_eq!(ok("0x1b"), 27);
        assert_eq!(ok("0x10b"), 267);
        assert_eq!(ok("0xaBc"), 2748);
        assert_eq!(ok("+0x1"), 1);
        assert_eq!(ok("0x00000000000000000000001"), 1);
        assert_eq!(ok("00000000000000000000001"), 1);
        assert_eq!(ok("9223372036854775807"), 9223372036854775807);
        assert_eq!(ok("0x7fffffffffffffff"), 0x7fff_ffff_ffff_ffff);
        assert_eq!(ok("4611686018427387392"), 0x3fff_ffff_ffff_fe00);
    }

    #[test]
    fn suffixes() {
        assert_eq!(ok("512b"), 512);
        assert_eq!(ok("5B"), 5);
        assert_eq!(ok("1k"), 1024);
        assert_eq!(ok("1K"), 1024);
        assert_eq!(ok("1m"), 1 << 20);
        assert_eq!(ok("1M"), 1 << 20);
        assert_eq!(ok("64k"), 65536);
        assert_eq!(ok("1e"), 1 << 60);
        assert_eq!(ok("7e"), 7 << 60);
        assert_eq!(ok("0e"), 0);
        assert_eq!(ok("0k"), 0);
        assert_eq!(ok("1.5K"), 1536);
        assert_eq!(ok("1.5M"), 1572864);
        assert_eq!(ok("1.5G"), 1610612736);
        assert_eq!(ok("1.5T"), 1649267441664);
        assert_eq!(ok("1.5P"), 1688849860263936);
        assert_eq!(ok("1.5E"), 1729382256910270464);
        assert_eq!(ok("1.e"), 1 << 60);
    }

    #[test]
    fn fractions() {
        assert_eq!(ok("1.5k"), 1536);
        assert_eq!(ok(".5k"), 512);
        assert_eq!(ok("+.5k"), 512);
        assert_eq!(ok("+1.5k"), 1536);
        assert_eq!(ok("0.5k"), 512);
        assert_eq!(ok("1.0k"), 1024);
        assert_eq!(ok("1.25k"), 1280);
        assert_eq!(ok("1.2345k"), 1264);
        assert_eq!(ok("1.1k"), 1126);
        assert_eq!(ok("1.3k"), 1331);
        assert_eq!(ok("1.7k"), 1741);
        assert_eq!(ok("2.7k"), 2765);
        assert_eq!(ok("0.001k"), 1);
        assert_eq!(ok("0.1k"), 102);
        assert_eq!(ok("0.3e"), 345876451382054080);
        assert_eq!(ok("0.5e"), 576460752303423488);
        assert_eq!(ok("1.2345e"), 1423281597437152576);
        assert_eq!(ok("0.0000000000000000001k"), 0);
        assert_eq!(ok("0.9999999999999999k"), 1024);
        assert_eq!(ok("0.99999999999999999999k"), 1024);
        assert_eq!(ok("1.99999999999999999999k"), 2048);
        assert_eq!(ok("1.00048828125k"), 1025); // tie rounds away from zero
        assert_eq!(ok("1.00146484375k"), 1026);
        assert_eq!(ok("0.00048828125k"), 1);
        assert_eq!(ok("1.000000000000000000000000000000k"), 1024);
        // integral "fractions" without suffix are fine
        assert_eq!(ok("1."), 1);
        assert_eq!(ok("1.0"), 1);
        assert_eq!(ok("2.00"), 2);
        assert_eq!(ok("1.0b"), 1);
        assert_eq!(ok("0.0"), 0);
        assert_eq!(ok(".0"), 0);
        assert_eq!(ok("0."), 0);
        assert_eq!(ok(".0b"), 0);
        assert_eq!(ok("0.b"), 0);
        assert_eq!(ok("7.9999999999999999e"), (7 << 60) + (1 << 60) - 128);
    }

    #[test]
    fn non_numeric() {
        for s in [
            "1e3",
            "1.5",
            "0.5",
            ".5",
            "0.5b",
            ".5b",
            "1.50",
            "k",
            "abc",
            "12abc",
            "1kk",
            "1kb",
            "1KiB",
            "0x1p3",
            "'5'",
            "0x10k",
            "0x10K",
            "0x",
            "0xg",
            "1.5.5k",
            "1..5k",
            "1.5kb",
            "0x1.5k",
            "0x1.8",
            "0x1.0",
            ".k",
            ".",
            "00x10",
            "1e-3k",
            "1e3k",
            "inf",
            "nan",
            "1.5b",
            "++1",
            "+-1",
            "0x+1",
            "0x-1",
            "1_000",
            "1,5k",
            "1.5e0",
            "0b1",
            "0o7",
            "1.5kk",
            "1k5",
            "1.5e-",
            "1.5x",
            "1a",
            "0x1_0",
            "1.5b0",
            "--",
            "",
            "1.0000000000000000001",
            "99999999999999999999k",
            "18446744073709551616k",
            "99999999999999999999.5k",
            "99999999999999999999b",
            "99999999999999999999B",
        ] {
            nn(s);
        }
    }

    #[test]
    fn too_large() {
        for s in [
            "8E",
            "8e",
            "16E",
            "9223372036854775808",
            "0x8000000000000000",
            "0xffffffffffffffff",
            "0x10000000000000000",
            "+0x8000000000000000",
            "18446744073709551616",
            "18446744073709551615",
            "99999999999999999999",
            "+99999999999999999999",
            "18446744073709551615k",
            "18446744073709551615b",
            "9223372036854775808b",
            "9007199254740993k",
            "7.99999999999999999999e",
            "8191.99999999999999999999p",
        ] {
            big(s);
        }
        assert_eq!(ok("9223372036854775807b"), i64::MAX as u64);
    }

    #[test]
    fn negatives() {
        for s in [
            "-1",
            "-0",
            "-5",
            "-99999999999999999999",
            "-18446744073709551616",
            "-.0",
            "-.5",
            "-.00",
        ] {
            big(s);
        }
        for s in [
            "-1k", "-0.5k", "-", "-abc", "-1.5", "-0k", "-0.0", "-1b", "-.5k", "-x", "-0x10",
            "-0x", "-0x0", "-1.", "-1e", "-.0k", "-.", "-.0b",
        ] {
            nn(s);
        }
    }

    #[test]
    fn messages() {
        assert_eq!(
            SizeError::NonNumeric.message("1e3"),
            "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- 1e3"
        );
        assert_eq!(
            SizeError::TooLarge.message("9223372036854775808"),
            "Parsing error: argument too large -- 9223372036854775808"
        );
    }

    #[test]
    fn patterns() {
        assert_eq!(parse_pattern("077"), Ok(0x3f));
        assert_eq!(parse_pattern("+5"), Ok(5));
        assert_eq!(parse_pattern("0XFF"), Ok(0xff));
        assert_eq!(parse_pattern("255"), Ok(0xff));
        assert_eq!(parse_pattern("0xab"), Ok(0xab));
        assert_eq!(parse_pattern("0"), Ok(0));
        for s in [
            "0x1ff",
            "256",
            "-1",
            "abc",
            "1k",
            "0x",
            "08",
            "999999999999",
            "v",
            "300",
        ] {
            assert_eq!(
                parse_pattern(s),
                Err(format!("{s} is not a valid pattern byte"))
            );
        }
    }

    #[test]
    fn sleep_numbers() {
        assert_eq!(parse_sleep_ms("10"), Ok(10));
        assert_eq!(parse_sleep_ms("01000"), Ok(512));
        assert_eq!(parse_sleep_ms("0x200"), Ok(512));
        assert_eq!(parse_sleep_ms("+5"), Ok(5));
        assert_eq!(parse_sleep_ms("-0"), Ok(0));
        assert_eq!(parse_sleep_ms("99999999999999999999"), Ok(i64::MAX as u64));
        for s in ["x", "1k", "-1", "1.5", "--", "5x", "\"\"", "0x", "08", "-x"] {
            assert_eq!(parse_sleep_ms(s), Err(format!("{s} is not a valid number")));
        }
    }
}
