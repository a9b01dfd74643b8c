//! The JSON lexer of the QMP input stream: bytes in, tokens out, one byte at a time, so a
//! message may arrive split anywhere.
//!
//! Behaviour observed from QEMU's monitor and reproduced here:
//! * strings may be double- or single-quoted; inside them any byte but a control character
//!   (< 0x20) or 0xFE/0xFF is taken as is (UTF-8 and escapes are checked by the parser);
//! * numbers and keywords end at the first byte that cannot continue them (that byte is then
//!   lexed afresh);
//! * a byte that cannot start or continue a token makes an error token whose text includes
//!   it; the lexer then skips input until a structural character (`{ } [ ]`), a control
//!   character other than tab, or 0xFE/0xFF, so a client can force a resynchronisation;
//! * a token longer than [`MAX_TOKEN_SIZE`] is cut off with a [`TokenKind::TooLarge`] token and
//!   the lexer resynchronises the same way (memory stays bounded whatever the peer sends).

/// QEMU's limit on the size of a token (and of a whole JSON value): 64 MiB.
pub const MAX_TOKEN_SIZE: usize = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Comma,
    Colon,
    /// text includes the quotes
    String,
    Integer,
    Float,
    Keyword,
    /// a lexical error; the text is what was read of the bad token
    Error,
    /// a token grew past [`MAX_TOKEN_SIZE`]
    TooLarge,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub kind: TokenKind,
    pub text: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    /// after '-'
    Minus,
    /// a leading '0'
    Zero,
    Int,
    /// after '.'
    Dot,
    Frac,
    /// after 'e'/'E'
    Exp,
    /// after the exponent's sign
    ExpSign,
    ExpDigits,
}

impl Num {
    fn accepting(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::ExpDigits)
    }
    fn is_float(self) -> bool {
        matches!(self, Num::Frac | Num::ExpDigits)
    }
    /// The state after `b`, or `None` if `b` cannot continue the number.
    fn next(self, b: u8) -> Option<Num> {
        let digit = b.is_ascii_digit();
        match self {
            Num::Minus if b == b'0' => Some(Num::Zero),
            Num::Minus if digit => Some(Num::Int),
            Num::Zero | Num::Int if b == b'.' => Some(Num::Dot),
            Num::Zero | Num::Int | Num::Frac if b == b'e' || b == b'E' => Some(Num::Exp),
            Num::Int if digit => Some(Num::Int),
            Num::Dot | Num::Frac if digit => Some(Num::Frac),
            Num::Exp if b == b'+' || b == b'-' => Some(Num::ExpSign),
            Num::Exp | Num::ExpSign | Num::ExpDigits if digit => Some(Num::ExpDigits),
            _ => None,
        }
    }
    /// Bytes that end an accepting number without being part of it are re-lexed; a byte
    /// that is a digit-like continuation that is not allowed ("01") is an error.
    fn bad_continuation(self, b: u8) -> bool {
        !self.accepting() || b.is_ascii_digit() || b == b'.' || b == b'e' || b == b'E'
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    Str { quote: u8, escaped: bool },
    Number(Num),
    Keyword,
    Recovery,
}

pub struct Lexer {
    state: State,
    token: Vec<u8>,
}

impl Default for Lexer {
    fn default() -> Self {
        Self::new()
    }
}

fn ends_recovery(b: u8) -> bool {
    matches!(b, b'{' | b'}' | b'[' | b']' | 0xfe | 0xff) || (b < 0x20 && b != b'\t')
}

impl Lexer {
    pub fn new() -> Lexer {
        Lexer {
            state: State::Start,
            token: Vec::new(),
        }
    }

    fn emit(&mut self, kind: TokenKind, out: &mut Vec<Token>) {
        out.push(Token {
            kind,
            text: std::mem::take(&mut self.token),
        });
        self.state = State::Start;
    }

    fn error(&mut self, out: &mut Vec<Token>) {
        self.emit(TokenKind::Error, out);
        self.state = State::Recovery;
    }

    fn grow(&mut self, b: u8, out: &mut Vec<Token>) {
        if self.token.len() >= MAX_TOKEN_SIZE {
            self.token = Vec::new();
            out.push(Token {
                kind: TokenKind::TooLarge,
                text: Vec::new(),
            });
            self.state = State::Recovery;
            return;
        }
        self.token.push(b);
    }

