//! RoPE tables and rotation bit-identical to the official bf16 module (`rope-bf16.safetensors`,
//! fixtures README §3; docs/design.md §1.2).
mod common;
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};
use vtp::io::read_safetensors_map;
use vtp::model::rope::{grid_coords, rope_periods, RopeEmbedding, RopeTables};

fn fixture() -> HashMap<String, Tensor> {
    read_safetensors_map(&common::fixture("rope-bf16.safetensors")).expect("rope fixture loads")
}

/// Bit equality: same kind, same shape, same bits.
fn assert_bits(name: &str, ours: &Tensor, reference: &Tensor) {
    assert_eq!(ours.kind(), reference.kind(), "{name}: dtype");
    assert_eq!(ours.size(), reference.size(), "{name}: shape");
    let a = ours.contiguous().view_dtype(Kind::Int16);
    let b = reference.contiguous().view_dtype(Kind::Int16);
    let differing = a.ne_tensor(&b).sum(Kind::Int64).int64_value(&[]);
    assert_eq!(differing, 0, "{name}: {differing} values differ");
}

#[test]
fn periods_coords_angles_and_tables_are_bit_identical() {
    let fx = fixture();
    let mut checked = 0;
    for dim in [36, 16, 8, 32] {
        let periods = rope_periods(dim, Device::Cpu);
        assert_bits(&format!("d{dim}.periods"), &periods, &fx[&format!("rope.d{dim}.periods")]);
        let rope = RopeEmbedding::new(dim, Device::Cpu);
        for (h, w) in [(4, 4), (3, 5), (16, 16)] {
            let prefix = format!("rope.d{dim}.{h}x{w}");
            let Some(sin) = fx.get(&format!("{prefix}.sin")) else { continue };
            let tables = rope.tables(h, w);
            assert_bits(&format!("{prefix}.sin"), &tables.sin, sin);
            assert_bits(&format!("{prefix}.cos"), &tables.cos, &fx[&format!("{prefix}.cos")]);
            assert_bits(&format!("{prefix}.coords"), &grid_coords(h, w, Device::Cpu), &fx[&format!("{prefix}.coords")]);
            checked += 1;
        }
    }
    assert_eq!(checked, 10, "every fixture grid is covered");
}

#[test]
fn rotation_matches_apply_rope_with_and_without_prefix() {
    let fx = fixture();
    for case in ["d36.3x5.prefix1", "d16.4x4.prefix0"] {
        let get = |k: &str| fx[&format!("rope.apply.{case}.{k}")].shallow_clone();
        let tables = RopeTables { sin: get("sin"), cos: get("cos") };
        for t in ["q", "k"] {
            let out = tables.apply(&get(&format!("{t}_in")));
            let reference = get(&format!("{t}_out"));
            assert_eq!(out.kind(), Kind::Float);
            let diff = (&out - &reference).abs().max().double_value(&[]);
            assert_eq!(diff, 0.0, "{case} {t}: max abs diff {diff}");
        }
    }
}

#[test]
fn released_head_dim_periods_match_spec() {
    let expected = [
        1.0, 1.3359375, 1.78125, 2.375, 3.15625, 4.21875, 5.625, 7.5, 10.0, 13.3125, 17.75, 23.75, 31.625, 42.25,
        56.25, 75.0,
    ];
    let periods = Vec::<f32>::try_from(rope_periods(64, Device::Cpu).to_kind(Kind::Float)).unwrap();
    assert_eq!(periods, expected.map(|v| v as f32).to_vec());
}
