//! `human-monitor-command`: the human monitor's `qemu-io [-d] NODE "COMMAND"`.
//!
//! A temporary BlockBackend is attached to the node on the main context, the command runs
//! through blockd-io's engine on the context the node's I/O belongs to (its iothread, after
//! `x-blockdev-set-iothread`, or the main context), and the backend is detached again on the
//! main context. Everything is awaited; the monitor goes on serving other clients meanwhile.
//! As in QEMU, the command's output (errors included) is the command's return value, with
//! CRLF line ends.

use std::rc::Rc;

use blockd_block::Perm;
use blockd_qmp::QmpError;
use serde_json::{Map, Value, json};

use crate::state::{Busy, Daemon};

/// Split an HMP command line: words, with `"..."` quoting and backslash escapes in quotes.
fn hmp_words(line: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&c) = chars.peek() else { break };
        let mut w = String::new();
        if c == '"' {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err("unterminated string literal".into()),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some('n') => w.push('\n'),
                        Some('r') => w.push('\r'),
                        Some(c) => w.push(c),
                        None => return Err("unterminated string literal".into()),
                    },
                    Some(c) => w.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                w.push(c);
                chars.next();
            }
        }
        out.push(w);
    }
    Ok(out)
}

fn crlf(s: &str) -> String {
    s.replace("\r\n", "\n").replace('\n', "\r\n")
}

pub async fn human_monitor_command(
    d: Rc<Daemon>,
    args: Map<String, Value>,
) -> Result<Value, QmpError> {
    let line = args
        .get("command-line")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let words = match hmp_words(&line) {
        Ok(w) => w,
        Err(e) => return Ok(json!(crlf(&format!("{e}\n")))),
    };
    let Some(cmd) = words.first() else {
        return Ok(json!(""));
    };
    if cmd != "qemu-io" {
        return Ok(json!(crlf(&format!("unknown command: '{cmd}'\n"))));
    }
    let mut rest = &words[1..];
    if rest.first().map(String::as_str) == Some("-d") {
        // -d names a guest device; the storage daemon has none
        let dev = rest.get(1).cloned().unwrap_or_default();
        return Ok(json!(crlf(&format!("Error: Device '{dev}' not found\n"))));
    }
    if rest.len() < 2 {
        return Ok(json!(crlf("qemu-io: missing parameter\n")));
    }
    let node_name = rest[0].clone();
    let io_cmd = rest[1].clone();
    rest = &rest[2..];
    if !rest.is_empty() {
        return Ok(json!(crlf("qemu-io: too many parameters\n")));
    }
    let Some(node) = d.node(&node_name) else {
        return Ok(json!(crlf(&format!(
            "Error: Cannot find device='' nor node-name='{node_name}'\n"
        ))));
    };
    // qemu-io's commands take the permissions they need; a monitor backend asks up front for
    // all it can get and shares everything (`resize` only where no other user keeps the size
    // fixed, as an NBD export does: then only `truncate` fails).
    let perm = if node.is_read_only() {
        Perm::CONSISTENT_READ
    } else {
        Perm::CONSISTENT_READ | Perm::WRITE
    };
    let backend = {
        let g = d.graph.borrow();
        let with_resize = (perm != Perm::CONSISTENT_READ)
            .then(|| {
                g.new_backend("", &node, perm | Perm::RESIZE, Perm::ALL)
                    .ok()
            })
            .flatten();
        match with_resize.map_or_else(|| g.new_backend("", &node, perm, Perm::ALL), Ok) {
            Ok(b) => b,
            Err(e) => return Ok(json!(crlf(&format!("Error: {e}\n")))),
        }
    };
    let _busy = Busy::new(&d);
    let (out, backend) = match d.node_context(&node_name) {
        Some((id, h)) => {
            let (n, l) = (node.clone(), io_cmd.clone());
            let keep = backend.clone();
            match h
                .spawn(move || async move { blockd_io::monitor::run_command(backend, n, &l).await })
                .await
            {
                Ok(r) => r,
                Err(_) => (format!("Error: iothread '{id}' stopped\n"), Some(keep)),
            }
        }
        None => blockd_io::monitor::run_command(backend, node.clone(), &io_cmd).await,
    };
    if let Some(b) = backend {
        b.detach(&d.graph.borrow());
    }
    Ok(json!(crlf(&out)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn words() {
        assert_eq!(
            super::hmp_words(r#"qemu-io n0 "write -P 0x11 0 64k""#).unwrap(),
            vec!["qemu-io", "n0", "write -P 0x11 0 64k"]
        );
        assert!(super::hmp_words(r#"qemu-io n0 "write"#).is_err());
    }
}
