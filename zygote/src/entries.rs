//! The allowlist of entries a zygote can start, fixed when it starts. A spawn request names
//! one of these; no request carries a path or a command.

use std::collections::BTreeMap;
use std::path::PathBuf;

use zygote_runtime::protocol::EntryInfo;
use zygote_runtime::Worker;

/// A native entry: a function in the zygote's binary, run in the forked child without exec.
/// It returns the child's exit code.
pub type NativeEntry = fn(Worker) -> i32;

/// One entry of the allowlist.
#[derive(Debug, Clone)]
pub enum Entry {
    Native(NativeEntry),
    /// The weights owner: a native entry the zygote knows by this kind, not by its name. At
    /// most one lives per device, only the service's own uid may spawn it, and only it may
    /// leave weights with the zygote (`keep_weights`).
    Owner(NativeEntry),
    /// A program exec'd in the child, with fixed arguments (request arguments are appended).
    Exec {
        program: PathBuf,
        args: Vec<String>,
    },
}

impl Entry {
    /// The function a native entry (the owner included) runs; `None` for the exec entry.
    pub fn native(&self) -> Option<NativeEntry> {
        match self {
            Self::Native(f) | Self::Owner(f) => Some(*f),
            Self::Exec { .. } => None,
        }
    }

    /// Whether this is the weights owner.
    pub fn is_owner(&self) -> bool {
        matches!(self, Self::Owner(_))
    }
}

/// The allowlist.
#[derive(Debug, Clone, Default)]
pub struct EntryTable {
    entries: BTreeMap<String, Entry>,
}

impl EntryTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `name`. A later insert of the same name replaces the earlier one.
    pub fn insert(&mut self, name: &str, entry: Entry) {
        self.entries.insert(name.to_string(), entry);
    }

    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name)
    }

    /// The names and kinds, for `hello`.
    pub fn describe(&self) -> Vec<EntryInfo> {
        self.entries
            .iter()
            .map(|(name, e)| EntryInfo {
                name: name.clone(),
                kind: match e {
                    Entry::Native(_) | Entry::Owner(_) => "native".into(),
                    Entry::Exec { .. } => "exec".into(),
                },
            })
            .collect()
    }
}
