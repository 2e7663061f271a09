//! `smp-qemu-control-stress-5min` (issue 16's acceptance: "create, destroy, pause,
//! unpause and migrate domains from the control channel while their vCPUs run on other
//! CPUs, for 5 minutes. There is no deadlock, crash or leak").
//!
//! Two QEMU TCG instances (`-cpu EPYC` and `-cpu EPYC,-avx2`), each `-smp 2` with
//! virtio-vsock ([`migration_tests::start_pair_threads`]): by default both CPUs of an
//! instance share one host thread (`-accel tcg,thread=single`: the hypervisor uses
//! both, QEMU runs them in turn); `smp-qemu-mttcg-control-stress-5min` (opt-in) gives
//! each its own thread, so they run at the same time. For
//! [`DEFAULT_SECS`] (`HV_STRESS_SECS` shortens it for local runs) one loop drives hvctl
//! against both: it creates memwriters of 1 and 2 vCPUs (16 MiB, practically endless
//! rounds), pauses, unpauses and destroys them, lists domains (checking each live one's
//! state), reads consoles and `info`, keeping at most [`MAX_LIVE`] live domains; every
//! [`MIGRATE_EVERY`] it live-migrates one running writer from the source to the
//! destination and back with `--verify --throttle` (auto-converge: on this loaded 2-core
//! host two TCG instances relay as little as ~80 pages/s, less than the writer dirties,
//! and without it the source rightly gives up with "does not converge").
//!
//! A hang is a failure naming the operation: hvctl gives up on a request after its own
//! 10 s (exit 3, "no answer from the hypervisor"), and an operation that answers later
//! than [`CONTROL_LIMIT`] (a migration: [`MIGRATE_LIMIT`]) fails the test too. At the
//! end everything is destroyed and both hypervisors must still answer, their logs must
//! hold no crash, failure or panic line ([`trouble_lines`]), every migrated writer's
//! rounds must continue across its hops with the right checksums ([`check_chain`]), both
//! frame pools must be back at their free-frame count measured after boot, both heaps
//! within 64 KiB of theirs (what finished migration sessions keep for their status;
//! [`migration_tests::back_to_baseline`]), and the source's placement lines must show
//! vCPUs on APIC 0 and APIC 1.
//!
//! Not for: throughput (`cargo xtask bench smp`) or the single-CPU control tests
//! (`control_tests.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::Result;
use crate::emulator::TcgThreads;
use crate::image::Esp;
use crate::migration_tests::{
    self, Ctx, WRITER_CMDLINE, WRITER_CPUID, WRITER_PAGES, WRITER_SEED, domains, hvctl_on, json, memory_use,
    migrate_between, pairs, reports, rounds,
};
use crate::serial::clean;
use crate::systest::wait_for;

const TEST: &str = "smp-qemu-control-stress-5min";
/// How long the loop runs, unless `HV_STRESS_SECS` says otherwise.
const DEFAULT_SECS: u64 = 300;
/// Live domains (both hypervisors together) at the most.
const MAX_LIVE: usize = 4;
/// How often a writer goes to the destination and back.
const MIGRATE_EVERY: Duration = Duration::from_secs(30);
/// The longest a control request may take: hvctl's 5 s connect and 10 s request timeouts.
const CONTROL_LIMIT: Duration = Duration::from_secs(15);
/// The longest one live migration (64 pages written without end) may take.
const MIGRATE_LIMIT: Duration = Duration::from_secs(120);
/// The writers' memory.
const MEMORY: &str = "16M";

/// The same loop with each QEMU's CPUs on their own host threads (multi-threaded
/// TCG), so the hypervisor's CPUs really run at the same time. Not by default: under
/// it a domain on one CPU now and then resumes with the hypervisor's own state or
/// triple-faults after a hypercall while other domains run on the other CPU (4 of 5
/// runs of 150-200 s on 2026-12-03 with QEMU 7.2; QEMU 10.0.2 from bookworm-backports
/// fails the same way within 4-16 s, while with all CPUs on one host thread both pass;
/// issue 16 and the README's SMP section have the evidence; the host-state form is
/// QEMU's own #VMEXIT leaving nested paging on, caught with `tools/qemu-hvdbg`). Run
/// by default, it would make every CI run a coin toss on that one open bug;
/// `--filter smp-qemu-mttcg-control-stress-5min` runs it.
const TEST_MTTCG: &str = "smp-qemu-mttcg-control-stress-5min";

