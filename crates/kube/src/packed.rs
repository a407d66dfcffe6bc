//! An object's value as a watched kind keeps it between events: LZ4
//! compressed. A kind holds every object it watches for as long as the
//! agent runs (10,000 Services and EndpointSlices: 6 MB of JSON); the
//! value is read back only for a listing or a snapshot. Compression is
//! deterministic: equal values have equal packed bytes, so a change is
//! still found by comparing them.

/// A compressed value.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Packed(Box<[u8]>);

impl Packed {
    /// `value`, compressed.
    pub(crate) fn new(value: &[u8]) -> Self {
        Self(lz4_flex::compress_prepend_size(value).into_boxed_slice())
    }

    /// The value back.
    pub(crate) fn bytes(&self) -> Vec<u8> {
        let v = lz4_flex::decompress_size_prepended(&self.0);
        // only [`Packed::new`] makes one
        debug_assert!(v.is_ok(), "a packed value unpacks");
        v.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_comes_back_and_equal_values_pack_equal() {
        let v = br#"{"address":"10.244.0.1","ready":true},{"address":"10.244.0.2","ready":true}"#;
        let p = Packed::new(v);
        assert_eq!(p.bytes(), v.to_vec());
        assert_eq!(Packed::new(v), p);
        assert_ne!(Packed::new(b"{}"), p);
        assert_eq!(Packed::new(b"").bytes(), Vec::<u8>::new());
    }
}
