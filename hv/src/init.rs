//! The boot sequence on the bootstrap CPU, from boot's hand-off to `READY` and the
//! main loop: descriptor tables and this CPU's [`crate::percpu::PerCpu`], the TSC,
//! the memory map, the capability probe, the backend and its self-test, boot-time
//! domains, the control channel, then scheduling and idling until nothing is left.
//! Also the types boot hands over ([`BootInfo`]) and the shutdown hook.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::{VERSION, arch, domain, drivers, mm, percpu, platform, print, println, selftest, services, smp};

/// How a run of the hypervisor ended; boot turns it into a firmware shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Ready (for now: the self-test guest round trip succeeded) and nothing more to do.
    Ready,
    /// The CPU cannot host guests; the reason was printed.
    Refused,
    /// An error; it was printed.
    Failed,
}

/// Kinds of memory in the firmware's map, as the core needs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionKind {
    /// Free RAM (conventional, and boot-services memory after ExitBootServices).
    Usable,
    /// RAM holding the hypervisor image, its heap and its frame pool.
    Hypervisor,
    /// Firmware runtime code/data: must stay mapped and untouched.
    FirmwareRuntime,
    /// ACPI tables (reclaimable once parsed).
    AcpiReclaim,
    /// ACPI non-volatile storage.
    AcpiNvs,
    /// Memory-mapped I/O.
    Mmio,
    /// Reserved, unusable or unknown (the firmware's type number).
    Reserved(u32),
}

/// One range of the physical memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRegion {
    /// First byte.
    pub start: u64,
    /// Length in 4 KiB pages.
    pub pages: u64,
    /// What it is.
    pub kind: RegionKind,
}

/// What boot hands over after ExitBootServices.
#[derive(Debug)]
pub struct BootInfo {
    /// The final memory map (after ExitBootServices), sorted by address.
    pub memory_map: Vec<MemoryRegion>,
    /// Frames reserved for the hypervisor (tables, control blocks, guest memory).
    pub frames: mm::frames::FramePool,
    /// Frames reserved for device DMA (virtqueues); handed to `virtio` at start.
    pub dma_frames: Option<mm::frames::FramePool>,
    /// Options from the boot volume's command-line file (may be empty).
    pub cmdline: String,
    /// The source revision the image was built from (`git describe`).
    pub git_revision: &'static str,
    /// Domains to start at boot (from `\EFI\HV\DOMAINS.CFG`) with their images.
    pub domains: Vec<BootDomain>,
    /// The wall clock (Unix seconds, UTC) when boot read the firmware's clock, if it
    /// could: each domain's CMOS RTC starts from it.
    pub unix_time: Option<i64>,
    /// The CPUs the firmware reported (UEFI MP services; empty: it reported none).
    pub cpus: Vec<crate::smp::FirmwareCpu>,
    /// A page below 1 MiB that boot reserved for the application processors'
    /// real-mode trampoline ([`crate::smp`]), if it could.
    pub ap_trampoline: Option<u64>,
}

/// A domain to start at boot: its configuration and the files it names, read once
/// into the heap. Domains naming the same file share one copy of it (boot reads each
/// file once), which is freed when the last of them has been created.
#[derive(Debug)]
pub struct BootDomain {
    /// The configuration line.
    pub config: domain::config::DomainConfig,
    /// The kernel image (`kernel=`).
    pub kernel: BootImage,
    /// The initrd (`initrd=`; empty when none is configured).
    pub initrd: BootImage,
}

/// A file of the boot volume held for the boot-time domains that name it.
pub type BootImage = alloc::sync::Arc<Vec<u8>>;

static SHUTDOWN_HOOK: spin::Once<fn(Outcome) -> !> = spin::Once::new();

/// Set how the machine is shut down (boot provides the firmware's ResetSystem).
pub fn set_shutdown_hook(hook: fn(Outcome) -> !) {
    SHUTDOWN_HOOK.call_once(|| hook);
}