/// Run the tests `filter` selects: [`TEST`] by default, on QEMUs whose CPUs share one
/// host thread ([`TcgThreads::One`]): the hypervisor places vCPUs on both CPUs and
/// every control path crosses CPUs, but the CPUs take turns. [`TEST_MTTCG`] only when
/// asked for.
pub fn run(esp: &Esp, filter: Option<&str>) -> Result<(usize, usize)> {
    let mut total = (0, 0);
    for (name, threads, prefix) in
        [(TEST, TcgThreads::One, "smp-stress"), (TEST_MTTCG, TcgThreads::OnePerCpu, "smp-stress-mttcg")]
    {
        let selected = match filter {
            Some(f) => name.contains(f),
            None => name == TEST,
        };
        if !selected {
            if filter.is_none() {
                println!(
                    "systest {name} ... not run by default: a known, unsolved state corruption under QEMU's \
                     multi-threaded TCG makes it fail (about 1 run in 2 on QEMU 7.2, 3 of 3 on 10.0.2; README, SMP); \
                     cargo xtask test --system-only --filter {name}"
                );
            }
            continue;
        }
        let (p, f) = run_one(esp, name, prefix, threads)?;
        total = (total.0 + p, total.1 + f);
    }
    Ok(total)
}

fn run_one(esp: &Esp, name: &str, prefix: &str, threads: TcgThreads) -> Result<(usize, usize)> {
    let secs = std::env::var("HV_STRESS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_SECS);
    let Some(mut ctx) = migration_tests::start_pair_threads(esp, prefix, 2, threads)? else { return Ok((0, 1)) };
    let started = Instant::now();
    let failed = match stress(&ctx, Duration::from_secs(secs)) {
        Ok(detail) => {
            println!("systest {name} ... ok ({:.1} s; {detail})", started.elapsed().as_secs_f64());
            0
        }
        Err(e) => {
            println!("systest {name} ... FAILED after {:.1} s\n  - {e}", started.elapsed().as_secs_f64());
            1
        }
    };
    let more = migration_tests::finish_pair(&mut ctx, name, failed);
    Ok(if failed + more == 0 { (1, 0) } else { (0, 1) })
}

/// Which hypervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Src,
    Dst,
}

impl Side {
    fn session(self, ctx: &Ctx) -> &crate::emulator::Session {
        match self {
            Side::Src => &ctx.src,
            Side::Dst => &ctx.dst,
        }
    }
    fn other(self) -> Side {
        match self {
            Side::Src => Side::Dst,
            Side::Dst => Side::Src,
        }
    }
}

/// A domain the loop created and has not destroyed.
#[derive(Debug)]
struct Live {
    side: Side,
    id: u64,
    vcpus: u32,
    paused: bool,
    /// Every (hypervisor, id) it has been, in order: more than one once migrated.
    hops: Vec<(Side, u64)>,
}

/// What the loop did: operations by kind, the slowest one, when it started, and the
/// last [`HISTORY`] operations (given with a failure, to show what led to it).
struct Stats {
    start: Instant,
    ops: BTreeMap<&'static str, u64>,
    max: (Duration, String),
    history: std::collections::VecDeque<String>,
}

/// How many of the latest operations a failure lists.
const HISTORY: usize = 12;

impl Stats {
    /// Run operation `kind` (`what`: its arguments, for the error) and count it; an
    /// error, or an answer later than `limit`, fails naming it and the time.
    fn op<T>(&mut self, kind: &'static str, what: &str, limit: Duration, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let at = self.start.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let result = f();
        let took = t0.elapsed();
        *self.ops.entry(kind).or_default() += 1;
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(format!("t={at:.1} s {kind} {what} ({:.2} s)", took.as_secs_f64()));
        let history = self.history.iter().cloned().collect::<Vec<_>>().join("; ");
        if took > self.max.0 {
            self.max = (took, format!("{kind} {what}"));
        }
        let value = result.map_err(|e| {
            format!(
                "{kind} {what} at t={at:.1} s failed after {:.1} s: {e} (latest operations: {history})",
                took.as_secs_f64()
            )
        })?;
        if took > limit {
            return Err(format!(
                "{kind} {what} at t={at:.1} s answered after {:.1} s, more than its {} s: a hang (latest operations: {history})",
                took.as_secs_f64(),
                limit.as_secs()
            ));
        }
        Ok(value)
    }
}

/// A small deterministic generator (xorshift64), so a failing sequence can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}

