//! Argument schemas: each command declares its arguments as QAPI-like types, and the monitor
//! checks a request against them before the handler runs (so a wrong type, an unknown or a
//! missing argument never reaches a handler, and nothing has happened when it is refused).
//! The same declarations produce `query-qmp-schema`.

use std::collections::BTreeSet;
use std::rc::Rc;

use serde_json::{Map, Value, json};

/// A QAPI type.
#[derive(Debug, Clone)]
pub enum Type {
    Str,
    Int,
    /// a size (uint64 in QAPI)
    Size,
    Bool,
    Number,
    Null,
    /// any JSON value
    Any,
    Enum(Rc<EnumDef>),
    Array(Box<Type>),
    Object(Rc<ObjectDef>),
    /// one of several types, told apart by their JSON type (QAPI "alternate")
    Alternate(Rc<Vec<Type>>),
}

#[derive(Debug)]
pub struct EnumDef {
    pub values: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Member {
    pub name: String,
    pub ty: Type,
    pub optional: bool,
}

/// A struct, or a flat union when `union` is set.
#[derive(Debug, Default)]
pub struct ObjectDef {
    pub members: Vec<Member>,
    pub union: Option<Union>,
    /// members beyond the declared ones are handed to the handler unchecked (a variant whose
    /// options the handler's own code validates)
    pub open: bool,
}

#[derive(Debug)]
pub struct Union {
    /// the enum member of `members` that selects the variant
    pub tag: String,
    pub variants: Vec<(String, Rc<ObjectDef>)>,
}

impl Type {
    pub fn enumeration<S: AsRef<str>>(values: &[S]) -> Type {
        Type::Enum(Rc::new(EnumDef {
            values: values.iter().map(|s| s.as_ref().to_string()).collect(),
        }))
    }
    pub fn array(t: Type) -> Type {
        Type::Array(Box::new(t))
    }
    pub fn object(members: Vec<Member>) -> Type {
        Type::Object(Rc::new(ObjectDef {
            members,
            union: None,
            open: false,
        }))
    }

    /// The JSON type named in "Invalid parameter type" errors.
    fn json_type(&self) -> &'static str {
        match self {
            Type::Str | Type::Enum(_) => "string",
            Type::Int | Type::Size => "integer",
            Type::Bool => "boolean",
            Type::Number => "number",
            Type::Null => "null",
            Type::Any => "value",
            Type::Array(_) => "array",
            Type::Object(_) => "object",
            Type::Alternate(_) => "value",
        }
    }

    fn matches_json(&self, v: &Value) -> bool {
        match (self, v) {
            (Type::Str | Type::Enum(_), Value::String(_)) => true,
            (Type::Int, Value::Number(n)) => n.is_i64() || n.is_u64(),
            (Type::Size, Value::Number(n)) => n.is_u64(),
            (Type::Bool, Value::Bool(_)) => true,
            (Type::Number, Value::Number(_)) => true,
            (Type::Null, Value::Null) => true,
            (Type::Any, _) => true,
            (Type::Array(_), Value::Array(_)) => true,
            (Type::Object(_), Value::Object(_)) => true,
            (Type::Alternate(alts), v) => alts.iter().any(|a| a.matches_json(v)),
            _ => false,
        }
    }
}

pub fn member(name: &str, ty: Type) -> Member {
    Member {
        name: name.into(),
        ty,
        optional: false,
    }
}

pub fn optional(name: &str, ty: Type) -> Member {
    Member {
        name: name.into(),
        ty,
        optional: true,
    }
}