/// Shut the machine down with `outcome`. Without a hook (never in practice) the CPU
/// halts with interrupts off, after saying so.
pub fn shutdown(outcome: Outcome) -> ! {
    if let Some(hook) = SHUTDOWN_HOOK.get() {
        hook(outcome)
    }
    println!("FATAL: no shutdown hook installed; halting");
    loop {
        // SAFETY: CLI; HLT only stops this CPU; nothing else is running.
        unsafe { core::arch::asm!("cli", "hlt") };
    }
}

/// Merge neighbouring regions of the same kind (firmware maps list many small
/// adjacent runs), for a readable summary. Input sorted by address.
pub fn coalesce(map: &[MemoryRegion]) -> Vec<MemoryRegion> {
    let mut out: Vec<MemoryRegion> = Vec::with_capacity(map.len());
    for r in map {
        match out.last_mut() {
            Some(last) if last.kind == r.kind && last.start + last.pages * mm::PAGE_SIZE == r.start => {
                last.pages += r.pages;
            }
            _ => out.push(*r),
        }
    }
    out
}

fn print_memory_map(map: &[MemoryRegion]) {
    let merged = coalesce(map);
    println!("Memory map ({} firmware entries, {} after merging neighbours of one kind):", map.len(), merged.len());
    let mut usable = 0u64;
    for r in &merged {
        let end = r.start + r.pages * mm::PAGE_SIZE;
        println!("  {:#014x}-{:#014x} {:>10} KiB  {:?}", r.start, end.saturating_sub(1), r.pages * 4, r.kind);
        if r.kind == RegionKind::Usable {
            usable += r.pages * mm::PAGE_SIZE;
        }
    }
    println!("  usable RAM: {} MiB", usable / (1024 * 1024));
}

/// Print every CPUID leaf and subleaf of this CPU in `hvctl cpuid dump` format between
/// `CPUID-DUMP-BEGIN` and `CPUID-DUMP-END` (boot option `cpuid-dump`), so emulator and
/// bare-metal dumps can be captured for levelling's test data.
fn print_cpuid_dump(caps: &platform::caps::Capabilities) {
    let records =
        levelling::enumerate(|leaf, subleaf| platform::hw::HwRead::cpuid(&mut platform::hw::RealHw, leaf, subleaf));
    let source = alloc::format!("captured by the hv boot image ({})", caps.identity());
    println!("CPUID-DUMP-BEGIN");
    print!("{}", levelling::format_dump(&records, &source));
    println!("CPUID-DUMP-END");
}

/// Run the hypervisor on this (bootstrap) CPU. Interrupts must be off and boot
/// services exited.
pub fn run(mut info: BootInfo) -> Outcome {
    let tables = drivers::tables::load();
    // Before anything that reaches this CPU's state: the interrupt handler, the
    // backends (VMX host state names the tables), the RMID switch.
    let cpu = percpu::install(tables);
    match drivers::time::init() {
        Ok((hz, source)) => log::info!("TSC {} kHz ({:?})", hz / 1000, source),
        Err(e) => println!("warning: TSC not calibrated ({e}); uptime and timeouts are unavailable"),
    }
    match info.unix_time {
        Some(t) => drivers::time::set_wall_clock(t),
        None => println!("warning: the firmware gave no wall clock; guests' RTCs start at 1970-01-01"),
    }
    log::info!(
        "CPU {} (APIC ID {}): descriptor tables loaded: GDT {:#x}, IDT {:#x}, TSS {:#x}",
        cpu.index,
        cpu.apic_id,
        tables.gdt,
        tables.idt,
        tables.tss
    );
    print_memory_map(&info.memory_map);
    if let Some(dma) = info.dma_frames.take() {
        drivers::virtio::init_dma(dma);
    }
    println!("Frame pool: {} frames ({} MiB) free", info.frames.free_frames(), info.frames.free_frames() * 4 / 1024);

    let mut recorder = platform::hw::Recorder::new(platform::hw::RealHw);
    let caps = match platform::caps::probe(&mut recorder) {
        Ok(caps) => caps,
        Err(e) => {
            println!("FAIL: capability probe: {e}");
            return Outcome::Failed;
        }
    };
    print!("{caps}");
    println!("{}", caps.machine_line());
    println!("PROBE-RAW {}", recorder.recorded.to_line());

    platform::rdt::set_boot_options(platform::rdt::BootOptions::parse(&info.cmdline));
    if info.cmdline.split_whitespace().any(|w| w == "cpuid-dump") {
        print_cpuid_dump(&caps);
    }

    if let Err(why) = caps.check_usable() {
        println!("REFUSED: {why}");
        return Outcome::Refused;
    }

    match caps.virtualization {
        platform::caps::Virtualization::Vmx(_) => run_with::<arch::vmx::Vmx>(info, &caps),
        platform::caps::Virtualization::Svm(_) => run_with::<arch::svm::Svm>(info, &caps),
        platform::caps::Virtualization::None => Outcome::Refused,
    }
}