fn stress(ctx: &Ctx, duration: Duration) -> Result<String> {
    let base = [memory_use(ctx, &ctx.src)?, memory_use(ctx, &ctx.dst)?];
    let mut stats = Stats {
        start: Instant::now(),
        ops: BTreeMap::new(),
        max: (Duration::ZERO, String::new()),
        history: Default::default(),
    };
    let mut live: Vec<Live> = Vec::new();
    let mut moved: Vec<Vec<(Side, u64)>> = Vec::new();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut created = 0u32;
    let mut next_migration = MIGRATE_EVERY;
    while stats.start.elapsed() < duration {
        if stats.start.elapsed() >= next_migration {
            next_migration += MIGRATE_EVERY;
            let i = match live.iter().position(|l| l.side == Side::Src && l.vcpus == 1 && !l.paused) {
                Some(i) => i,
                None => {
                    if live.len() >= MAX_LIVE {
                        let gone = live.remove(rng.below(live.len()));
                        destroy(ctx, &mut stats, &gone)?;
                    }
                    live.push(create(ctx, &mut stats, Side::Src, created, 1)?);
                    created += 1;
                    live.len() - 1
                }
            };
            let hops = there_and_back(ctx, &mut stats, &mut live[i])?;
            moved.push(hops);
            continue;
        }
        match rng.below(8) {
            0 | 1 if live.len() < MAX_LIVE => {
                let side = if created % 4 == 3 { Side::Dst } else { Side::Src };
                live.push(create(ctx, &mut stats, side, created, 1 + created % 2)?);
                created += 1;
            }
            2 => {
                if let Some(l) = pick(&mut live, &mut rng, |l| !l.paused) {
                    let s = l.side.session(ctx);
                    stats.op("pause", &l.id.to_string(), CONTROL_LIMIT, || {
                        hvctl_on(ctx, s, &["domain", "pause", &l.id.to_string()])
                    })?;
                    l.paused = true;
                }
            }
            3 => {
                if let Some(l) = pick(&mut live, &mut rng, |l| l.paused) {
                    let s = l.side.session(ctx);
                    stats.op("unpause", &l.id.to_string(), CONTROL_LIMIT, || {
                        hvctl_on(ctx, s, &["domain", "unpause", &l.id.to_string()])
                    })?;
                    l.paused = false;
                }
            }
            4 if live.len() >= 2 => {
                let gone = live.remove(rng.below(live.len()));
                destroy(ctx, &mut stats, &gone)?;
            }
            5 => {
                let id = live.get(rng.below(live.len())).map(|l| (l.side, l.id));
                if let Some((side, id)) = id {
                    stats.op("console", &id.to_string(), CONTROL_LIMIT, || {
                        hvctl_on(ctx, side.session(ctx), &["domain", "console", &id.to_string()])
                    })?;
                }
            }
            6 => {
                let side = if rng.below(2) == 0 { Side::Src } else { Side::Dst };
                stats.op("info", &format!("{side:?}"), CONTROL_LIMIT, || memory_use(ctx, side.session(ctx)))?;
            }
            _ => {
                let side = if rng.below(2) == 0 { Side::Src } else { Side::Dst };
                list_matches(ctx, &mut stats, side, &live)?;
            }
        }
    }
    let secs = stats.start.elapsed().as_secs_f64();
    for side in [Side::Src, Side::Dst] {
        list_matches(ctx, &mut stats, side, &live)?;
    }
    // Each migrated writer ran on after its last hop; its rounds join up across them.
    let mut verified = 0;
    for hops in &moved {
        let &(side, id) = hops.last().ok_or("a migrated writer without hops")?;
        if live.iter().any(|l| l.side == side && l.id == id && !l.paused) {
            let before = rounds(side.session(ctx), id).len();
            wait_for(&format!("migrated writer {id} to write on ({side:?})"), 60, || {
                Ok(rounds(side.session(ctx), id).len() > before)
            })?;
        }
        let joined: Vec<(String, u64)> = hops.iter().flat_map(|&(s, id)| reports(s.session(ctx), id)).collect();
        verified += check_chain(&pairs(&joined), WRITER_SEED, WRITER_PAGES)
            .map_err(|e| format!("the writer migrated along {hops:?}: {e}"))?;
    }
    for l in std::mem::take(&mut live) {
        destroy(ctx, &mut stats, &l)?;
    }
    for side in [Side::Src, Side::Dst] {
        let left = domains(ctx, side.session(ctx)).map_err(|e| format!("the {side:?} stopped answering: {e}"))?;
        if !left.is_empty() {
            return Err(format!("after destroying everything the {side:?} still lists {left:?}"));
        }
        let serial = side.session(ctx).serial();
        let trouble = trouble_lines(&serial);
        if !trouble.is_empty() {
            return Err(format!("the {side:?}'s serial log has crash/failure lines:\n{}", trouble.join("\n")));
        }
    }
    // Every frame back, and the heap within what the finished migration sessions keep
    // for their status (at most eight each way): ~700 creates leaking even 100 bytes
    // each would be over.
    migration_tests::back_to_baseline(ctx, "the stress loop", base[0], base[1])?;
    let apics = apics_seen(&ctx.src.serial());
    if !apics.contains(&0) || !apics.contains(&1) {
        return Err(format!("the source's vCPUs were placed only on APIC {apics:?}, expected 0 and 1"));
    }
    let ops: Vec<String> = stats.ops.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let heap = |side: Side, i: usize| -> Result<String> {
        Ok(format!("{} -> {}", base[i].0, memory_use(ctx, side.session(ctx))?.0))
    };
    Ok(format!(
        "{secs:.0} s of operations: {}; {} migrations ({} writers there and back, {verified} rounds in sequence with \
         the right checksums); max control latency {:.2} s ({}); free frames back to {} / {} (heap bytes src {}, dst \
         {}); source vCPUs placed on APIC {apics:?}; no crash, failure or panic line",
        ops.join(", "),
        2 * moved.len(),
        moved.len(),
        stats.max.0.as_secs_f64(),
        stats.max.1,
        base[0].1,
        base[1].1,
        heap(Side::Src, 0)?,
        heap(Side::Dst, 1)?
    ))
}

