//! Criterion benchmarks: the CPUID exit-path lookup and policy verification.
//! Run with `cargo bench -p levelling`.

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use levelling::table::{CpuidTable, VcpuState};
use levelling::{HostCpu, Policy, parse_dump};

fn host() -> HostCpu {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/constructed-amd-epyc-9654-genoa.cpuid");
    let text = std::fs::read_to_string(path).expect("testdata");
    HostCpu::from_records(&parse_dump(&text).expect("dump").records).expect("host")
}

fn bench(c: &mut Criterion) {
    let h = host();
    let policy = Policy::from_host(&h, h.default_set().set, 4);
    let table = CpuidTable::build(&policy, &h).expect("verifies");
    let vcpu = VcpuState { apic_id: 1, cr4_osxsave: true, cr4_pke: false, apic_enabled: true, xcr0: 0xe7, xss: 0 };
    // A mix of the leaves guests ask most, including uncovered ones.
    let queries: [(u32, u32); 8] =
        [(0, 0), (1, 0), (7, 0), (0xd, 0), (0xd, 1), (0xb, 1), (0x8000_0001, 0), (0x4000_0000, 0)];

    c.bench_function("lookup (static, 8 mixed leaves)", |b| {
        b.iter(|| {
            let mut acc = 0u32;
            for &(l, s) in &queries {
                acc ^= table.lookup(black_box(l), black_box(s))[0];
            }
            acc
        })
    });
    c.bench_function("lookup_vcpu (dynamic fields, 8 mixed leaves)", |b| {
        b.iter(|| {
            let mut acc = 0u32;
            for &(l, s) in &queries {
                acc ^= table.lookup_vcpu(black_box(l), black_box(s), &vcpu)[1];
            }
            acc
        })
    });
    c.bench_function("verify default policy", |b| b.iter(|| black_box(&policy).verify(black_box(&h)).is_ok()));
    c.bench_function("build table (verify + flatten)", |b| {
        b.iter(|| CpuidTable::build(black_box(&policy), black_box(&h)).is_ok())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
