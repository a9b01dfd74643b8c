//! Turns the tokens of one top-level value into a `serde_json::Value`, with QEMU's error
//! texts (returned without the "JSON parse error, " prefix the streamer adds).
//!
//! Strings: escapes `\" \' \\ \/ \b \f \n \r \t \uXXXX` (surrogate pairs combine; a lone
//! surrogate is refused); raw bytes must be UTF-8 (QEMU also accepts the two-byte overlong NUL
//! `C0 80`, so does this). Numbers: integers that fit i64 or u64 stay integers, others become
//! doubles.

use serde_json::{Map, Number, Value};

use crate::lexer::{Token, TokenKind};

struct Parser<'a> {
    tokens: &'a [Token],
    pos: usize,
}

pub fn parse(tokens: &[Token]) -> Result<Value, String> {
    let mut p = Parser { tokens, pos: 0 };
    let v = p.value()?;
    // The streamer hands over exactly one value's tokens; anything after it is garbage.
    if p.pos != tokens.len() {
        return Err("expecting value".into());
    }
    Ok(v)
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<&'a Token> {
        self.tokens.get(self.pos)
    }
    fn next(&mut self) -> Option<&'a Token> {
        let t = self.tokens.get(self.pos);
        self.pos += 1;
        t
    }

    fn value(&mut self) -> Result<Value, String> {
        let t = self.next().ok_or("expecting value")?;
        match t.kind {
            TokenKind::LCurly => self.object(),
            TokenKind::LSquare => self.array(),
            TokenKind::String => Ok(Value::String(string(&t.text)?)),
            TokenKind::Integer => Ok(integer(&t.text)),
            TokenKind::Float => Ok(float(&t.text)),
            TokenKind::Keyword => match &t.text[..] {
                b"true" => Ok(Value::Bool(true)),
                b"false" => Ok(Value::Bool(false)),
                b"null" => Ok(Value::Null),
                k => Err(format!("invalid keyword '{}'", String::from_utf8_lossy(k))),
            },
            _ => Err("expecting value".into()),
        }
    }

    fn object(&mut self) -> Result<Value, String> {
        let mut m = Map::new();
        if self.peek().map(|t| t.kind) == Some(TokenKind::RCurly) {
            self.pos += 1;
            return Ok(Value::Object(m));
        }
        loop {
            // QEMU reads the key as a value first: `{"a":1,}` is "expecting value".
            let key = match self.value()? {
                Value::String(k) => k,
                _ => return Err("key is not a string in object".into()),
            };
            match self.next() {
                Some(t) if t.kind == TokenKind::Colon => {}
                _ => return Err("missing : in object pair".into()),
            }
            let v = self.value()?;
            m.insert(key, v);
            match self.next().map(|t| t.kind) {
                Some(TokenKind::Comma) => {}
                Some(TokenKind::RCurly) => return Ok(Value::Object(m)),
                _ => return Err("expected separator in dict".into()),
            }
        }
    }

    fn array(&mut self) -> Result<Value, String> {
        let mut v = Vec::new();
        if self.peek().map(|t| t.kind) == Some(TokenKind::RSquare) {
            self.pos += 1;
            return Ok(Value::Array(v));
        }
        loop {
            v.push(self.value()?);
            match self.next().map(|t| t.kind) {
                Some(TokenKind::Comma) => {}
                Some(TokenKind::RSquare) => return Ok(Value::Array(v)),
                _ => return Err("expected separator in list".into()),
            }
        }
    }
}

fn integer(text: &[u8]) -> Value {
    let s = std::str::from_utf8(text).unwrap_or("0");
    if let Ok(i) = s.parse::<i64>() {
        return Value::Number(i.into());
    }
    if let Ok(u) = s.parse::<u64>() {
        return Value::Number(u.into());
    }
    float(text)
}

fn float(text: &[u8]) -> Value {
    let s = std::str::from_utf8(text).unwrap_or("0");
    let f: f64 = s.parse().unwrap_or(0.0);
    let f = if f.is_finite() {
        f
    } else {
        f64::MAX.copysign(f)
    };
    Value::Number(Number::from_f64(f).unwrap_or_else(|| 0.into()))
}

