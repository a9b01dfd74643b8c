//! BlockdevOptions in QEMU's two spellings: dotted keys (`driver=file,node-name=a,cache.direct=on`)
//! and JSON (`{"driver": "file", "cache": {"direct": true}}`), read with QEMU's option names,
//! value syntax and error wording.

use serde_json::{Map, Value};

/// Parse a dotted-keys string (`,,` escapes a comma) or a JSON object into a JSON object.
pub fn parse(s: &str) -> Result<Map<String, Value>, String> {
    let t = s.trim_start();
    if t.starts_with('{') {
        return match serde_json::from_str::<Value>(t) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(_) => Err("JSON options must be an object".into()),
            Err(e) => Err(format!("JSON parse error, {e}")),
        };
    }
    let mut root = Map::new();
    for item in split_list(s) {
        if item.is_empty() {
            continue;
        }
        let (k, v) = match item.split_once('=') {
            Some(kv) => kv,
            None => return Err(format!("Expected '=' after parameter '{item}'")),
        };
        insert_dotted(&mut root, k, Value::String(v.to_string()))?;
    }
    Ok(root)
}

/// Split a QEMU option list at commas (`,,` stands for a comma inside a value).
pub fn split_list(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

fn insert_dotted(m: &mut Map<String, Value>, key: &str, v: Value) -> Result<(), String> {
    match key.split_once('.') {
        None => {
            if m.contains_key(key) {
                return Err(format!("Parameter '{key}' is set multiple times"));
            }
            m.insert(key.to_string(), v);
            Ok(())
        }
        Some((head, rest)) => {
            let e = m
                .entry(head.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            match e {
                Value::Object(inner) => insert_dotted(inner, rest, v),
                _ => Err(format!("Parameter '{head}' used inconsistently")),
            }
        }
    }
}

/// Options being consumed by a driver: each `take_*` removes the key, and whatever is left at
/// the end is refused as unsupported.
pub struct Opts {
    map: Map<String, Value>,
    /// Prefix for error messages of nested options ("file.").
    prefix: String,
}

impl Opts {
    pub fn new(map: Map<String, Value>) -> Opts {
        Opts {
            map,
            prefix: String::new(),
        }
    }

    pub fn nested(map: Map<String, Value>, prefix: &str) -> Opts {
        Opts {
            map,
            prefix: prefix.to_string(),
        }
    }

    fn name(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }

    pub fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key)
    }

    pub fn take_str(&mut self, key: &str) -> Result<Option<String>, String> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(format!(
                "Invalid parameter type for '{}', expected: string",
                self.name(key)
            )),
        }
    }

    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>, String> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(Value::String(s)) => match s.as_str() {
                "on" | "yes" | "true" | "y" => Ok(Some(true)),
                "off" | "no" | "false" | "n" => Ok(Some(false)),
                _ => Err(format!(
                    "Parameter '{}' expects 'on' or 'off'",
                    self.name(key)
                )),
            },
            Some(_) => Err(format!(
                "Invalid parameter type for '{}', expected: boolean",
                self.name(key)
            )),
        }
    }

    /// A size with QEMU's suffixes (k, M, G, T, P, E; binary).
    pub fn take_size(&mut self, key: &str) -> Result<Option<u64>, String> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| self.size_error(key)),
            Some(Value::String(s)) => parse_size(&s).map(Some).map_err(|_| self.size_error(key)),
            Some(_) => Err(format!(
                "Invalid parameter type for '{}', expected: integer",
                self.name(key)
            )),
        }
    }

    fn size_error(&self, key: &str) -> String {
        format!(
            "Parameter '{}' expects a non-negative number below 2^64\n\
             Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
             and exabytes, respectively.",
            self.name(key)
        )
    }

    pub fn take_u64(&mut self, key: &str) -> Result<Option<u64>, String> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| self.num_error(key)),
            Some(Value::String(s)) => s.parse().map(Some).map_err(|_| self.num_error(key)),
            Some(_) => Err(self.num_error(key)),
        }
    }

    fn num_error(&self, key: &str) -> String {
        format!("Parameter '{}' expects a number", self.name(key))
    }

    /// A nested object (`file.*`) or a reference to an existing node by name.
    pub fn take_child(&mut self, key: &str) -> Option<ChildSpec> {
        match self.map.remove(key)? {
            Value::String(s) => Some(ChildSpec::Reference(s)),
            Value::Object(m) => Some(ChildSpec::Options(m)),
            _ => None,
        }
    }

    /// Refuse what no one consumed. `kind` is "protocol" or "format".
    pub fn finish(self, driver: &str, is_format: bool) -> Result<(), String> {
        if let Some(k) = self.map.keys().next() {
            let k = self.name(k);
            return Err(if is_format {
                format!("Block format '{driver}' does not support the option '{k}'")
            } else {
                format!("Block protocol '{driver}' doesn't support the option '{k}'")
            });
        }
        Ok(())
    }
}

