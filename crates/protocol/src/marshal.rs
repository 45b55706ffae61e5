//! Python's `marshal` format (version 2 and later, no references) for what a JSON document
//! holds. A pool child decodes a task's request meta with `marshal.loads` in about half the time
//! `json.loads` takes, and the supervisor writes it as cheaply as JSON.
//!
//! Only the type codes CPython has read the same way since 3.4 are written:
//! `N T F i l g u z s ( [ {`.

use serde_json::{Map, Number, Value};

/// A marshal document being written into a byte buffer.
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// A writer whose output starts with `prefix` (how the reader tells it from JSON).
    pub fn with_prefix(prefix: &[u8], capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity);
        buf.extend_from_slice(prefix);
        Writer { buf }
    }

    /// Bytes written as they are (a prefix the reader checks first).
    pub fn raw(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    pub fn finish(self) -> Vec<u8> {
        self.buf
    }

    fn len_u32(&mut self, n: usize) {
        self.buf.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
    }

    pub fn none(&mut self) {
        self.buf.push(b'N');
    }

    pub fn bool(&mut self, b: bool) {
        self.buf.push(if b { b'T' } else { b'F' });
    }

    pub fn str(&mut self, s: &str) {
        // Short ASCII text (nearly every header) as TYPE_SHORT_ASCII: CPython makes the str
        // without decoding UTF-8.
        if let Ok(len) = u8::try_from(s.len()) {
            if s.is_ascii() {
                self.buf.push(b'z');
                self.buf.push(len);
                self.buf.extend_from_slice(s.as_bytes());
                return;
            }
        }
        self.buf.push(b'u');
        self.len_u32(s.len());
        self.buf.extend_from_slice(s.as_bytes());
    }

    /// Python `bytes`.
    pub fn bytes(&mut self, b: &[u8]) {
        self.buf.push(b's');
        self.len_u32(b.len());
        self.buf.extend_from_slice(b);
    }

    /// A tuple of `len` items; the items follow.
    pub fn begin_tuple(&mut self, len: usize) {
        self.buf.push(b'(');
        self.len_u32(len);
    }

    pub fn int(&mut self, n: i128) {
        if let Ok(small) = i32::try_from(n) {
            self.buf.push(b'i');
            self.buf.extend_from_slice(&small.to_le_bytes());
            return;
        }
        // TYPE_LONG: the count of 15-bit digits (negative for a negative number), then the
        // digits, least significant first; the top digit is never zero.
        let mut magnitude = n.unsigned_abs();
        let mut digits = Vec::new();
        while magnitude > 0 {
            digits.push((magnitude & 0x7fff) as u16);
            magnitude >>= 15;
        }
        let count = digits.len() as i32;
        self.buf.push(b'l');
        self.buf.extend_from_slice(&(if n < 0 { -count } else { count }).to_le_bytes());
        for d in digits {
            self.buf.extend_from_slice(&d.to_le_bytes());
        }
    }

    pub fn float(&mut self, f: f64) {
        self.buf.push(b'g');
        self.buf.extend_from_slice(&f.to_le_bytes());
    }

    fn number(&mut self, n: &Number) {
        if let Some(i) = n.as_i64() {
            self.int(i128::from(i));
        } else if let Some(u) = n.as_u64() {
            self.int(i128::from(u));
        } else {
            self.float(n.as_f64().unwrap_or(f64::NAN));
        }
    }

    pub fn value(&mut self, v: &Value) {
        match v {
            Value::Null => self.none(),
            Value::Bool(b) => self.bool(*b),
            Value::Number(n) => self.number(n),
            Value::String(s) => self.str(s),
            Value::Array(items) => {
                self.buf.push(b'[');
                self.len_u32(items.len());
                for item in items {
                    self.value(item);
                }
            }
            Value::Object(map) => self.map(map),
        }
    }

    pub fn map(&mut self, map: &Map<String, Value>) {
        self.begin_dict();
        for (k, v) in map {
            self.str(k);
            self.value(v);
        }
        self.end_dict();
    }

    /// A dict entry whose value is text.
    pub fn entry_str(&mut self, key: &str, value: &str) {
        self.str(key);
        self.str(value);
    }

    /// A dict entry.
    pub fn entry(&mut self, key: &str, value: &Value) {
        self.str(key);
        self.value(value);
    }

    /// A dict's entries follow as key, value, key, value, ... until `end_dict`.
    pub fn begin_dict(&mut self) {
        self.buf.push(b'{');
    }

    pub fn end_dict(&mut self) {
        self.buf.push(b'0');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn encode(v: &Value) -> Vec<u8> {
        let mut w = Writer::with_prefix(b"", 64);
        w.value(v);
        w.finish()
    }

    // The expected bytes are what CPython 3.11's `marshal.dumps` writes for the same values
    // (its interning and reference flags aside, which readers do not need).
    #[test]
    fn scalars() {
        assert_eq!(encode(&json!(null)), b"N");
        assert_eq!(encode(&json!(true)), b"T");
        assert_eq!(encode(&json!(-2)), b"i\xfe\xff\xff\xff");
        assert_eq!(encode(&json!(1.5)), b"g\x00\x00\x00\x00\x00\x00\xf8?");
        assert_eq!(encode(&json!("é")), b"u\x02\x00\x00\x00\xc3\xa9");
        assert_eq!(encode(&json!("ab")), b"z\x02ab");
        let long = "x".repeat(256);
        assert_eq!(encode(&json!(long))[..5], *b"u\x00\x01\x00\x00");
    }

    #[test]
    fn longs_are_normalised_15_bit_digits() {
        // marshal.dumps(2**31) == b'l\x03\x00\x00\x00\x00\x00\x00\x00\x02\x00'
        assert_eq!(encode(&json!(2_i64.pow(31))), b"l\x03\x00\x00\x00\x00\x00\x00\x00\x02\x00");
        // marshal.dumps(-2**40) == b'l\xfd\xff\xff\xff\x00\x00\x00\x00\x00\x04'
        assert_eq!(encode(&json!(-(2_i64.pow(40)))), b"l\xfd\xff\xff\xff\x00\x00\x00\x00\x00\x04");
        // marshal.dumps(2**64 - 1) == b'l\x05\x00\x00\x00\xff\x7f\xff\x7f\xff\x7f\xff\x7f\x0f\x00'
        assert_eq!(encode(&json!(u64::MAX)), b"l\x05\x00\x00\x00\xff\x7f\xff\x7f\xff\x7f\xff\x7f\x0f\x00");
    }

    #[test]
    fn containers() {
        assert_eq!(encode(&json!([1, null])), b"[\x02\x00\x00\x00i\x01\x00\x00\x00N");
        assert_eq!(encode(&json!({"a": []})), b"{z\x01a[\x00\x00\x00\x000");
        let mut w = Writer::with_prefix(b"", 16);
        w.begin_tuple(2);
        w.bytes(b"\x00b");
        w.none();
        // marshal.loads(...) == (b'\x00b', None)
        assert_eq!(w.finish(), b"(\x02\x00\x00\x00s\x02\x00\x00\x00\x00bN");
    }
}