/// Decode a quoted string token.
fn string(text: &[u8]) -> Result<String, String> {
    let inner = &text[1..text.len() - 1];
    let mut out = String::with_capacity(inner.len());
    let mut i = 0;
    while i < inner.len() {
        let b = inner[i];
        if b == b'\\' {
            let e = inner.get(i + 1).copied().unwrap_or(0);
            i += 2;
            let c = match e {
                b'"' => '"',
                b'\'' => '\'',
                b'\\' => '\\',
                b'/' => '/',
                b'b' => '\u{8}',
                b'f' => '\u{c}',
                b'n' => '\n',
                b'r' => '\r',
                b't' => '\t',
                b'u' => {
                    let (c, used) = unicode_escape(inner, i)?;
                    i += used;
                    c
                }
                _ => return Err("invalid escape sequence in string".into()),
            };
            out.push(c);
        } else if b < 0x80 {
            out.push(b as char);
            i += 1;
        } else {
            let (c, used) = utf8_char(&inner[i..]).ok_or("invalid UTF-8 sequence in string")?;
            out.push(c);
            i += used;
        }
    }
    Ok(out)
}

fn hex4(s: &[u8], at: usize) -> Option<u32> {
    let h = s.get(at..at + 4)?;
    let h = std::str::from_utf8(h).ok()?;
    if !h.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(h, 16).ok()
}

/// `\u` escape whose hex digits start at `at`; a high surrogate must be followed by a
/// `\u` low surrogate.
fn unicode_escape(s: &[u8], at: usize) -> Result<(char, usize), String> {
    let bad = |from: usize| {
        // the text QEMU quotes: "\u" and the next (up to) four characters, closing quote
        // included when the string ended early
        let end = (from + 4).min(s.len());
        let mut t = String::from_utf8_lossy(&s[from..end]).into_owned();
        if from + 4 > s.len() {
            t.push('"');
        }
        format!("\\u{t} is not a valid Unicode character")
    };
    let hi = hex4(s, at).ok_or_else(|| bad(at))?;
    if (0xD800..0xDC00).contains(&hi) {
        if s.get(at + 4..at + 6) == Some(b"\\u")
            && let Some(lo) = hex4(s, at + 6)
            && (0xDC00..0xE000).contains(&lo)
        {
            let c = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
            return Ok((char::from_u32(c).expect("valid pair"), 10));
        }
        return Err(bad(at));
    }
    char::from_u32(hi).map(|c| (c, 4)).ok_or_else(|| bad(at))
}

/// One UTF-8 character (strict, except the overlong NUL `C0 80`).
fn utf8_char(s: &[u8]) -> Option<(char, usize)> {
    if s.len() >= 2 && s[0] == 0xC0 && s[1] == 0x80 {
        return Some(('\0', 2));
    }
    let n = match s[0] {
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => return None,
    };
    let chunk = s.get(..n)?;
    let st = std::str::from_utf8(chunk).ok()?;
    st.chars().next().map(|c| (c, n))
}

#[cfg(test)]
mod tests {
    use crate::lexer::Lexer;
    use serde_json::json;

    fn p(s: &[u8]) -> Result<serde_json::Value, String> {
        let mut l = Lexer::new();
        let mut t = Vec::new();
        l.feed(s, &mut t);
        l.feed(b" ", &mut t);
        super::parse(&t)
    }

    #[test]
    fn values() {
        assert_eq!(
            p(br#"{"a": [1, -0, 1.5e3, 12345678901234567890], 'b': "\u00e9\ud83d\ude00\u0000"}"#),
            Ok(json!({"a": [1, 0, 1500.0, 12345678901234567890u64], "b": "\u{e9}\u{1f600}\0"}))
        );
        assert_eq!(p(b"\"\xc3\xa9\xc0\x80\""), Ok(json!("\u{e9}\0")));
    }

    #[test]
    fn errors() {
        assert_eq!(p(b"{\"a\" \"b\"}"), Err("missing : in object pair".into()));
        assert_eq!(p(b"{1:2}"), Err("key is not a string in object".into()));
        assert_eq!(p(b"[1 2]"), Err("expected separator in list".into()));
        assert_eq!(
            p(b"{\"a\":1 \"b\":2}"),
            Err("expected separator in dict".into())
        );
        assert_eq!(p(b"{\"a\":tru}"), Err("invalid keyword 'tru'".into()));
        assert_eq!(
            p(b"\"a\\qb\""),
            Err("invalid escape sequence in string".into())
        );
        assert_eq!(
            p(b"\"\xed\xa0\x80\""),
            Err("invalid UTF-8 sequence in string".into())
        );
        assert_eq!(
            p(b"\"a\\ud83d\""),
            Err("\\ud83d is not a valid Unicode character".into())
        );
        assert_eq!(
            p(b"\"\\u12\""),
            Err("\\u12\" is not a valid Unicode character".into())
        );
        assert_eq!(p(b"{\"a\":1,}"), Err("expecting value".into()));
    }
}
