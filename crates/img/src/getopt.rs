//! GNU `getopt_long` as qemu-img uses it: short options (clustered, argument attached or in the
//! next word), long options (`--opt=val` or `--opt val`, unique prefixes), non-options permuted
//! to the end, `--` ends options. Error texts are glibc's.

#[derive(Clone, Copy)]
pub struct LongOpt {
    pub name: &'static str,
    pub has_arg: bool,
    /// The short option it stands for, or a pseudo-code >= 256.
    pub code: u32,
}

/// A long option, for the `const` option tables of the commands.
pub const fn lo(name: &'static str, has_arg: bool, code: u32) -> LongOpt {
    LongOpt {
        name,
        has_arg,
        code,
    }
}

pub struct Parsed {
    pub opts: Vec<(u32, Option<String>)>,
    pub args: Vec<String>,
}

/// Parse `argv` (without the command name). `short` is a getopt string ("hc:d:"). `prog` is the
/// prefix of error messages ("qemu-img bench"). Errors carry glibc's message.
pub fn parse(argv: &[String], short: &str, long: &[LongOpt], prog: &str) -> Result<Parsed, String> {
    let mut opts = Vec::new();
    let mut args = Vec::new();
    let sb = short.as_bytes();
    let short_arg = |c: u8| -> Option<bool> {
        let i = sb.iter().position(|&x| x == c && x != b':')?;
        Some(sb.get(i + 1) == Some(&b':'))
    };
    let mut i = 0;
    while i < argv.len() {
        let a = &argv[i];
        i += 1;
        if a == "--" {
            args.extend(argv[i..].iter().cloned());
            break;
        }
        if let Some(body) = a.strip_prefix("--") {
            let (name, val) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (body, None),
            };
            let exact = long.iter().find(|l| l.name == name);
            let lo = match exact {
                Some(l) => *l,
                None => {
                    let cands: Vec<&LongOpt> =
                        long.iter().filter(|l| l.name.starts_with(name)).collect();
                    match cands.len() {
                        0 => return Err(format!("{prog}: unrecognized option '--{name}'")),
                        1 => *cands[0],
                        _ => {
                            let list: Vec<String> =
                                cands.iter().map(|l| format!("'--{}'", l.name)).collect();
                            return Err(format!(
                                "{prog}: option '--{name}' is ambiguous; possibilities: {}",
                                list.join(" ")
                            ));
                        }
                    }
                }
            };
            if lo.has_arg {
                let v = match val {
                    Some(v) => v,
                    None => {
                        if i < argv.len() {
                            i += 1;
                            argv[i - 1].clone()
                        } else {
                            return Err(format!(
                                "{prog}: option '--{}' requires an argument",
                                lo.name
                            ));
                        }
                    }
                };
                opts.push((lo.code, Some(v)));
            } else {
                if val.is_some() {
                    return Err(format!(
                        "{prog}: option '--{}' doesn't allow an argument",
                        lo.name
                    ));
                }
                opts.push((lo.code, None));
            }
            continue;
        }
        if a.len() > 1 && a.starts_with('-') {
            let b = a.as_bytes();
            let mut j = 1;
            while j < b.len() {
                let c = b[j];
                j += 1;
                match short_arg(c) {
                    None => {
                        return Err(format!("{prog}: invalid option -- '{}'", char::from(c)));
                    }
                    Some(false) => opts.push((c as u32, None)),
                    Some(true) => {
                        let v = if j < b.len() {
                            let v = a[j..].to_string();
                            j = b.len();
                            v
                        } else if i < argv.len() {
                            i += 1;
                            argv[i - 1].clone()
                        } else {
                            return Err(format!(
                                "{prog}: option requires an argument -- '{}'",
                                char::from(c)
                            ));
                        };
                        opts.push((c as u32, Some(v)));
                    }
                }
            }
            continue;
        }
        args.push(a.clone());
    }
    Ok(Parsed { opts, args })
}