    /// Lex `input`, appending complete tokens to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<Token>) {
        let mut i = 0;
        while i < input.len() {
            // Fast paths: runs of plain string bytes, and skipped bytes while resynchronising.
            match self.state {
                State::Str {
                    quote,
                    escaped: false,
                } => {
                    let run = input[i..]
                        .iter()
                        .position(|&b| b == quote || b == b'\\' || !(0x20..0xfe).contains(&b))
                        .unwrap_or(input.len() - i);
                    let room = MAX_TOKEN_SIZE.saturating_sub(self.token.len());
                    let take = run.min(room);
                    self.token.extend_from_slice(&input[i..i + take]);
                    i += take;
                    if take < run {
                        // the next byte would grow the token past the limit
                        self.byte(input[i], out);
                        i += 1;
                        continue;
                    }
                }
                State::Recovery => {
                    i += input[i..]
                        .iter()
                        .position(|&b| ends_recovery(b))
                        .unwrap_or(input.len() - i);
                }
                _ => {}
            }
            if i < input.len() {
                self.byte(input[i], out);
                i += 1;
            }
        }
    }

    fn byte(&mut self, b: u8, out: &mut Vec<Token>) {
        loop {
            match self.state {
                State::Recovery => {
                    if !ends_recovery(b) {
                        return;
                    }
                    self.state = State::Start;
                    // re-lex b
                }
                State::Start => {
                    let single = match b {
                        b'{' => Some(TokenKind::LCurly),
                        b'}' => Some(TokenKind::RCurly),
                        b'[' => Some(TokenKind::LSquare),
                        b']' => Some(TokenKind::RSquare),
                        b',' => Some(TokenKind::Comma),
                        b':' => Some(TokenKind::Colon),
                        _ => None,
                    };
                    if let Some(k) = single {
                        self.token.push(b);
                        self.emit(k, out);
                        return;
                    }
                    match b {
                        b' ' | b'\t' | b'\r' | b'\n' => {}
                        b'"' | b'\'' => {
                            self.token.push(b);
                            self.state = State::Str {
                                quote: b,
                                escaped: false,
                            };
                        }
                        b'-' => {
                            self.token.push(b);
                            self.state = State::Number(Num::Minus);
                        }
                        b'0' => {
                            self.token.push(b);
                            self.state = State::Number(Num::Zero);
                        }
                        b'1'..=b'9' => {
                            self.token.push(b);
                            self.state = State::Number(Num::Int);
                        }
                        b'a'..=b'z' => {
                            self.token.push(b);
                            self.state = State::Keyword;
                        }
                        _ => {
                            self.token.push(b);
                            self.error(out);
                        }
                    }
                    return;
                }
                State::Str { quote, escaped } => {
                    if !(0x20..0xfe).contains(&b) {
                        self.token.push(b);
                        self.error(out);
                        return;
                    }
                    self.grow(b, out);
                    if self.state == State::Recovery {
                        return;
                    }
                    if escaped {
                        self.state = State::Str {
                            quote,
                            escaped: false,
                        };
                    } else if b == b'\\' {
                        self.state = State::Str {
                            quote,
                            escaped: true,
                        };
                    } else if b == quote {
                        self.emit(TokenKind::String, out);
                    }
                    return;
                }
                State::Number(n) => match n.next(b) {
                    Some(next) => {
                        self.grow(b, out);
                        if self.state != State::Recovery {
                            self.state = State::Number(next);
                        }
                        return;
                    }
                    None if n.bad_continuation(b) => {
                        self.token.push(b);
                        self.error(out);
                        return;
                    }
                    None => {
                        let kind = if n.is_float() {
                            TokenKind::Float
                        } else {
                            TokenKind::Integer
                        };
                        self.emit(kind, out);
                        // re-lex b
                    }
                },
                State::Keyword => {
                    if b.is_ascii_lowercase() {
                        self.grow(b, out);
                        return;
                    }
                    self.emit(TokenKind::Keyword, out);
                    // re-lex b
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lex(s: &[u8]) -> Vec<(TokenKind, String)> {
        let mut l = Lexer::new();
        let mut out = Vec::new();
        l.feed(s, &mut out);
        out.into_iter()
            .map(|t| (t.kind, String::from_utf8_lossy(&t.text).into_owned()))
            .collect()
    }

    #[test]
    fn tokens_split_anywhere() {
        let whole = br#"{"a": [1, -2.5e3, 'x\'y'], "b": true}"#;
        let expect = lex(whole);
        let mut l = Lexer::new();
        let mut out = Vec::new();
        for b in whole.iter() {
            l.feed(std::slice::from_ref(b), &mut out);
        }
        let got: Vec<_> = out
            .into_iter()
            .map(|t| (t.kind, String::from_utf8_lossy(&t.text).into_owned()))
            .collect();
        assert_eq!(got, expect);
        assert_eq!(expect.len(), 15);
        assert_eq!(expect[6], (TokenKind::Float, "-2.5e3".into()));
    }

    #[test]
    fn errors_and_recovery() {
        // the control char is an error, "abc " is skipped, '{' resumes
        let t = lex(b"\x01abc {");
        assert_eq!(
            t,
            vec![
                (TokenKind::Error, "\u{1}".into()),
                (TokenKind::LCurly, "{".into())
            ]
        );
        // "01" and "1." are errors that include the offending byte
        assert_eq!(lex(b"01 ")[0], (TokenKind::Error, "01".into()));
        assert_eq!(lex(b"1.}"), vec![(TokenKind::Error, "1.}".into())]);
        // a tab inside a string is an error
        assert_eq!(lex(b"\"a\tb\"")[0], (TokenKind::Error, "\"a\t".into()));
        // a number needs a following byte to end
        assert!(lex(b"123").is_empty());
        assert_eq!(lex(b"123 ")[0], (TokenKind::Integer, "123".into()));
    }
}
