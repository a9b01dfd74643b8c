//! QMP error replies: QEMU's error classes and a description meant for humans.

use serde_json::{Value, json};

/// QEMU's `QapiErrorClass`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotActive,
    DeviceNotFound,
    KVMMissingCap,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    pub fn generic(desc: impl Into<String>) -> QmpError {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }
    pub fn command_not_found(desc: impl Into<String>) -> QmpError {
        QmpError {
            class: ErrorClass::CommandNotFound,
            desc: desc.into(),
        }
    }
    pub fn device_not_found(desc: impl Into<String>) -> QmpError {
        QmpError {
            class: ErrorClass::DeviceNotFound,
            desc: desc.into(),
        }
    }

    /// The `{"class": ..., "desc": ...}` object.
    pub fn to_json(&self) -> Value {
        json!({"class": self.class.as_str(), "desc": self.desc})
    }
}

impl From<String> for QmpError {
    fn from(s: String) -> QmpError {
        QmpError::generic(s)
    }
}

impl From<&str> for QmpError {
    fn from(s: &str) -> QmpError {
        QmpError::generic(s)
    }
}

impl std::fmt::Display for QmpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.desc)
    }
}

impl std::error::Error for QmpError {}