/// One of `live` for which `want` holds, chosen by `rng`.
fn pick<'a>(live: &'a mut [Live], rng: &mut Rng, want: impl Fn(&Live) -> bool) -> Option<&'a mut Live> {
    let n = live.iter().filter(|l| want(l)).count();
    let k = rng.below(n);
    live.iter_mut().filter(|l| want(l)).nth(k)
}

/// Create writer number `n` with `vcpus` vCPUs on `side`.
fn create(ctx: &Ctx, stats: &mut Stats, side: Side, n: u32, vcpus: u32) -> Result<Live> {
    let kernel = ctx.guests.join("memwriter.elf").display().to_string();
    let (name, v) = (format!("stress{n}"), vcpus.to_string());
    let what = ["domain", "create", "--kernel", &kernel, "--name", &name, "--memory", MEMORY, "--vcpus", &v];
    let args = [&what[..], &["--cpuid", WRITER_CPUID, "--cmdline", WRITER_CMDLINE, "--json"]].concat();
    let out = stats.op("create", &format!("{name} ({vcpus} vCPUs, {side:?})"), CONTROL_LIMIT, || {
        json(&hvctl_on(ctx, side.session(ctx), &args)?, "domain create")
    })?;
    let id = out["id"].as_u64().ok_or_else(|| format!("domain create gave no id: {out}"))?;
    Ok(Live { side, id, vcpus, paused: false, hops: vec![(side, id)] })
}

fn destroy(ctx: &Ctx, stats: &mut Stats, l: &Live) -> Result<()> {
    stats.op("destroy", &format!("{} ({:?})", l.id, l.side), CONTROL_LIMIT, || {
        hvctl_on(ctx, l.side.session(ctx), &["domain", "destroy", &l.id.to_string()])
    })?;
    Ok(())
}

/// `domain list` on `side` shows each of `live` there, paused or running as the loop left it.
fn list_matches(ctx: &Ctx, stats: &mut Stats, side: Side, live: &[Live]) -> Result<()> {
    let listed = stats.op("list", &format!("{side:?}"), CONTROL_LIMIT, || domains(ctx, side.session(ctx)))?;
    for l in live.iter().filter(|l| l.side == side) {
        let state = listed.iter().find(|d| d.0 == l.id).map(|d| d.2.as_str());
        let want = if l.paused { "paused" } else { "running" };
        if state != Some(want) {
            return Err(format!(
                "at t={:.1} s domain {} on the {side:?} is {state:?}, expected {want}: {listed:?}",
                stats.start.elapsed().as_secs_f64(),
                l.id
            ));
        }
    }
    Ok(())
}

