//! Number parsing as qemu-img does it: `strtol`-style integers (base 0) for counts and
//! `qemu_strtosz`-style sizes (suffixes, fractions with a suffix) for sizes and offsets.

#[derive(Debug, PartialEq, Eq)]
pub enum NumError {
    /// Not a number: "Invalid X specified: 'v'."
    Invalid,
    /// Out of range: "Invalid X specified. Must be between A and B."
    Range,
}

/// strtol(s, &end, 0) with the whole string consumed.
pub fn strtol(s: &str) -> Result<i64, NumError> {
    let t = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (16, h)
    } else if t.len() > 1 && t.starts_with('0') {
        (8, &t[1..])
    } else {
        (10, t)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(NumError::Invalid);
    }
    let mut v: i128 = 0;
    for c in digits.chars() {
        v = v * radix as i128 + c.to_digit(radix).unwrap_or(0) as i128;
        if v > i64::MAX as i128 + 1 {
            return Err(NumError::Range);
        }
    }
    let v = if neg { -v } else { v };
    i64::try_from(v).map_err(|_| NumError::Range)
}

/// qemu's cvtnum: a size as blockd-block's options read one (suffixes, hex, fractions with a
/// suffix), limited to below 2^63.
pub fn cvtnum(s: &str) -> Result<u64, NumError> {
    use blockd_block::options::{SizeError, parse_size};
    match parse_size(s) {
        Ok(v) if v <= i64::MAX as u64 => Ok(v),
        Ok(_) | Err(SizeError::Range) => Err(NumError::Range),
        Err(SizeError::Invalid) => Err(NumError::Invalid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(cvtnum("1.5k"), Ok(1536));
        assert_eq!(cvtnum("1.7k"), Ok(1741));
        assert_eq!(cvtnum("0x10"), Ok(16));
        assert_eq!(cvtnum("1b"), Ok(1));
        assert_eq!(cvtnum(" 5"), Ok(5));
        assert_eq!(cvtnum("1.5"), Err(NumError::Invalid));
        assert_eq!(cvtnum("1.5b"), Err(NumError::Invalid));
        assert_eq!(cvtnum("5e2"), Err(NumError::Invalid));
        assert_eq!(cvtnum("x"), Err(NumError::Invalid));
        assert_eq!(cvtnum("-1"), Err(NumError::Range));
        assert_eq!(cvtnum("8E"), Err(NumError::Range));
        assert_eq!(cvtnum("16E"), Err(NumError::Range));
        assert_eq!(cvtnum("7E"), Ok(7 << 60));
    }

    #[test]
    fn ints() {
        assert_eq!(strtol("0x10"), Ok(16));
        assert_eq!(strtol("010"), Ok(8));
        assert_eq!(strtol(" +5"), Ok(5));
        assert_eq!(strtol("-1"), Ok(-1));
        assert_eq!(strtol("0x"), Err(NumError::Invalid));
        assert_eq!(strtol("1k"), Err(NumError::Invalid));
        assert_eq!(strtol("99999999999999999999"), Err(NumError::Range));
    }
}
