//! The element types of safetensors, their names and sizes.

use std::fmt;

/// Element types of safetensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    F8E4M3,
    F8E5M2,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    I64,
    U64,
    F64,
}

impl Dtype {
    /// Every dtype, in the order of their element size.
    pub const ALL: [Dtype; 15] = [
        Self::Bool,
        Self::U8,
        Self::I8,
        Self::F8E4M3,
        Self::F8E5M2,
        Self::I16,
        Self::U16,
        Self::F16,
        Self::BF16,
        Self::I32,
        Self::U32,
        Self::F32,
        Self::I64,
        Self::U64,
        Self::F64,
    ];

    /// Parses a safetensors dtype name (`"F16"`); the error is the unknown name.
    pub fn parse(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| s.to_string())
    }

    /// The safetensors name of the dtype.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Bool => "BOOL",
            Self::U8 => "U8",
            Self::I8 => "I8",
            Self::F8E4M3 => "F8_E4M3",
            Self::F8E5M2 => "F8_E5M2",
            Self::I16 => "I16",
            Self::U16 => "U16",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::I32 => "I32",
            Self::U32 => "U32",
            Self::F32 => "F32",
            Self::I64 => "I64",
            Self::U64 => "U64",
            Self::F64 => "F64",
        }
    }

    /// Bytes per element.
    pub fn size(&self) -> usize {
        match self {
            Self::Bool | Self::U8 | Self::I8 | Self::F8E4M3 | Self::F8E5M2 => 1,
            Self::I16 | Self::U16 | Self::F16 | Self::BF16 => 2,
            Self::I32 | Self::U32 | Self::F32 => 4,
            Self::I64 | Self::U64 | Self::F64 => 8,
        }
    }

    /// The known names, comma separated (for error messages).
    pub(crate) fn known_names() -> String {
        Self::ALL.map(|d| d.as_str()).join(", ")
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// On the wire (manifests) a dtype is its safetensors name, `"F32"`.
impl serde::Serialize for Dtype {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Dtype {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Dtype::parse(&name).map_err(|name| {
            serde::de::Error::custom(format_args!(
                "unknown dtype {name:?} (known: {})",
                Dtype::known_names()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dtype_travels_as_its_safetensors_name_and_unknown_names_are_refused() {
        for d in Dtype::ALL {
            let text = serde_json::to_string(&d).unwrap();
            assert_eq!(text, format!("{:?}", d.as_str()));
            assert_eq!(serde_json::from_str::<Dtype>(&text).unwrap(), d);
        }
        let e = serde_json::from_str::<Dtype>("\"Q4\"").unwrap_err();
        assert!(e.to_string().contains("unknown dtype \"Q4\""), "{e}");
    }
}