/// Migrate the running writer `l` to the other hypervisor and back (`--verify
/// --throttle`), each
/// time once it has written two rounds where it is; its hops.
fn there_and_back(ctx: &Ctx, stats: &mut Stats, l: &mut Live) -> Result<Vec<(Side, u64)>> {
    for _ in 0..2 {
        let (from, id) = (l.side, l.id);
        let to = from.other();
        let session = from.session(ctx);
        let before = rounds(session, id).len();
        wait_for(&format!("writer {id} to write two rounds on the {from:?}"), 60, || {
            Ok(rounds(session, id).len() >= before.max(2))
        })?;
        let what = format!("{id} {from:?} -> {to:?} --verify --throttle");
        let report = stats.op("migrate", &what, MIGRATE_LIMIT, || {
            migrate_between(ctx, session, to.session(ctx), id, &["--verify", "--throttle"])
        })?;
        if report["exit_code"] != 0 || report["outcome"] != "completed" {
            return Err(format!("migrate {what} did not complete: {report}"));
        }
        if report["source_digest"].is_null() || report["source_digest"] != report["destination_digest"] {
            return Err(format!("migrate {what}: the memory digests differ: {report}"));
        }
        let new_id = report["destination_domain"].as_u64().ok_or_else(|| format!("no destination domain: {report}"))?;
        (l.side, l.id) = (to, new_id);
        l.hops.push((to, new_id));
    }
    Ok(l.hops.clone())
}

/// Check that `pairs` (round, checksum), joined across a writer's hops, are rounds 0, 1,
/// … in order, each with the checksum `guest_abi::memwriter` gives for `seed` and
/// `pages`; how many there are.
fn check_chain(pairs: &[(u64, u64)], seed: u64, pages: u64) -> Result<usize> {
    for (i, &(round, checksum)) in pairs.iter().enumerate() {
        if round != i as u64 {
            return Err(format!("pair {i} is round {round}: the rounds do not continue across the hops"));
        }
        let want = guest_abi::memwriter::round_checksum(seed, round, pages);
        if checksum != want {
            return Err(format!("round {round} read back {checksum:#x}, expected {want:#x}"));
        }
    }
    if pairs.is_empty() {
        return Err("no rounds at all".into());
    }
    Ok(pairs.len())
}

/// The lines of a serial log that say something went wrong: a domain crashed, a
/// failure marker, a panic.
fn trouble_lines(serial: &str) -> Vec<String> {
    clean(serial)
        .lines()
        .map(str::trim)
        .filter(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            matches!(words.as_slice(), ["DOMAIN", _, "CRASHED", ..])
                || l.contains("FAIL")
                || l.contains("FATAL")
                || l.to_lowercase().contains("panic")
        })
        .map(String::from)
        .collect()
}

/// The APIC IDs any vCPU was placed on (`DOMAIN <id> VCPU <v> ON CPU apic=<A>`).
fn apics_seen(serial: &str) -> BTreeSet<u32> {
    crate::smp_bench::placements(serial).into_values().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trouble_lines_finds_crashes_failures_and_panics_only() {
        let log = "SMP cpus=2 started=2 failed=0\nDOMAIN 3 CREATED name=stress0 vcpus=1\nDOMAIN 3 DESTROYED\n\
                   DOMAIN 4 CRASHED triple fault\nFAIL: selftest\nhv panicked at src/x.rs:1\n[dom5] memwriter: done\n";
        assert_eq!(
            trouble_lines(log),
            vec!["DOMAIN 4 CRASHED triple fault", "FAIL: selftest", "hv panicked at src/x.rs:1"]
        );
        assert!(trouble_lines("READY arch=svm\nDOMAIN 1 EXIT code=0\n").is_empty());
    }

    #[test]
    fn apics_seen_unites_every_domain() {
        let log = "DOMAIN 1 VCPU 0 ON CPU apic=0\nDOMAIN 2 VCPU 1 ON CPU apic=1\nDOMAIN 2 HOMES vcpu->cpu 0->0 1->1\n";
        assert_eq!(apics_seen(log), BTreeSet::from([0, 1]));
        assert!(apics_seen("DOMAIN 1 CREATED name=x\n").is_empty());
    }

    #[test]
    fn check_chain_wants_consecutive_rounds_with_right_checksums() {
        let sum = |r| guest_abi::memwriter::round_checksum(7, r, 64);
        let good: Vec<(u64, u64)> = (0..5).map(|r| (r, sum(r))).collect();
        assert_eq!(check_chain(&good, 7, 64), Ok(5));
        let gap = [(0, sum(0)), (2, sum(2))];
        assert!(check_chain(&gap, 7, 64).unwrap_err().contains("do not continue"));
        let wrong = [(0, sum(0)), (1, sum(1) ^ 1)];
        assert!(check_chain(&wrong, 7, 64).unwrap_err().contains("round 1 read back"));
        assert!(check_chain(&[], 7, 64).is_err());
    }
}