/// Frames each application processor gets for itself: its VMXON region or host save
/// areas, and the guest round trip's memory, tables and VMCS/VMCB (about 30), with room.
const AP_FRAMES: usize = 64;

/// How long an AP may take to turn on virtualization and run the guest round trip
/// (Bochs needs about a second; an AP that takes longer is reported as failed).
const AP_JOB_MS: u64 = 20_000;

/// On every started AP, with frames of its own: turn on `B` (VMXON with its own region,
/// or EFER.SVME with its own host save area) and run the guest round trip of
/// [`selftest`] there. The AP keeps its backend and frames for the work it gets later.
/// An AP that cannot is reported by APIC ID and marked failed; the others carry on.
/// `smp-fail-virt=APICID` in `cmdline` makes that AP's job refuse (for the tests).
fn virtualize_aps<B: arch::Backend + Send + 'static>(
    caps: &platform::caps::Capabilities,
    frames: &mut mm::frames::FramePool,
    cmdline: &str,
) {
    let options = smp::BootOptions::parse(cmdline);
    for slot in smp::cpus().iter().skip(1).filter(|s| s.state() == smp::CpuState::Started) {
        let refuse = options.fail_virt.contains(&slot.apic_id);
        let answer = match frames.split_off(AP_FRAMES) {
            Err(e) => Err(format!("no {AP_FRAMES} frames for it: {e}")),
            Ok(mut pool) => {
                let caps = *caps;
                smp::run_on(
                    slot,
                    Box::new(move |kept| {
                        if refuse {
                            return Err("smp-fail-virt: told not to turn on virtualization".into());
                        }
                        let mut backend =
                            B::enable(&caps, &mut pool).map_err(|e| format!("enabling {}: {e}", B::NAME))?;
                        let report =
                            selftest::run(&mut backend, &mut pool).map_err(|e| format!("guest round trip: {e}"))?;
                        let timer = ap_timer_check()?;
                        *kept = Some(Box::new((backend, pool)));
                        Ok(format!("{report}; {timer}"))
                    }),
                    AP_JOB_MS,
                )
            }
        };
        match answer {
            Ok(line) => println!("SMP cpu apic={} ready: {line}", slot.apic_id),
            Err(why) => {
                slot.fail();
                println!("SMP cpu apic={} cannot run guests: {why}", slot.apic_id);
            }
        }
    }
}

/// Longest idle sleep of an AP's scheduler: a domain created or unpaused on another
/// CPU is picked up within this.
const AP_IDLE_MS: u64 = 1;

/// Start the shared scheduler on every started AP (each keeps its backend, which
/// enabled the extension there, for the life of the hypervisor). The APIC IDs of those
/// that took it.
fn schedule_on_aps<B: arch::Backend + 'static>(shared: &alloc::sync::Arc<domain::sched::Shared<B>>) -> Vec<u32> {
    let mut scheduling = Vec::new();
    for slot in smp::cpus().iter().skip(1).filter(|s| s.state() == smp::CpuState::Started) {
        let shared = shared.clone();
        let posted = smp::post(
            slot,
            Box::new(move |kept| {
                ap_schedule(&shared, kept);
            }),
        );
        match posted {
            Ok(()) => {
                println!("SMP cpu apic={} schedules vCPUs", slot.apic_id);
                scheduling.push(slot.apic_id);
            }
            Err(why) => println!("SMP cpu apic={} runs no vCPUs: {why}", slot.apic_id),
        }
    }
    scheduling
}

