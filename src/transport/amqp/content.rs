//! A task delivery's `basic.deliver` method and content header, read straight from the frame
//! payload into what kombu's `Message` exposes: the headers as a JSON map (in the order the
//! producer wrote them, as py-amqp gives them to the stock worker) and the other properties
//! under kombu's names.
//!
//! Every delivery passes through here, so this skips `amq-protocol`'s general parser (a
//! `FieldTable` of owned AMQP values, converted to JSON afterwards): one pass, one allocation
//! per string. Field types follow RabbitMQ's reading of the spec, as `amq-protocol` does:
//! `s` is a short int, `l` and `L` are both signed 64-bit.

use serde_json::{Map, Number, Value};

/// Tables nested deeper than this are refused rather than followed (each level recurses).
const MAX_DEPTH: usize = 64;
/// `basic` class and its `deliver` method.
const BASIC: u16 = 60;
const DELIVER: u16 = 60;

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum ContentError {
    #[error("the frame ends inside a field")]
    Truncated,
    #[error("unknown field type {0:?}")]
    UnknownType(char),
    #[error("field tables nested more than {MAX_DEPTH} deep")]
    TooDeep,
    #[error("a content header of class {0}, not basic")]
    NotBasic(u16),
}

/// `basic.deliver`'s arguments that a delivery keeps.
#[derive(Debug, PartialEq)]
pub struct Deliver {
    pub delivery_tag: u64,
    pub redelivered: bool,
    pub exchange: String,
    pub routing_key: String,
}

