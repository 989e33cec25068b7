//! EC encode speed, one core: reed-solomon-erasure against ISA-L (the same
//! code, bit for bit), 128 KiB cells, 4+2 and 8+2.
//!
//! `cargo bench -p shoal-common --bench ec`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use shoal_common::ec::{Codec, IsalCodec, RsCodec};

const CELL: usize = 128 << 10;

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("ec_encode_128KiB_cells");
    for (k, p) in [(4usize, 2usize), (8, 2)] {
        let data: Vec<Vec<u8>> =
            (0..k).map(|i| (0..CELL).map(|j| (j as u8).wrapping_mul(31).wrapping_add(i as u8)).collect()).collect();
        let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        // Throughput counts the data bytes of a stripe.
        g.throughput(Throughput::Bytes((k * CELL) as u64));
        let codecs: [(&str, Box<dyn Codec>); 2] = [
            ("reed-solomon-erasure", Box::new(RsCodec::new(k, p).unwrap())),
            ("isa-l", Box::new(IsalCodec::new(k, p).unwrap())),
        ];
        for (name, codec) in codecs {
            g.bench_with_input(BenchmarkId::new(name, format!("{k}+{p}")), &refs, |b, refs| {
                b.iter(|| codec.encode(refs).unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, encode);
criterion_main!(benches);
