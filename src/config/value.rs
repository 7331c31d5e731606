//! A TOML tree that remembers where each value came from, so problems can name a line.
//!
//! `toml::Value` drops positions; serde's derive stops at the first error. Walking this
//! tree by hand lets the loader report every problem with its line.

use std::fmt;
use std::ops::Range;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// toml hands a datetime to `deserialize_any` as a one-entry map under a private key.
const DATETIME_KEY_PREFIX: &str = "$__toml_private";

// The protocol by which toml hands out positions (what `toml::Spanned` asks for). Asked
// for by hand because `toml::Spanned` fails on tables that have no position, such as
// `databases` implied by a `[databases.app]` header.
const SPANNED_NAME: &str = "$__serde_spanned_private_Spanned";
const SPANNED_START: &str = "$__serde_spanned_private_start";
const SPANNED_END: &str = "$__serde_spanned_private_end";
const SPANNED_VALUE: &str = "$__serde_spanned_private_value";
const SPANNED_FIELDS: [&str; 3] = [SPANNED_START, SPANNED_END, SPANNED_VALUE];

/// A value and, when the parser knows it, where it is.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Node {
    value: Value,
    span: Option<Span>,
}

impl Node {
    /// A value made by another reader (the PgBouncer ini reader), located at `span`.
    pub(super) fn new(value: Value, span: Option<Span>) -> Node {
        Node { value, span }
    }

    pub(super) fn get_ref(&self) -> &Value {
        &self.value
    }

    pub(super) fn into_inner(self) -> Value {
        self.value
    }

    pub(super) fn span(&self) -> Option<Span> {
        self.span.clone()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Value {
    String(String),
    Integer(i64),
    Float(f64),
    Boolean(bool),
    Datetime(String),
    Array(Vec<Node>),
    /// Entries in document order, so problems come out in the order the user reads them.
    Table(Vec<(String, Node)>),
}

impl Value {
    /// How a problem message names what was found.
    pub(super) fn type_name(&self) -> &'static str {
        match self {
            Value::String(_) => "a string",
            Value::Integer(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Boolean(_) => "a boolean",
            Value::Datetime(_) => "a datetime",
            Value::Array(_) => "an array",
            Value::Table(_) => "a table",
        }
    }
}

/// A position in the source text: the byte range of a value.
pub(super) type Span = Range<usize>;

/// A table's keys and values, in document order.
pub(super) type Entries = Vec<(String, Node)>;

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any TOML value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Boolean(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Integer(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        i64::try_from(v)
            .map(Value::Integer)
            .map_err(|_| E::custom("integer out of range"))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Node>()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        match map.next_key::<String>()? {
            None => Ok(Value::Table(Vec::new())),
            Some(first) => table_from(first, map),
        }
    }
}

/// The rest of a map whose first key has been read.
fn table_from<'de, A: MapAccess<'de>>(first: String, mut map: A) -> Result<Value, A::Error> {
    if first.starts_with(DATETIME_KEY_PREFIX) {
        return Ok(Value::Datetime(map.next_value::<String>()?));
    }
    let mut entries = vec![(first, map.next_value::<Node>()?)];
    while let Some(key) = map.next_key::<String>()? {
        let value = map.next_value::<Node>()?;
        entries.push((key, value));
    }
    Ok(Value::Table(entries))
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Node, D::Error> {
        deserializer.deserialize_struct(SPANNED_NAME, &SPANNED_FIELDS, NodeVisitor)
    }
}

/// Takes the positioned form when offered, and any plain value otherwise.
struct NodeVisitor;

impl NodeVisitor {
    fn plain(value: Value) -> Node {
        Node { value, span: None }
    }
}

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any TOML value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(Self::plain(Value::Boolean(v)))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(Self::plain(Value::Integer(v)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
        ValueVisitor.visit_u64(v).map(Self::plain)
    }

    fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
        Ok(Self::plain(Value::Float(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(Self::plain(Value::String(v.to_string())))
    }

    fn visit_string<E>(self, v: String) -> Result<Node, E> {
        Ok(Self::plain(Value::String(v)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Node, A::Error> {
        ValueVisitor.visit_seq(seq).map(Self::plain)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let Some(first) = map.next_key::<String>()? else {
            return Ok(Self::plain(Value::Table(Vec::new())));
        };
        if first != SPANNED_START {
            return table_from(first, map).map(Self::plain);
        }
        let start: usize = map.next_value()?;
        let (mut end, mut value) = (None, None);
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                SPANNED_END => end = Some(map.next_value::<usize>()?),
                SPANNED_VALUE => value = Some(map.next_value::<Value>()?),
                _ => return Err(de::Error::unknown_field(&key, &SPANNED_FIELDS)),
            }
        }
        let end = end.ok_or_else(|| de::Error::missing_field(SPANNED_END))?;
        let value = value.ok_or_else(|| de::Error::missing_field(SPANNED_VALUE))?;
        Ok(Node {
            value,
            span: Some(start..end),
        })
    }
}

/// Parses a whole document; the error is the parser's message and where it happened.
pub(super) fn parse_document(text: &str) -> Result<Entries, (String, Option<Span>)> {
    match toml::from_str::<Value>(text) {
        Ok(Value::Table(entries)) => Ok(entries),
        // A document always deserializes as a table.
        Ok(other) => Err((format!("expected a table, found {}", other.type_name()), None)),
        Err(err) => Err((err.message().trim().to_string(), err.span())),
    }
}

/// 1-based line number of a byte offset.
pub(super) fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line_of_key(text: &str, entries: &[(String, Node)], key: &str) -> usize {
        let (_, v) = entries.iter().find(|(k, _)| k == key).unwrap();
        line_of(text, v.span().unwrap().start)
    }

    #[test]
    fn keeps_order_positions_and_datetimes() {
        let text = "b = 1\na = \"x\"\n\n[t]\nwhen = 1979-05-27T07:32:00Z\nlist = [1, 2.5]\n";
        let doc = parse_document(text).unwrap();
        let keys: Vec<_> = doc.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["b", "a", "t"]);
        assert_eq!(line_of_key(text, &doc, "a"), 2);
        let Value::Table(t) = doc[2].1.get_ref() else {
            panic!("not a table")
        };
        assert!(matches!(t[0].1.get_ref(), Value::Datetime(d) if d.starts_with("1979")));
        assert_eq!(line_of_key(text, t, "list"), 6);
        let Value::Array(items) = t[1].1.get_ref() else {
            panic!("not an array")
        };
        assert_eq!(items[1].get_ref(), &Value::Float(2.5));
    }

    #[test]
    fn syntax_errors_carry_a_position() {
        let text = "a = 1\nb = = 2\n";
        let (msg, span) = parse_document(text).unwrap_err();
        assert!(!msg.is_empty());
        assert_eq!(line_of(text, span.unwrap().start), 2);
    }
}