/// An AP's life after boot: run vCPU slices from the shared scheduler, and sleep on
/// its LAPIC timer when there is nothing to run (until the earliest guest timer, at
/// most [`AP_IDLE_MS`]). Between slices it runs the jobs posted to it since (the
/// monitoring service's MSR accesses for this CPU's socket), so those wait at most a
/// slice.
fn ap_schedule<B: arch::Backend>(shared: &domain::sched::Shared<B>, kept: &mut smp::Kept) -> ! {
    let lapic = &percpu::this().lapic;
    let longest = drivers::time::ms_to_ticks(AP_IDLE_MS).unwrap_or(1_000_000);
    let shortest = longest * IDLE_MIN_US / (AP_IDLE_MS * 1000);
    loop {
        if smp::run_posted(kept) {
            continue;
        }
        if shared.run_slice() {
            continue;
        }
        let ticks = shared.idle_ticks().map_or(longest, |t| t.min(longest));
        if ticks >= shortest {
            sleep(lapic, ticks);
        } else {
            core::hint::spin_loop();
        }
    }
}

/// On an AP: calibrate its local APIC timer against the TSC (as the boot CPU does for
/// its slices and idle sleeps) and prove it wakes the CPU: a 1 ms one-shot ends a HLT.
/// A timer that never fires leaves the AP halted, and the boot CPU's wait for the job
/// times out and reports it.
fn ap_timer_check() -> Result<String, String> {
    let lapic = &percpu::this().lapic;
    let per_ms = lapic.init().map_err(|e| format!("its local APIC timer: {e}"))?;
    let one_ms = drivers::time::ms_to_ticks(1).ok_or("the TSC is not calibrated")?;
    let (before, start) = (lapic.interrupts(), drivers::time::now_ticks());
    sleep(lapic, one_ms);
    let slept = drivers::time::now_ticks().wrapping_sub(start);
    if lapic.interrupts() == before {
        return Err("its local APIC timer did not end a 1 ms HLT".into());
    }
    if slept < one_ms * 9 / 10 {
        return Err(format!("its local APIC timer ended a 1 ms HLT after {} µs", slept * 1000 / one_ms));
    }
    Ok(format!("local APIC timer {per_ms} ticks/ms, a 1 ms sleep took {} µs", slept * 1000 / one_ms))
}

/// Time slice for round-robin scheduling of vCPUs.
const SLICE_MS: u64 = 10;

