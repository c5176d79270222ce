//! `true`, `false` or `auto`: the tri-state of features that turn on when their environment allows.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A feature switch: forced on, forced off, or decided from what the agent finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Switch {
    /// Decide at start-up (e.g. GPU collection when NVML loads).
    #[default]
    Auto,
    /// Always on; failing to start the feature is an error.
    On,
    /// Always off.
    Off,
}

impl Serialize for Switch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Switch::Auto => s.serialize_str("auto"),
            Switch::On => s.serialize_bool(true),
            Switch::Off => s.serialize_bool(false),
        }
    }
}

impl<'de> Deserialize<'de> for Switch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Switch, D::Error> {
        struct SwitchVisitor;
        impl Visitor<'_> for SwitchVisitor {
            type Value = Switch;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("true, false or auto")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Switch, E> {
                Ok(if v { Switch::On } else { Switch::Off })
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Switch, E> {
                match v {
                    "auto" => Ok(Switch::Auto),
                    "true" => Ok(Switch::On),
                    "false" => Ok(Switch::Off),
                    other => Err(E::invalid_value(de::Unexpected::Str(other), &self)),
                }
            }
        }
        d.deserialize_any(SwitchVisitor)
    }
}
