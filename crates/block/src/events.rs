//! Events the block layer and its drivers report (QMP's BLOCK_IMAGE_CORRUPTED,
//! BLOCK_IO_ERROR), from any thread, to whoever installed a sink: blockd-storage-daemon
//! forwards them to its QMP monitors; programs without a monitor install none and the events
//! are dropped.

use std::sync::RwLock;

use serde_json::{Value, json};

pub type Sink = Box<dyn Fn(&str, Value) + Send + Sync>;

static SINK: RwLock<Option<Sink>> = RwLock::new(None);

/// Install the process's event sink (replacing any earlier one).
pub fn set_sink(sink: Sink) {
    if let Ok(mut s) = SINK.write() {
        *s = Some(sink);
    }
}

/// Report an event with QMP's name and data.
pub fn emit(name: &str, data: Value) {
    if let Ok(s) = SINK.read()
        && let Some(sink) = &*s
    {
        sink(name, data);
    }
}

/// BLOCK_IMAGE_CORRUPTED for a format node whose metadata was found inconsistent (`fatal`:
/// the image was marked corrupt and is no longer written).
pub fn image_corrupted(
    node_name: &str,
    msg: &str,
    offset: Option<u64>,
    size: Option<u64>,
    fatal: bool,
) {
    let mut d = json!({"device": "", "node-name": node_name, "msg": msg, "fatal": fatal});
    if let Some(o) = offset {
        d["offset"] = json!(o);
    }
    if let Some(s) = size {
        d["size"] = json!(s);
    }
    emit("BLOCK_IMAGE_CORRUPTED", d);
}

/// BLOCK_IO_ERROR for a request of a BlockBackend that reports errors (action `report`):
/// `device` is the backend's name ("" if none), `operation` "read" or "write". The QMP
/// server rate-limits it per node, as QEMU does.
pub fn block_io_error(device: &str, node_name: &str, operation: &str, err: &std::io::Error) {
    emit(
        "BLOCK_IO_ERROR",
        json!({
            "qom-path": "",
            "device": device,
            "node-name": node_name,
            "operation": operation,
            "action": "report",
            "nospace": err.raw_os_error() == Some(libc::ENOSPC),
            "reason": crate::strerror(err),
        }),
    );
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    #[test]
    fn reaches_the_sink() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        super::set_sink(Box::new(move |n, d| {
            g.lock().unwrap().push((n.to_string(), d))
        }));
        std::thread::spawn(|| super::image_corrupted("q", "bad L2", Some(512), None, true))
            .join()
            .unwrap();
        let got = got.lock().unwrap();
        assert_eq!(got[0].0, "BLOCK_IMAGE_CORRUPTED");
        assert_eq!(got[0].1["node-name"], "q");
        assert_eq!(got[0].1["offset"], 512);
        assert!(got[0].1.get("size").is_none());
    }
}