/// Take the machine with backend `B`: self-test, boot-time domains, control channel,
/// then schedule until nothing is left to run or serve.
fn run_with<B: arch::Backend + Send + 'static>(mut info: BootInfo, caps: &platform::caps::Capabilities) -> Outcome {
    // Before any vCPU exists (the backend enables the FPU again for its own use): an
    // XSAVEC that writes its format wrongly must not be offered to guests.
    let xsavec = arch::fpu::check_xsavec(&arch::fpu::HostFpu::enable());
    let mut backend = match B::enable(caps, &mut info.frames) {
        Ok(b) => b,
        Err(e) => {
            println!("FAIL: enabling {}: {e}", B::NAME);
            return Outcome::Failed;
        }
    };
    // The other CPUs: started, virtualized and parked before READY, so the SMP lines
    // precede it.
    smp::start_aps(&info.cpus, info.ap_trampoline, &info.cmdline);
    match selftest::run(&mut backend, &mut info.frames) {
        Ok(report) => {
            println!("{report}");
            virtualize_aps::<B>(caps, &mut info.frames, &info.cmdline);
            smp::print_summary();
            println!("{}", platform::rdt::socket_map().summary());
            println!("READY arch={} exit={} value={:#x}", report.arch, report.exit, report.value);
        }
        Err(e) => {
            println!("FAIL: guest round trip: {e}");
            return Outcome::Failed;
        }
    }

    // Guests' CPUID comes from policies verified against this host's own CPUID.
    let records = levelling::enumerate(|leaf, sub| platform::hw::HwRead::cpuid(&mut platform::hw::RealHw, leaf, sub));
    let mut host = match levelling::HostCpu::from_records(&records) {
        Ok(h) => h,
        Err(e) => {
            println!("FAIL: reading this CPU's CPUID for guest policies: {e}");
            return Outcome::Failed;
        }
    };
    match xsavec {
        arch::fpu::XsavecCheck::Faulty(why) => {
            println!("CPU-FAULT xsavec: {why}; guests are not offered xsavec (they save with xsaveopt or xsave)");
            host.mark_faulty(levelling::features::XSAVEC, why);
        }
        arch::fpu::XsavecCheck::Sound => {
            println!("CPU xsavec checked: it writes the compacted format as SDM Vol. 1 13.4.3 says")
        }
        arch::fpu::XsavecCheck::NotApplicable => {}
    }
    let slice = time_slice(B::ARCH, caps);
    let machine_info = machine_info(&info, caps, &records);
    let boot_domains = core::mem::take(&mut info.domains);
    let mechanisms = match caps.virtualization {
        platform::caps::Virtualization::Vmx(v) => domain::dirty::Mechanisms { pml: v.pml, dbit: v.ept_ad },
        // NPT leaves carry dirty flags the nested walk sets (APM Vol. 2 15.25.5).
        _ => domain::dirty::Mechanisms { pml: false, dbit: true },
    };
    // 2 MiB nested pages: EPT where IA32_VMX_EPT_VPID_CAP allows them, always with NPT.
    let large_pages = match caps.virtualization {
        platform::caps::Virtualization::Vmx(v) => v.ept_2m,
        _ => true,
    };
    let mut machine = domain::Machine::new(backend, info.frames, host, slice, mechanisms, large_pages);
    // Every started AP runs the same scheduler over the same domains from here on.
    if B::VCPU_ON_ANY_CPU {
        let parallel = smp::BootOptions::parse(&info.cmdline).parallel_vcpus;
        machine.shared().set_parallel_vcpus(parallel);
        if parallel {
            println!("SMP smp-vcpus=parallel: a domain's vCPUs may run at the same time on different CPUs");
        }
        let mut cpus = alloc::vec![percpu::this().apic_id];
        cpus.extend(schedule_on_aps(&machine.shared()));
        machine.set_vcpu_cpus(cpus);
    }
    // The path the monitoring service's MSR accesses take to the other sockets, tried
    // once with a harmless job (after the APs took their schedulers, so it goes through
    // their between-slices mailbox check), so it is seen to work where RDT is absent.
    for line in platform::rdt::probe_sockets() {
        println!("{line}");
    }

    // Each image is freed once the last domain naming it has it in guest memory: the
    // heap never holds more than the distinct images not yet loaded.
    for boot in boot_domains {
        if let Err(e) = machine.create(&boot.config, &boot.kernel, &boot.initrd) {
            println!("DOMAIN-CREATE-FAILED name={}: {e}", boot.config.name);
        }
    }

    let mut handles = services::control::Handles::new();
    let vsock = match services::control::VsockTransport::start() {
        Ok(vsock) => Some(vsock),
        Err(services::control::ControlError::NoDevice) => {
            println!("CONTROL unavailable: no virtio-vsock device (PCI 1af4:1053)");
            None
        }
        Err(e) => {
            println!("FAIL: control channel: {e}");
            return Outcome::Failed;
        }
    };
    // After the vsock line: tools that wait for the first CONTROL line see vsock's.
    let serial = start_serial(&info.cmdline, &mut handles);
    let mut server = services::control::ControlServer::new(machine_info, vsock, serial, handles);
    let mut local = match services::local_migration::LocalMigration::from_cmdline(&info.cmdline) {
        None => None,
        Some(Ok(l)) => Some(l),
        Some(Err(e)) => {
            println!("warning: {e}; no local migration");
            None
        }
    };
    // HLT sleeps of the idle loop (`idle`), for the last line.
    let mut idle_sleeps = 0u64;
    // When the control channel or local migration last had work.
    let mut last_busy = drivers::time::now_ticks();
    let quiet_ticks = drivers::time::ms_to_ticks(CONTROL_QUIET_MS);
    let poll_ticks = drivers::time::ms_to_ticks(CONTROL_POLL_MS);
    let serial_poll_ticks = drivers::time::ms_to_ticks(1).map(|per_ms| per_ms * SERIAL_POLL_US / 1000);
    let serial_window = drivers::time::ms_to_ticks(SERIAL_ACTIVE_MS).unwrap_or(0);
    loop {
        let mut busy = false;
        // See SERIAL_POLL_US: slices end early only while a serial client is there.
        let serial_active = server.as_ref().is_some_and(|s| s.serial_active(serial_window));
        machine.cap_slice(if serial_active { serial_poll_ticks } else { None });
        if let Some(s) = server.as_mut() {
            busy |= s.poll(&mut machine);
        }
        if let Some(l) = local.as_mut() {
            busy |= l.step(&mut machine);
        }
        busy |= machine.run_slice();
        // Both domains of a local migration are paused during its last round.
        if server.is_none() && !machine.has_runnable() && !local.as_ref().is_some_and(|l| l.running()) {
            break;
        }
        let now = drivers::time::now_ticks();
        if busy {
            last_busy = now;
            continue;
        }
        let polling = server.is_some().then(|| Polling {
            quiet: now.wrapping_sub(last_busy),
            quiet_before_sleep: quiet_ticks.unwrap_or(u64::MAX),
            poll_every: if serial_active { serial_poll_ticks } else { poll_ticks }.unwrap_or(0),
        });
        let min = drivers::time::ms_to_ticks(1).map_or(u64::MAX, |per_ms| per_ms * IDLE_MIN_US / 1000);
        let lapic = &percpu::this().lapic;
        if let IdleAction::Sleep(ticks) = idle_action(machine.idle_ticks(), polling, min, lapic.available()) {
            sleep(lapic, ticks);
            idle_sleeps += 1;
        } else {
            core::hint::spin_loop();
        }
    }
    // The last lines of a slice another CPU ran come before these.
    drivers::console::wait_for_held_output(100);
    for cell in machine.domains() {
        let line = {
            let d = cell.lock();
            format!("DOMAIN {} FINAL name={} state={} exits={}", d.id, d.name, d.state, d.total_exits())
        };
        println!("{line}");
    }
    println!("IDLE: nothing left to run and no control channel to serve; powering off (idle sleeps: {idle_sleeps})");
    Outcome::Ready
}

