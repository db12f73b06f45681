//! A CBOR value that refuses a map holding the same key twice.
//!
//! `serde_cbor::Value` keeps map members in a `BTreeMap`, so of two equal keys only the last
//! survives: a frame could say two things about one field and have the zygote believe either.
//! Frames are therefore decoded into [`StrictValue`] first, which builds the same `Value` but
//! fails at the first repeated key, at any depth (as the safetensors header parser refuses
//! repeated JSON keys).

use std::collections::btree_map::{BTreeMap, Entry};
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_cbor::Value;

/// A decoded CBOR value in which no map repeats a key.
#[derive(Debug, Clone, PartialEq)]
pub struct StrictValue(pub Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any CBOR value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Integer(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Integer(v.into()))
    }
    fn visit_i128<E>(self, v: i128) -> Result<Value, E> {
        Ok(Value::Integer(v))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        i128::try_from(v)
            .map(Value::Integer)
            .map_err(|_| E::custom("integer out of range"))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Text(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::Text(v))
    }
    fn visit_bytes<E>(self, v: &[u8]) -> Result<Value, E> {
        Ok(Value::Bytes(v.to_vec()))
    }
    fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Value, E> {
        Ok(Value::Bytes(v))
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        StrictValue::deserialize(d).map(|v| v.0)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut members = BTreeMap::new();
        while let Some(StrictValue(key)) = map.next_key()? {
            let StrictValue(value) = map.next_value()?;
            match members.entry(key) {
                Entry::Vacant(slot) => {
                    slot.insert(value);
                }
                Entry::Occupied(taken) => {
                    return Err(de::Error::custom(format_args!(
                        "map key {} appears more than once",
                        shown(taken.key())
                    )))
                }
            }
        }
        Ok(Value::Map(members))
    }
}

/// A map key for an error message: text quoted, anything else as CBOR's debug form.
fn shown(key: &Value) -> String {
    match key {
        Value::Text(t) => format!("{t:?}"),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `{"a": 1, "a": 2}` written by hand: a CBOR encoder of a map type cannot produce it.
    const TWICE: [u8; 7] = [0xa2, 0x61, b'a', 0x01, 0x61, b'a', 0x02];

    #[test]
    fn a_repeated_key_is_refused_at_any_depth() {
        let e = serde_cbor::from_slice::<StrictValue>(&TWICE).unwrap_err();
        assert!(
            e.to_string().contains("\"a\" appears more than once"),
            "{e}"
        );
        // The same map inside an array inside a map.
        let mut nested = vec![0xa1, 0x61, b'x', 0x81];
        nested.extend_from_slice(&TWICE);
        assert!(serde_cbor::from_slice::<StrictValue>(&nested).is_err());
        // serde_cbor's own Value keeps the last one silently: the reason this type exists.
        let lax: Value = serde_cbor::from_slice(&TWICE).unwrap();
        assert_eq!(
            lax,
            Value::Map([(Value::Text("a".into()), Value::Integer(2))].into())
        );
    }

    #[test]
    fn values_without_repeats_decode_as_serde_cbor_would() {
        let v = Value::Map(
            [
                (Value::Text("id".into()), Value::Integer(7)),
                (
                    Value::Text("args".into()),
                    Value::Array(vec![Value::Text("-v".into()), Value::Null]),
                ),
                (Value::Integer(3), Value::Bytes(vec![1, 2])),
                (Value::Text("f".into()), Value::Float(0.5)),
                (Value::Text("b".into()), Value::Bool(true)),
            ]
            .into(),
        );
        let bytes = serde_cbor::to_vec(&v).unwrap();
        assert_eq!(serde_cbor::from_slice::<StrictValue>(&bytes).unwrap().0, v);
    }
}