pub enum ChildSpec {
    Reference(String),
    Options(Map<String, Value>),
}

/// Why a size did not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeError {
    /// Not a number.
    Invalid,
    /// A number, but negative or too large.
    Range,
}

/// A size as QEMU reads one (`qemu_strtosz`): decimal or `0x` hex, an optional binary suffix
/// (b k M G T P E, any case), a fraction only with a suffix other than b, rounded to the
/// nearest byte; negative or ≥ 2^64 is out of range. The one size parser of the project:
/// blockd-img's `cvtnum` adds qemu-img's 2^63 limit on top.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    if let Some(pos) = t.strip_prefix('-') {
        // A valid-looking negative number is a range error, garbage is invalid.
        return match parse_size(pos) {
            Err(SizeError::Invalid) => Err(SizeError::Invalid),
            _ => Err(SizeError::Range),
        };
    }
    let (num, mult) = match t.char_indices().last() {
        None => return Err(SizeError::Invalid),
        Some((i, c))
            if c.is_ascii_alphabetic() && !(t.starts_with("0x") && c.is_ascii_hexdigit()) =>
        {
            let m: u64 = match c.to_ascii_lowercase() {
                'b' => 1,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                'p' => 1 << 50,
                'e' => 1 << 60,
                _ => return Err(SizeError::Invalid),
            };
            (&t[..i], m)
        }
        Some(_) => (t, 1),
    };
    let num = num.strip_prefix('+').unwrap_or(num);
    if num.is_empty() {
        return Err(SizeError::Invalid);
    }
    let v: u128 = if let Some(h) = num.strip_prefix("0x").or_else(|| num.strip_prefix("0X")) {
        if h.is_empty() || !h.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(SizeError::Invalid);
        }
        let x = u128::from_str_radix(h, 16).map_err(|_| SizeError::Range)?;
        x.saturating_mul(mult as u128)
    } else if num.chars().all(|c| c.is_ascii_digit()) {
        let x: u128 = num.parse().map_err(|_| SizeError::Range)?;
        x.saturating_mul(mult as u128)
    } else {
        let ok = num.chars().all(|c| c.is_ascii_digit() || c == '.')
            && num.matches('.').count() == 1
            && num.chars().any(|c| c.is_ascii_digit());
        if !ok || mult == 1 {
            return Err(SizeError::Invalid);
        }
        let f: f64 = num.parse().map_err(|_| SizeError::Invalid)?;
        let v = (f * mult as f64).round();
        if v >= 18446744073709551616.0 {
            return Err(SizeError::Range);
        }
        v as u128
    };
    u64::try_from(v).map_err(|_| SizeError::Range)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotted_and_json_agree() {
        let a = parse("driver=raw,file.driver=file,file.filename=/x,,y,cache.direct=on").unwrap();
        let b = parse(r#"{"driver":"raw","file":{"driver":"file","filename":"/x,y"},"cache":{"direct":"on"}}"#).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn values_and_errors() {
        let mut o = Opts::new(parse("size=1G,read-zeroes=on,bad=x,n=12").unwrap());
        assert_eq!(o.take_size("size").unwrap(), Some(1 << 30));
        assert_eq!(o.take_bool("read-zeroes").unwrap(), Some(true));
        assert_eq!(o.take_u64("n").unwrap(), Some(12));
        assert_eq!(
            o.finish("null-co", false).unwrap_err(),
            "Block protocol 'null-co' doesn't support the option 'bad'"
        );
        let mut o = Opts::new(parse("direct=maybe,offset=abc").unwrap());
        assert_eq!(
            o.take_bool("direct").unwrap_err(),
            "Parameter 'direct' expects 'on' or 'off'"
        );
        assert!(
            o.take_size("offset")
                .unwrap_err()
                .starts_with("Parameter 'offset' expects a non-negative number below 2^64")
        );
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert_eq!(parse_size("0x10"), Ok(16));
        assert_eq!(parse_size("1.5"), Err(SizeError::Invalid));
        assert_eq!(parse_size("-1"), Err(SizeError::Range));
        assert_eq!(parse_size("15E"), Ok(15 << 60));
        assert_eq!(parse_size("16E"), Err(SizeError::Range));
    }
}