/// Shorter waits than this spin: arming the timer and halting costs more.
const IDLE_MIN_US: u64 = 50;

/// While a control channel is served, the hypervisor spins for this long after its last
/// work before it starts to sleep: a transfer in progress (a migration's rounds, an
/// upload) never waits on a sleep. Sleeping 1 ms between every poll slowed the last
/// round of a 1 GiB live migration past the relay's 10 s acknowledgement timeout
/// (`migrate-stress-8m-to-1g-until-full`).
const CONTROL_QUIET_MS: u64 = 50;

/// Once quiet, it sleeps at most this long between polls of the control channel (its
/// virtio device is polled, not interrupt-driven): an idle hypervisor halts, and a new
/// request waits at most this long.
const CONTROL_POLL_MS: u64 = 1;

/// While a serial control client is active (it sent something within
/// [`SERIAL_ACTIVE_MS`], or replies are still leaving), the UART's receive FIFO is
/// drained at least this often, while guests run too: the 16550's 16 bytes fill in
/// 1.4 ms at 115200 baud, and real UARTs drop what comes after. Of the two ways to get
/// there, the time slice is capped at this (and the idle loop polls at this) rather
/// than draining the UART in the exit path: a guest that computes without exiting
/// (the spinner, a Linux busy loop) only leaves at its slice's end, so an exit-path
/// drain would still need the shorter slice, and the exit path stays free of device
/// I/O. The cost, 2000 preemption exits a second, is paid only while serial control
/// is in use: an idle line leaves the 10 ms slices and 1 ms idle polls as they were.
/// A client's first packet after a quiet spell is its `Open` (16 bytes with its
/// leading 0x00), which fits the FIFO however late the slower cadence reads it.
const SERIAL_POLL_US: u64 = 500;

/// How long after a serial client's last byte its line counts as active.
const SERIAL_ACTIVE_MS: u64 = 10_000;

