//! The model fingerprint: a 64-bit FNV-1a hash (16 hex digits) of a model's configuration and
//! weights, which names the tokenizer behind cached probe features and DiT latents and checks that a
//! resumed decoder fine-tuning runs on the same frozen weights. For identity, not for security.
use super::VtpModel;
use anyhow::Result;
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

/// The fingerprint of `model`: [`Fnv`] over its config JSON, then every parameter and buffer (name,
/// dtype, shape, bytes) in name order.
pub fn model_fingerprint(model: &VtpModel) -> Result<String> {
    let mut h = Fnv::new();
    h.bytes(serde_json::to_string(&model.config)?.as_bytes());
    let mut tensors: BTreeMap<String, Tensor> = model.vs.variables().into_iter().collect();
    for (name, t) in model.buffers() {
        tensors.insert(name, t.shallow_clone());
    }
    hash_tensors(&mut h, tensors.iter())?;
    Ok(h.hex())
}

/// The fingerprint of named tensors alone (no config), hashed as [`model_fingerprint`] hashes a
/// model's, in name order.
pub fn tensors_fingerprint(named: &[(String, Tensor)]) -> Result<String> {
    let mut sorted: Vec<&(String, Tensor)> = named.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = Fnv::new();
    hash_tensors(&mut h, sorted.into_iter().map(|(name, t)| (name, t)))?;
    Ok(h.hex())
}

/// Feeds each tensor's name, dtype, shape and bytes (from the CPU, contiguous) to `h`, in the given order.
fn hash_tensors<'a>(h: &mut Fnv, named: impl Iterator<Item = (&'a String, &'a Tensor)>) -> Result<()> {
    for (name, t) in named {
        h.bytes(name.as_bytes());
        h.bytes(format!("{:?}{:?}", t.kind(), t.size()).as_bytes());
        let flat = t.to_device(Device::Cpu).contiguous().reshape([-1]).view_dtype(Kind::Uint8);
        h.bytes(&Vec::<u8>::try_from(&flat)?);
    }
    Ok(())
}

/// 64-bit FNV-1a over byte strings, 8 bytes per step, each string closed by its length.
pub struct Fnv(u64);

impl Fnv {
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    /// The hash of nothing (the FNV offset basis).
    pub fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    /// Mixes in `data`, then its length.
    pub fn bytes(&mut self, data: &[u8]) {
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            let word = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            self.0 = (self.0 ^ word).wrapping_mul(Self::PRIME);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(Self::PRIME);
        }
        self.0 = (self.0 ^ data.len() as u64).wrapping_mul(Self::PRIME);
    }

    /// The hash so far as 16 hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

impl Default for Fnv {
    /// [`Fnv::new`].
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fingerprint of named tensors ignores their order and sees every name, shape and value.
    #[test]
    fn tensors_fingerprint_sees_names_shapes_and_values() {
        let named = |pairs: &[(&str, Tensor)]| -> Vec<(String, Tensor)> {
            pairs.iter().map(|(n, t)| (n.to_string(), t.shallow_clone())).collect()
        };
        let (a, b) = (Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]), Tensor::from_slice(&[5i64]));
        let base = tensors_fingerprint(&named(&[("a", a.shallow_clone()), ("b", b.shallow_clone())])).unwrap();
        assert_eq!(base.len(), 16);
        assert_eq!(tensors_fingerprint(&named(&[("b", b.shallow_clone()), ("a", a.shallow_clone())])).unwrap(), base);
        for other in [
            named(&[("a", a.shallow_clone()), ("c", b.shallow_clone())]),
            named(&[("a", a.view([2, 2])), ("b", b.shallow_clone())]),
            named(&[("a", &a + 1e-3), ("b", b.shallow_clone())]),
        ] {
            assert_ne!(tensors_fingerprint(&other).unwrap(), base);
        }
    }
}