/// A content header: the body's size and the message's properties.
#[derive(Debug, PartialEq)]
pub struct Content {
    pub body_size: u64,
    pub content_type: String,
    pub content_encoding: String,
    /// `Value::Null` when the message has no headers table.
    pub headers: Value,
    /// The remaining properties a kombu `Message.properties` holds, under its names.
    pub properties: Map<String, Value>,
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ContentError> {
        if self.bytes.len() < n {
            return Err(ContentError::Truncated);
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ContentError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, ContentError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, ContentError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, ContentError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, ContentError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A short string (u8 length); invalid UTF-8 is replaced, not fatal.
    fn short_str(&mut self) -> Result<String, ContentError> {
        let n = self.u8()?;
        Ok(text(self.take(usize::from(n))?))
    }

    fn long_bytes(&mut self) -> Result<&'a [u8], ContentError> {
        let n = self.u32()?;
        self.take(n as usize)
    }

    fn table(&mut self, depth: usize) -> Result<Map<String, Value>, ContentError> {
        if depth > MAX_DEPTH {
            return Err(ContentError::TooDeep);
        }
        let mut r = Reader { bytes: self.long_bytes()? };
        let mut map = Map::new();
        while !r.bytes.is_empty() {
            let key = r.short_str()?;
            let value = r.value(depth)?;
            map.insert(key, value);
        }
        Ok(map)
    }

    fn value(&mut self, depth: usize) -> Result<Value, ContentError> {
        let float = |f: f64| Number::from_f64(f).map_or(Value::Null, Value::Number);
        Ok(match self.u8()? {
            b't' => Value::Bool(self.u8()? != 0),
            b'b' => Value::from(i8::from_be_bytes(self.array()?)),
            b'B' => Value::from(self.u8()?),
            b's' | b'U' => Value::from(i16::from_be_bytes(self.array()?)),
            b'u' => Value::from(self.u16()?),
            b'I' => Value::from(i32::from_be_bytes(self.array()?)),
            b'i' => Value::from(self.u32()?),
            b'l' | b'L' => Value::from(i64::from_be_bytes(self.array()?)),
            b'f' => float(f64::from(f32::from_be_bytes(self.array()?))),
            b'd' => float(f64::from_be_bytes(self.array()?)),
            b'D' => {
                let scale = self.u8()?;
                let value = self.u32()?;
                float(f64::from(value) / 10f64.powi(i32::from(scale)))
            }
            b'S' | b'x' => Value::String(text(self.long_bytes()?)),
            b'T' => Value::from(self.u64()?),
            b'V' => Value::Null,
            b'F' => Value::Object(self.table(depth + 1)?),
            b'A' => {
                if depth > MAX_DEPTH {
                    return Err(ContentError::TooDeep);
                }
                let mut r = Reader { bytes: self.long_bytes()? };
                let mut items = Vec::new();
                while !r.bytes.is_empty() {
                    items.push(r.value(depth + 1)?);
                }
                Value::Array(items)
            }
            other => return Err(ContentError::UnknownType(char::from(other))),
        })
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A method frame's payload, when it is `basic.deliver`; `None` for any other method (or one
/// too short to be a delivery), which the general parser then reads.
pub fn parse_deliver(payload: &[u8]) -> Option<Deliver> {
    let mut r = Reader { bytes: payload };
    if r.u16().ok()? != BASIC || r.u16().ok()? != DELIVER {
        return None;
    }
    let tag_len = r.u8().ok()?;
    let _consumer_tag = r.take(usize::from(tag_len)).ok()?;
    let delivery_tag = r.u64().ok()?;
    let redelivered = r.u8().ok()? & 1 == 1;
    let exchange = r.short_str().ok()?;
    let routing_key = r.short_str().ok()?;
    Some(Deliver { delivery_tag, redelivered, exchange, routing_key })
}

/// A content header frame's payload (class, weight, body size, property flags, properties).
pub fn parse_content_header(payload: &[u8]) -> Result<Content, ContentError> {
    let mut r = Reader { bytes: payload };
    let class = r.u16()?;
    if class != BASIC {
        return Err(ContentError::NotBasic(class));
    }
    let _weight = r.u16()?;
    let body_size = r.u64()?;
    let flags = r.u16()?;
    // Bit 0 says another flags word follows; basic has only 14 properties, so any further
    // words name none we know.
    let mut more = flags & 1 == 1;
    while more {
        more = r.u16()? & 1 == 1;
    }
    let has = |bit: u16| flags & (1 << bit) != 0;
    let mut content = Content {
        body_size,
        content_type: String::new(),
        content_encoding: String::new(),
        headers: Value::Null,
        properties: Map::new(),
    };
    if has(15) {
        content.content_type = r.short_str()?;
    }
    if has(14) {
        content.content_encoding = r.short_str()?;
    }
    if has(13) {
        content.headers = Value::Object(r.table(0)?);
    }
    let props = &mut content.properties;
    // In the order they appear on the wire (the spec's property order).
    if has(12) {
        props.insert("delivery_mode".into(), Value::from(r.u8()?));
    }
    if has(11) {
        props.insert("priority".into(), Value::from(r.u8()?));
    }
    for (bit, name) in [(10, "correlation_id"), (9, "reply_to"), (8, "expiration"), (7, "message_id")] {
        if has(bit) {
            props.insert(name.into(), Value::String(r.short_str()?));
        }
    }
    if has(6) {
        props.insert("timestamp".into(), Value::from(r.u64()?));
    }
    for (bit, name) in [(5, "type"), (4, "user_id"), (3, "app_id")] {
        if has(bit) {
            props.insert(name.into(), Value::String(r.short_str()?));
        }
    }
    // Bit 2, cluster_id, is deprecated and not a property kombu exposes.
    Ok(content)
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::frame::{gen_frame, AMQPContentHeader, AMQPFrame, WriteContext};
    use amq_protocol::protocol::{basic, AMQPClass, BasicProperties};
    use amq_protocol::types::{AMQPValue, DecimalValue, FieldArray, FieldTable, LongString, ShortString};
    use serde_json::json;

    /// A frame as `amq-protocol` (lapin's codec) writes it, without the 7-byte frame header
    /// and the end marker: what `parse_*` is given.
    fn payload(frame: &AMQPFrame) -> Vec<u8> {
        let bytes = gen_frame(frame)(WriteContext::from(Vec::new())).unwrap().write;
        bytes[7..bytes.len() - 1].to_vec()
    }

    #[test]
    fn reads_basic_deliver_and_leaves_other_methods() {
        let deliver = basic::Deliver {
            consumer_tag: ShortString::from("ctag"),
            delivery_tag: 1 << 40,
            redelivered: true,
            exchange: ShortString::from("ex"),
            routing_key: ShortString::from("celery"),
        };
        let frame = AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Deliver(deliver)));
        assert_eq!(
            parse_deliver(&payload(&frame)),
            Some(Deliver {
                delivery_tag: 1 << 40,
                redelivered: true,
                exchange: "ex".into(),
                routing_key: "celery".into()
            })
        );
        let ack = AMQPFrame::Method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack { delivery_tag: 3, multiple: false })),
        );
        assert_eq!(parse_deliver(&payload(&ack)), None);
        assert_eq!(parse_deliver(&[0, 60, 0, 60, 4]), None);
    }

    #[test]
    fn reads_every_field_type_and_property() {
        let mut nested = FieldTable::default();
        nested.insert("k".into(), AMQPValue::LongString(LongString::from("v")));
        let mut headers = FieldTable::default();
        for (k, v) in [
            ("task", AMQPValue::LongString("a.add".into())),
            ("bool", AMQPValue::Boolean(true)),
            ("i8", AMQPValue::ShortShortInt(-3)),
            ("u8", AMQPValue::ShortShortUInt(200)),
            ("i16", AMQPValue::ShortInt(-300)),
            ("u16", AMQPValue::ShortUInt(60000)),
            ("i32", AMQPValue::LongInt(-70000)),
            ("u32", AMQPValue::LongUInt(4_000_000_000)),
            ("i64", AMQPValue::LongLongInt(-(1 << 40))),
            ("f32", AMQPValue::Float(0.5)),
            ("f64", AMQPValue::Double(2.25)),
            ("dec", AMQPValue::DecimalValue(DecimalValue { scale: 2, value: 125 })),
            ("bytes", AMQPValue::ByteArray(b"raw".to_vec().into())),
            ("ts", AMQPValue::Timestamp(1_700_000_000)),
            ("none", AMQPValue::Void),
            ("list", AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongInt(1), AMQPValue::Void]))),
            ("map", AMQPValue::FieldTable(nested)),
        ] {
            headers.insert(k.into(), v);
        }
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_headers(headers)
            .with_delivery_mode(2)
            .with_priority(5)
            .with_correlation_id("cid".into())
            .with_reply_to("rq".into())
            .with_expiration("60000".into())
            .with_message_id("mid".into())
            .with_timestamp(42)
            .with_type("t".into())
            .with_user_id("guest".into())
            .with_app_id("app".into());
        let header = AMQPContentHeader { class_id: 60, body_size: 1234, properties };
        let content = parse_content_header(&payload(&AMQPFrame::Header(1, 60, Box::new(header)))).unwrap();
        assert_eq!(content.body_size, 1234);
        assert_eq!((content.content_type.as_str(), content.content_encoding.as_str()), ("application/json", "utf-8"));
        assert_eq!(
            content.headers,
            json!({
                "task": "a.add", "bool": true, "i8": -3, "u8": 200, "i16": -300, "u16": 60000, "i32": -70000,
                "u32": 4_000_000_000u64, "i64": -(1i64 << 40), "f32": 0.5, "f64": 2.25, "dec": 1.25,
                "bytes": "raw", "ts": 1_700_000_000, "none": null, "list": [1, null], "map": {"k": "v"},
            })
        );
        assert_eq!(
            Value::Object(content.properties),
            json!({
                "delivery_mode": 2, "priority": 5, "correlation_id": "cid", "reply_to": "rq",
                "expiration": "60000", "message_id": "mid", "timestamp": 42, "type": "t",
                "user_id": "guest", "app_id": "app",
            })
        );
    }

    #[test]
    fn a_header_without_properties_has_none() {
        let header = AMQPContentHeader { class_id: 60, body_size: 0, properties: BasicProperties::default() };
        let content = parse_content_header(&payload(&AMQPFrame::Header(1, 60, Box::new(header)))).unwrap();
        assert_eq!((content.headers, content.properties.len()), (Value::Null, 0));
    }

    #[test]
    fn broken_headers_are_errors_not_panics() {
        let header = AMQPContentHeader {
            class_id: 60,
            body_size: 9,
            properties: BasicProperties::default().with_headers({
                let mut t = FieldTable::default();
                t.insert("a".into(), AMQPValue::LongString("bcdef".into()));
                t
            }),
        };
        let good = payload(&AMQPFrame::Header(1, 60, Box::new(header)));
        for cut in 0..good.len() {
            assert!(parse_content_header(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut unknown = good.clone();
        let at = unknown.iter().position(|b| *b == b'S').unwrap();
        unknown[at] = b'?';
        assert_eq!(parse_content_header(&unknown), Err(ContentError::UnknownType('?')));
        // A table nested far too deep: refused, not followed.
        let mut deep: Vec<u8> = Vec::new();
        for _ in 0..1000 {
            let mut outer = vec![1, b'k', b'F'];
            outer.extend_from_slice(&(deep.len() as u32).to_be_bytes());
            outer.extend_from_slice(&deep);
            deep = outer;
        }
        let mut frame = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20, 0];
        frame.extend_from_slice(&(deep.len() as u32).to_be_bytes());
        frame.extend_from_slice(&deep);
        assert_eq!(parse_content_header(&frame), Err(ContentError::TooDeep));
    }
}