/// The serial control channel the boot option (`hv.serial=`) asks for, if a UART
/// answers there; its `CONTROL` marker line either way.
fn start_serial(
    cmdline: &str,
    handles: &mut services::control::Handles,
) -> Option<services::serial_control::SerialTransport> {
    use services::serial_control::{SerialOption, SerialTransport};
    // A malformed option serves no serial line rather than the default: the operator
    // meant some other port or rate, and COM2 may be wired to something else (an IPMI
    // serial-over-LAN console, say).
    let option = match SerialOption::from_cmdline(cmdline) {
        Ok(option) => option,
        Err(e) => {
            println!("CONTROL serial off: {e}");
            return None;
        }
    };
    let SerialOption::Port { base, baud } = option else {
        println!("CONTROL serial off (hv.serial=off)");
        return None;
    };
    match SerialTransport::start(base, baud, handles) {
        Ok(serial) => {
            println!("CONTROL listening on serial {}", serial.listening());
            Some(serial)
        }
        Err(e) => {
            println!("CONTROL serial unavailable: {e}");
            None
        }
    }
}

/// How long the control channel has been quiet, in TSC ticks, and the rules above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Polling {
    quiet: u64,
    quiet_before_sleep: u64,
    poll_every: u64,
}

/// What the idle loop does when nothing ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdleAction {
    /// Try again at once.
    Spin,
    /// HLT until the host LAPIC timer fires this many TSC ticks from now.
    Sleep(u64),
}

/// Nothing could run: sleep until the next guest or device timer (`next`, ticks from
/// now; `None`: no timer), or, while a control channel is served (`polling`), until its
/// next poll once it has been quiet for a while. Spin when the wait is shorter than
/// `min` (arming and halting cost more) or when there is no host LAPIC timer to wake
/// the CPU (`lapic`).
fn idle_action(next: Option<u64>, polling: Option<Polling>, min: u64, lapic: bool) -> IdleAction {
    let wait = match polling {
        Some(p) if p.quiet < p.quiet_before_sleep => return IdleAction::Spin,
        Some(p) => Some(next.map_or(p.poll_every, |n| n.min(p.poll_every))),
        None => next,
    };
    match wait {
        Some(ticks) if lapic && ticks >= min => IdleAction::Sleep(ticks),
        _ => IdleAction::Spin,
    }
}

/// HLT for at most `ticks`, woken by the host LAPIC's one-shot timer (or any earlier
/// interrupt).
fn sleep(lapic: &drivers::lapic::HostLapic, ticks: u64) {
    lapic.arm_one_shot(ticks);
    // STI's shadow covers HLT (SDM Vol. 2B STI), so a timer that fired before HLT still
    // wakes it; CLI restores the hypervisor's interrupts-off state.
    // SAFETY: the IDT has a handler for every vector from 32 up that acknowledges it
    // (drivers::tables, drivers::lapic::acknowledge): taking an interrupt here is harmless.
    unsafe { core::arch::asm!("sti", "hlt", "cli", options(nomem, nostack)) };
    lapic.disarm();
}

/// The time slice in TSC ticks, if this CPU can preempt a guest: the VMX preemption
/// timer, or on SVM the local APIC timer (an INTR exit). Without either, a guest runs
/// until it exits by itself, and we say so.
fn time_slice(arch: guest_abi::Arch, caps: &platform::caps::Capabilities) -> Option<u64> {
    let ticks = drivers::time::ms_to_ticks(SLICE_MS)?;
    // The host LAPIC timer ends SVM slices and, on both, wakes the CPU from idle HLT.
    let lapic = percpu::this().lapic.init();
    if let Ok(per_ms) = lapic {
        log::info!("local APIC timer: {per_ms} ticks/ms");
    }
    match (arch, caps.virtualization, lapic) {
        (guest_abi::Arch::Vmx, platform::caps::Virtualization::Vmx(v), _) if v.preemption_timer => Some(ticks),
        (guest_abi::Arch::Svm, _, Ok(_)) => {
            log::info!("{SLICE_MS} ms slices on the local APIC timer");
            Some(ticks)
        }
        (guest_abi::Arch::Svm, _, Err(e)) => {
            println!("warning: no preemption ({e}); a guest that never exits will starve the others");
            None
        }
        _ => {
            println!("warning: no VMX preemption timer; a guest that never exits will starve the others");
            None
        }
    }
}