fn path(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Check `v` (found at `name`) against `ty`, with QEMU's messages.
pub fn check(ty: &Type, v: &Value, name: &str) -> Result<(), String> {
    if !ty.matches_json(v) {
        // QEMU's shorthand for a named parameter of an unnamed (top-level) value.
        let shown = if name.is_empty() { "null" } else { name };
        return Err(format!(
            "Invalid parameter type for '{shown}', expected: {}",
            ty.json_type()
        ));
    }
    match (ty, v) {
        (Type::Enum(e), Value::String(s)) if !e.values.iter().any(|x| x == s) => {
            return Err(format!("Parameter '{name}' does not accept value '{s}'"));
        }
        (Type::Array(t), Value::Array(a)) => {
            for (i, e) in a.iter().enumerate() {
                // QEMU names array elements by the list's own name only in this message
                // (its "Parameter 'null'" quirk for top-level arrays included).
                let n = if let Type::Enum(_) = **t {
                    "null".to_string()
                } else {
                    format!("{name}[{i}]")
                };
                check(t, e, &n)?;
            }
        }
        (Type::Object(o), Value::Object(m)) => check_object(o, m, name)?,
        (Type::Alternate(alts), v) => {
            if let Some(t) = alts.iter().find(|a| a.matches_json(v)) {
                check(t, v, name)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Check the members of an object (the arguments of a command are one).
pub fn check_object(o: &ObjectDef, m: &Map<String, Value>, prefix: &str) -> Result<(), String> {
    let mut known: Vec<&str> = Vec::new();
    let mut open = o.open;
    check_members(&o.members, m, prefix, &mut known)?;
    if let Some(u) = &o.union {
        let tag = m.get(&u.tag).and_then(Value::as_str).unwrap_or("");
        if let Some((_, variant)) = u.variants.iter().find(|(n, _)| n == tag) {
            check_members(&variant.members, m, prefix, &mut known)?;
            open |= variant.open;
        }
    }
    if !open && let Some(k) = m.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!("Parameter '{}' is unexpected", path(prefix, k)));
    }
    Ok(())
}

fn check_members<'a>(
    members: &'a [Member],
    m: &Map<String, Value>,
    prefix: &str,
    known: &mut Vec<&'a str>,
) -> Result<(), String> {
    for mem in members {
        known.push(&mem.name);
        match m.get(&mem.name) {
            Some(v) => check(&mem.ty, v, &path(prefix, &mem.name))?,
            None if mem.optional => {}
            None => {
                return Err(format!(
                    "Parameter '{}' is missing",
                    path(prefix, &mem.name)
                ));
            }
        }
    }
    Ok(())
}

/// Builds `query-qmp-schema`'s SchemaInfo list. Type names other than builtins are masked
/// as numbers, as QEMU does.
#[derive(Default)]
pub struct Introspector {
    entries: Vec<Value>,
    builtins: BTreeSet<String>,
    next: usize,
}

impl Introspector {
    fn builtin(&mut self, name: &str, json_type: &str) -> String {
        if self.builtins.insert(name.to_string()) {
            self.entries
                .push(json!({"name": name, "meta-type": "builtin", "json-type": json_type}));
        }
        name.to_string()
    }

    fn fresh(&mut self) -> String {
        let n = self.next.to_string();
        self.next += 1;
        n
    }

    /// The schema name of `ty`, adding its definition if needed.
    pub fn type_name(&mut self, ty: &Type) -> String {
        match ty {
            Type::Str => self.builtin("str", "string"),
            Type::Int => self.builtin("int", "int"),
            Type::Size => self.builtin("size", "int"),
            Type::Bool => self.builtin("bool", "boolean"),
            Type::Number => self.builtin("number", "number"),
            Type::Null => self.builtin("null", "null"),
            Type::Any => self.builtin("any", "value"),
            Type::Enum(e) => {
                let name = self.fresh();
                self.entries.push(json!({
                    "name": name,
                    "meta-type": "enum",
                    "members": e.values.iter().map(|v| json!({"name": v})).collect::<Vec<_>>(),
                    "values": e.values,
                }));
                name
            }
            Type::Array(t) => {
                let el = self.type_name(t);
                let name = format!("[{el}]");
                if !self.entries.iter().any(|e| e["name"] == name) {
                    self.entries
                        .push(json!({"name": name, "meta-type": "array", "element-type": el}));
                }
                name
            }
            Type::Object(o) => self.object(o),
            Type::Alternate(alts) => {
                let name = self.fresh();
                let members: Vec<Value> = alts
                    .iter()
                    .map(|t| json!({"type": self.type_name(t)}))
                    .collect();
                self.entries
                    .push(json!({"name": name, "meta-type": "alternate", "members": members}));
                name
            }
        }
    }

    pub fn object(&mut self, o: &ObjectDef) -> String {
        let name = self.fresh();
        let members = self.members(&o.members);
        let mut entry = json!({"name": name, "meta-type": "object", "members": members});
        if let Some(u) = &o.union {
            let variants: Vec<Value> = u
                .variants
                .iter()
                .map(|(case, def)| json!({"case": case, "type": self.object(def)}))
                .collect();
            entry["tag"] = json!(u.tag);
            entry["variants"] = json!(variants);
        }
        self.entries.push(entry);
        name
    }

    fn members(&mut self, members: &[Member]) -> Vec<Value> {
        members
            .iter()
            .map(|m| {
                let mut e = json!({"name": m.name, "type": self.type_name(&m.ty)});
                if m.optional {
                    e["default"] = Value::Null;
                }
                e
            })
            .collect()
    }

    pub fn command(&mut self, name: &str, args: &ObjectDef, ret: &Type) {
        let arg_type = self.object(args);
        let ret_type = self.type_name(ret);
        let mut e = json!({
            "name": name, "meta-type": "command", "arg-type": arg_type, "ret-type": ret_type,
        });
        if name.starts_with("x-") {
            // QEMU marks its experimental commands so in the schema
            e["features"] = json!(["unstable"]);
        }
        self.entries.push(e);
    }

    pub fn event(&mut self, name: &str, data: &ObjectDef) {
        let arg_type = self.object(data);
        self.entries
            .push(json!({"name": name, "meta-type": "event", "arg-type": arg_type}));
    }

    pub fn finish(self) -> Value {
        Value::Array(self.entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resize_args() -> ObjectDef {
        ObjectDef {
            members: vec![
                optional("device", Type::Str),
                optional("node-name", Type::Str),
                member("size", Type::Int),
            ],
            ..Default::default()
        }
    }

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn qemu_messages() {
        let o = resize_args();
        assert_eq!(
            check_object(&o, &args(json!({"node-name": 1, "size": 2})), ""),
            Err("Invalid parameter type for 'node-name', expected: string".into())
        );
        assert_eq!(
            check_object(&o, &args(json!({"node-name": "x"})), ""),
            Err("Parameter 'size' is missing".into())
        );
        assert_eq!(
            check_object(&o, &args(json!({"size": 1, "zz": 1})), ""),
            Err("Parameter 'zz' is unexpected".into())
        );
        assert_eq!(check_object(&o, &args(json!({"size": 1})), ""), Ok(()));
        let e = Type::array(Type::enumeration(&["oob"]));
        assert_eq!(
            check(&e, &json!(["x"]), "enable"),
            Err("Parameter 'null' does not accept value 'x'".into())
        );
        let nested = Type::object(vec![member(
            "cache",
            Type::object(vec![optional("direct", Type::Bool)]),
        )]);
        assert_eq!(
            check(&nested, &json!({"cache": {"direct": "on"}}), ""),
            Err("Invalid parameter type for 'cache.direct', expected: boolean".into())
        );
    }

    #[test]
    fn union_variants() {
        let variant = Rc::new(ObjectDef {
            members: vec![member("filename", Type::Str)],
            ..Default::default()
        });
        let o = ObjectDef {
            members: vec![member("driver", Type::enumeration(&["file", "other"]))],
            union: Some(Union {
                tag: "driver".into(),
                variants: vec![
                    ("file".into(), variant),
                    (
                        "other".into(),
                        Rc::new(ObjectDef {
                            open: true,
                            ..Default::default()
                        }),
                    ),
                ],
            }),
            open: false,
        };
        assert_eq!(
            check_object(&o, &args(json!({"driver": "file"})), ""),
            Err("Parameter 'filename' is missing".into())
        );
        assert_eq!(
            check_object(&o, &args(json!({"driver": "nul"})), ""),
            Err("Parameter 'driver' does not accept value 'nul'".into())
        );
        assert_eq!(
            check_object(&o, &args(json!({"driver": "other", "x": 1})), ""),
            Ok(())
        );
        let mut i = Introspector::default();
        i.command("blockdev-add", &o, &Type::object(vec![]));
        let s = i.finish();
        assert!(
            s.as_array()
                .unwrap()
                .iter()
                .any(|e| e["name"] == "blockdev-add" && e["meta-type"] == "command")
        );
    }
}
