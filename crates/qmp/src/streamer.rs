//! Splits the token stream into top-level JSON values (QEMU's "JSON streamer"), enforcing the
//! limits QEMU documents as its denial-of-service protection: nesting depth 1024, 64 MiB of
//! token text and 2 Mi tokens per value. A limit or a lexical error discards what was gathered
//! and reports one error; the stream then goes on with the next token.

use crate::lexer::{Lexer, MAX_TOKEN_SIZE, Token, TokenKind};
use crate::parser;
use serde_json::Value;

pub const MAX_NESTING: usize = 1024;
pub const MAX_TOKEN_COUNT: usize = 2 << 20;

/// One item of the input stream: a parsed value or the error to answer with.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Value(Value),
    Error(String),
}

pub struct Streamer {
    lexer: Lexer,
    tokens: Vec<Token>,
    braces: i64,
    brackets: i64,
    size: usize,
    scratch: Vec<Token>,
}

impl Default for Streamer {
    fn default() -> Self {
        Self::new()
    }
}

impl Streamer {
    pub fn new() -> Streamer {
        Streamer {
            lexer: Lexer::new(),
            tokens: Vec::new(),
            braces: 0,
            brackets: 0,
            size: 0,
            scratch: Vec::new(),
        }
    }

    fn reset(&mut self) {
        self.tokens = Vec::new();
        self.braces = 0;
        self.brackets = 0;
        self.size = 0;
    }

    /// Feed bytes; complete values (or errors) are appended to `out` in input order.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<Item>) {
        let mut toks = std::mem::take(&mut self.scratch);
        // Lex in slices so a flood of tokens is handed on before it piles up.
        for chunk in input.chunks(64 << 10) {
            self.lexer.feed(chunk, &mut toks);
            for t in toks.drain(..) {
                self.token(t, out);
            }
        }
        self.scratch = toks;
    }

    fn token(&mut self, t: Token, out: &mut Vec<Item>) {
        match t.kind {
            TokenKind::Error => {
                let text = String::from_utf8_lossy(&t.text);
                out.push(Item::Error(format!("JSON parse error, stray '{text}'")));
                self.reset();
                return;
            }
            TokenKind::TooLarge => {
                out.push(Item::Error("JSON token size limit exceeded".into()));
                self.reset();
                return;
            }
            TokenKind::LCurly => self.braces += 1,
            TokenKind::RCurly => self.braces -= 1,
            TokenKind::LSquare => self.brackets += 1,
            TokenKind::RSquare => self.brackets -= 1,
            _ => {}
        }
        self.size += t.text.len();
        self.tokens.push(t);
        if self.braces < 0 || self.brackets < 0 || (self.braces == 0 && self.brackets == 0) {
            let tokens = std::mem::take(&mut self.tokens);
            self.reset();
            out.push(match parser::parse(&tokens) {
                Ok(v) => Item::Value(v),
                Err(e) => Item::Error(format!("JSON parse error, {e}")),
            });
            return;
        }
        if (self.braces + self.brackets) as usize > MAX_NESTING {
            out.push(Item::Error("JSON nesting depth limit exceeded".into()));
            self.reset();
        } else if self.size > MAX_TOKEN_SIZE {
            out.push(Item::Error("JSON token size limit exceeded".into()));
            self.reset();
        } else if self.tokens.len() > MAX_TOKEN_COUNT {
            out.push(Item::Error("JSON token count limit exceeded".into()));
            self.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn items(s: &[u8]) -> Vec<Item> {
        let mut st = Streamer::new();
        let mut out = Vec::new();
        st.feed(s, &mut out);
        out
    }

    fn err(s: &str) -> Item {
        Item::Error(s.into())
    }

    #[test]
    fn values_and_errors_in_order() {
        assert_eq!(
            items(b"{\"a\":1}}  [1,2]{'b':null}\r\n"),
            vec![
                Item::Value(json!({"a":1})),
                err("JSON parse error, expecting value"),
                Item::Value(json!([1, 2])),
                Item::Value(json!({"b":null})),
            ]
        );
        assert_eq!(
            items(b"{\"a\":[1,\x01 2]}{}"),
            vec![
                err("JSON parse error, stray '\u{1}'"),
                err("JSON parse error, expecting value"),
                err("JSON parse error, expecting value"),
                Item::Value(json!({})),
            ]
        );
    }

    #[test]
    fn nesting_limit_like_qemu() {
        let mut s = vec![b'['; 2000];
        s.extend(vec![b']'; 2000]);
        let out = items(&s);
        // the limit error, the rest of the brackets form one array, then each extra ']'
        assert_eq!(out[0], err("JSON nesting depth limit exceeded"));
        assert!(matches!(out[1], Item::Value(_)));
        assert_eq!(out.len(), 2 + 1025);
        assert!(
            out[2..]
                .iter()
                .all(|i| *i == err("JSON parse error, expecting value"))
        );
    }

    #[test]
    fn token_count_limit() {
        let mut s = b"[".to_vec();
        for _ in 0..(MAX_TOKEN_COUNT / 2 + 10) {
            s.extend_from_slice(b"1,");
        }
        s.extend_from_slice(b"1]{}");
        let out = items(&s);
        assert_eq!(out[0], err("JSON token count limit exceeded"));
        assert_eq!(*out.last().unwrap(), Item::Value(json!({})));
    }
}