fn machine_info(
    info: &BootInfo,
    caps: &platform::caps::Capabilities,
    records: &[levelling::CpuidRecord],
) -> services::tasks::MachineInfo {
    let memory_bytes = info
        .memory_map
        .iter()
        .filter(|r| matches!(r.kind, RegionKind::Usable | RegionKind::Hypervisor))
        .map(|r| r.pages * mm::PAGE_SIZE)
        .sum();
    services::tasks::MachineInfo {
        hv_version: alloc::format!("{} ({})", VERSION, info.git_revision),
        capabilities: caps
            .machine_line()
            .split_whitespace()
            .skip(1)
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (String::from(k), String::from(v)))
            .collect(),
        // The bootstrap CPU and the started (parked) APs; only the first schedules.
        // The CPUs that run (the boot CPU and every AP with virtualization on), not
        // every CPU that installed its PerCpu: an AP that failed its job parks unused.
        cpus: smp::cpus()
            .iter()
            .filter(|c| matches!(c.state(), smp::CpuState::Boot | smp::CpuState::Started))
            .count()
            .max(1) as u32,
        cpu_list: {
            let sockets = platform::rdt::socket_map();
            smp::cpus()
                .iter()
                .map(|c| wire::CpuInfo {
                    apic_id: c.apic_id,
                    state: c.state().to_wire(),
                    package: c.package(),
                    socket: sockets.socket_of(c.apic_id),
                })
                .collect()
        },
        memory_bytes,
        // Filled in once the control transports have started.
        control: alloc::vec::Vec::new(),
        cpuid: wire::HostCpuidReport {
            source: alloc::format!("hv {} ({}) on {}", VERSION, info.git_revision, caps.identity()),
            records: records
                .iter()
                .map(|r| wire::CpuidLeaf { leaf: r.leaf, subleaf: r.subleaf, regs: r.regs })
                .collect(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLL: Polling = Polling { quiet: 1000, quiet_before_sleep: 500, poll_every: 100 };

    #[test]
    fn without_a_control_channel_it_sleeps_until_the_next_timer() {
        assert_eq!(idle_action(Some(5000), None, 50, true), IdleAction::Sleep(5000));
        assert_eq!(idle_action(Some(10), None, 50, true), IdleAction::Spin, "too short to be worth a HLT");
        assert_eq!(idle_action(None, None, 50, true), IdleAction::Spin, "nothing would wake it");
        assert_eq!(idle_action(Some(5000), None, 50, false), IdleAction::Spin, "no host LAPIC timer");
    }

    #[test]
    fn a_served_control_channel_spins_while_busy_and_polls_in_sleeps_once_quiet() {
        let busy = Polling { quiet: 499, ..POLL };
        assert_eq!(idle_action(Some(5000), Some(busy), 50, true), IdleAction::Spin, "a transfer is in progress");
        assert_eq!(idle_action(Some(5000), Some(POLL), 50, true), IdleAction::Sleep(100), "wake for the next poll");
        assert_eq!(idle_action(Some(70), Some(POLL), 50, true), IdleAction::Sleep(70), "a guest timer comes first");
        assert_eq!(idle_action(None, Some(POLL), 50, true), IdleAction::Sleep(100), "idle with no guests: still halts");
        assert_eq!(idle_action(None, Some(POLL), 150, true), IdleAction::Spin);
    }

    #[test]
    fn coalesce_merges_only_contiguous_regions_of_one_kind() {
        let r = |start, pages, kind| MemoryRegion { start, pages, kind };
        let map = [
            r(0, 1, RegionKind::Usable),
            r(0x1000, 2, RegionKind::Usable),
            r(0x3000, 1, RegionKind::Hypervisor),
            r(0x4000, 1, RegionKind::Usable),
            r(0x6000, 1, RegionKind::Usable), // gap at 0x5000: not merged
        ];
        assert_eq!(
            coalesce(&map),
            [
                r(0, 3, RegionKind::Usable),
                r(0x3000, 1, RegionKind::Hypervisor),
                r(0x4000, 1, RegionKind::Usable),
                r(0x6000, 1, RegionKind::Usable),
            ]
        );
    }
}
