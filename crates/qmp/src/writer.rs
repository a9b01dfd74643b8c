//! QMP output: JSON in QEMU's layout (`{"a": 1, "b": [1, 2]}`, or indented by four with
//! `pretty=on`), ASCII only (everything else as `\uXXXX`, upper-case hex, surrogate pairs above
//! the BMP), each message ended by CRLF.

use serde_json::Value;

/// One message, CRLF included.
pub fn message(v: &Value, pretty: bool) -> Vec<u8> {
    let mut s = String::new();
    write_value(&mut s, v, pretty, 0);
    if pretty {
        // every line of a pretty message ends with CRLF (strings hold no raw newline)
        s = s.replace('\n', "\r\n");
    }
    s.push_str("\r\n");
    s.into_bytes()
}

/// The compact form, no line end.
pub fn to_string(v: &Value) -> String {
    let mut s = String::new();
    write_value(&mut s, v, false, 0);
    s
}

fn newline(s: &mut String, pretty: bool, level: usize) {
    if pretty {
        s.push('\n');
        for _ in 0..level {
            s.push_str("    ");
        }
    }
}

fn write_value(s: &mut String, v: &Value, pretty: bool, level: usize) {
    match v {
        Value::Null => s.push_str("null"),
        Value::Bool(b) => s.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(s, n),
        Value::String(t) => write_string(s, t),
        Value::Array(a) => {
            s.push('[');
            for (i, e) in a.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                    if !pretty {
                        s.push(' ');
                    }
                }
                newline(s, pretty, level + 1);
                write_value(s, e, pretty, level + 1);
            }
            newline(s, pretty, level);
            s.push(']');
        }
        Value::Object(m) => {
            s.push('{');
            for (i, (k, e)) in m.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                    if !pretty {
                        s.push(' ');
                    }
                }
                newline(s, pretty, level + 1);
                write_string(s, k);
                s.push_str(": ");
                write_value(s, e, pretty, level + 1);
            }
            newline(s, pretty, level);
            s.push('}');
        }
    }
}

fn write_number(s: &mut String, n: &serde_json::Number) {
    if n.is_i64() || n.is_u64() {
        s.push_str(&n.to_string());
        return;
    }
    let f = n.as_f64().unwrap_or(0.0);
    // QEMU prints doubles with "%.17g": integral values without a fraction.
    if f.fract() == 0.0 && f.abs() < 1e17 {
        s.push_str(&format!("{}", f as i64));
    } else {
        s.push_str(&format!("{f:e}").replace('e', "e+").replace("e+-", "e-"));
    }
}

fn write_string(s: &mut String, t: &str) {
    s.push('"');
    for c in t.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\u{8}' => s.push_str("\\b"),
            '\u{c}' => s.push_str("\\f"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            ' '..='~' => s.push(c),
            _ => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    s.push_str(&format!("\\u{u:04X}"));
                }
            }
        }
    }
    s.push('"');
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn layout() {
        let v = json!({"return": {}, "id": ["é", 1, 1500.0, "\u{1f600}\u{7f}"]});
        assert_eq!(
            super::to_string(&v),
            r#"{"id": ["\u00E9", 1, 1500, "\uD83D\uDE00\u007F"], "return": {}}"#
        );
        assert_eq!(
            String::from_utf8(super::message(&json!({"a": [1]}), true)).unwrap(),
            "{\r\n    \"a\": [\r\n        1\r\n    ]\r\n}\r\n"
        );
    }
}
