//! UEFI entry point: the only code that talks to firmware.
//!
//! Order of events: take COM1, print the banner, reserve the hypervisor's heap and
//! frame pool from firmware (so they survive ExitBootServices), read the optional
//! command-line file `\EFI\BOOT\HV.CMD` from the boot volume, exit boot services
//! (which returns the final memory map), turn interrupts off and hand the machine to
//! `hv::run`. The outcome becomes a firmware ResetSystem(Shutdown): under QEMU that
//! ends the process, under Bochs it is an ACPI soft-off.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::panic::PanicInfo;

use alloc::format;
use hv::{BootInfo, MemoryRegion, Outcome, RegionKind, println};
use uefi::boot::{self, AllocateType, MemoryType};
use uefi::mem::memory_map::MemoryMap;
use uefi::runtime::{self, ResetType};
use uefi::{Status, entry};

/// Frames for device DMA (virtqueues and their buffers).
const DMA_PAGES: usize = 512; // 2 MiB

/// The heap behind `alloc` for boot and hv (hv counts its use for `hvctl info`).
#[global_allocator]
static HEAP: hv::heap::Heap = hv::heap::Heap::empty();

#[entry]
fn main() -> Status {
    hv::drivers::console::init();
    println!();
    println!("hv {} ({}) - x86_64 hypervisor, UEFI boot", hv::VERSION, env!("HV_GIT_REV"));
    hv::set_shutdown_hook(shutdown);

    // The heap and the frame pool are sized from the memory the firmware has free
    // (hv::heap::plan), not fixed: guests may use all RAM but a slack for firmware.
    let conventional = conventional_pages();
    let plan = hv::heap::plan(conventional, DMA_PAGES);
    let heap = match boot::allocate_pages(AllocateType::AnyPages, MemoryType::LOADER_DATA, plan.heap_pages) {
        Ok(p) => p,
        Err(e) => fail(format_args!("cannot reserve {} MiB for the heap: {e:?}", plan.heap_pages / 256)),
    };
    // SAFETY: the firmware just gave us these pages as LOADER_DATA; they stay ours after
    // ExitBootServices and nothing else uses them. `init` is called once.
    unsafe { HEAP.init(heap.as_ptr(), plan.heap_pages * 4096) };

    let (pool, pool_pages) = match reserve_pool(plan.pool_pages_max, plan.pool_pages_min) {
        Ok(p) => p,
        Err(e) => fail(format_args!("cannot reserve a frame pool: {e}")),
    };
    println!(
        "Memory: {} MiB free at boot; heap {} MiB, frame pool {} MiB",
        conventional / 256,
        plan.heap_pages / 256,
        pool_pages / 256
    );
    // SAFETY: as for the heap: page-aligned LOADER_DATA pages that only the pool uses,
    // identity-mapped by the firmware (UEFI runs in long mode with VA == PA).
    let frames = unsafe { hv::mm::frames::FramePool::new(pool.as_ptr() as u64, pool_pages) };

    let dma = match boot::allocate_pages(AllocateType::AnyPages, MemoryType::LOADER_DATA, DMA_PAGES) {
        Ok(p) => p,
        Err(e) => fail(format_args!("cannot reserve {} MiB for device DMA: {e:?}", DMA_PAGES / 256)),
    };
    // SAFETY: as for the frame pool.
    let dma_frames = unsafe { hv::mm::frames::FramePool::new(dma.as_ptr() as u64, DMA_PAGES) };

    let cpus = firmware_cpus();
    let ap_trampoline = reserve_trampoline();
    let unix_time = wall_clock();
    let cmdline = read_cmdline();
    let domains = read_domains();
    if !cmdline.is_empty() {
        println!("Command line: {cmdline}");
    }

    println!("Exiting boot services");
    // SAFETY: nothing from boot services is used after this point: the console is our
    // own COM1 driver, the heap and pool are LOADER_DATA we own, and no protocol
    // handles are held (read_file drops its file system handle).
    let map = unsafe { boot::exit_boot_services(None) };
    // SAFETY: with boot services gone, the firmware's interrupt handlers are no longer
    // ours to rely on; the hypervisor runs with interrupts off on its own IDT.
    unsafe { core::arch::asm!("cli") };

    let mut memory_map: Vec<MemoryRegion> = map
        .entries()
        .map(|d| MemoryRegion { start: d.phys_start, pages: d.page_count, kind: region_kind(d.ty) })
        .collect();
    memory_map.sort_by_key(|r| r.start);

    let outcome = hv::run(BootInfo {
        memory_map,
        frames,
        dma_frames: Some(dma_frames),
        cmdline,
        git_revision: env!("HV_GIT_REV"),
        domains,
        unix_time,
        cpus,
        ap_trampoline,
    });
    shutdown(outcome)
}

/// The CPUs the firmware knows, from its MP services protocol (PI Vol. 2 13.4,
/// EFI_MP_SERVICES_PROTOCOL): the local APIC ID of each, whether it is the BSP and
/// enabled. Empty, with a note, if the firmware has no such protocol; hv then runs on
/// the boot CPU alone. Only asked, never used to start a CPU: the APs must keep
/// running after ExitBootServices, which MP services do not promise, so hv starts
/// them itself with INIT-SIPI-SIPI.
fn firmware_cpus() -> Vec<hv::smp::FirmwareCpu> {
    use uefi::proto::pi::mp::MpServices;
    let mp = match boot::get_handle_for_protocol::<MpServices>().and_then(boot::open_protocol_exclusive::<MpServices>) {
        Ok(mp) => mp,
        Err(e) => {
            println!("note: no UEFI MP services ({:?}); the other CPUs stay stopped", e.status());
            return Vec::new();
        }
    };
    let total = match mp.get_number_of_processors() {
        Ok(n) => n.total,
        Err(e) => {
            println!("note: MP services cannot count the CPUs ({:?}); the other CPUs stay stopped", e.status());
            return Vec::new();
        }
    };
    (0..total)
        .filter_map(|i| mp.get_processor_info(i).ok())
        .map(|p| hv::smp::FirmwareCpu {
            apic_id: u32::try_from(p.processor_id).unwrap_or(u32::MAX),
            bsp: p.is_bsp(),
            enabled: p.is_enabled(),
        })
        .collect()
}

/// One page below 1 MiB for the APs' real-mode trampoline (a STARTUP IPI's vector is
/// a page number below 0x100; SDM Vol. 3A 11.6.1), below the EBDA at 0xA0000. Code
/// memory, so the firmware's page tables leave it executable.
fn reserve_trampoline() -> Option<u64> {
    match boot::allocate_pages(AllocateType::MaxAddress(0x9_ffff), MemoryType::LOADER_CODE, 1) {
        Ok(p) => Some(p.as_ptr() as u64),
        Err(e) => {
            println!("note: no free page below 640 KiB for the AP trampoline ({:?})", e.status());
            None
        }
    }
}

/// The firmware's clock as Unix seconds (UTC), or `None` if it has none.
fn wall_clock() -> Option<i64> {
    let t = runtime::get_time().ok()?;
    let civil = hv::devices::rtc::Civil {
        year: i64::from(t.year()),
        month: t.month(),
        day: t.day(),
        hour: t.hour(),
        minute: t.minute(),
        second: t.second(),
        weekday: 0,
    };
    let local = hv::devices::rtc::civil_to_unix(&civil);
    // The offset of the firmware's time from UTC in minutes (`uefi`: local = UTC +
    // offset), or unspecified, as OVMF reports: QEMU's and Bochs' clocks are then UTC
    // (`clock: time0=utc` / QEMU's default `-rtc base=utc`).
    let utc = match t.time_zone() {
        Some(tz) => local - i64::from(tz) * 60,
        None => local,
    };
    Some(utc)
}

/// Pages of conventional (free) memory in the firmware's map now.
fn conventional_pages() -> usize {
    match boot::memory_map(MemoryType::LOADER_DATA) {
        Ok(map) => map
            .entries()
            .filter(|d| d.ty == MemoryType::CONVENTIONAL)
            .map(|d| usize::try_from(d.page_count).unwrap_or(usize::MAX))
            .fold(0usize, usize::saturating_add),
        Err(e) => fail(format_args!("cannot read the firmware's memory map: {e:?}")),
    }
}

/// The largest contiguous run of at most `max` pages the firmware can give, found by
/// asking for less (by 1/16 of `max` each time) until it succeeds; refused below `min`.
fn reserve_pool(max: usize, min: usize) -> Result<(core::ptr::NonNull<u8>, usize), String> {
    let step = (max / 16).max(256);
    let mut pages = max;
    while pages >= min {
        if let Ok(p) = boot::allocate_pages(AllocateType::AnyPages, MemoryType::LOADER_DATA, pages) {
            return Ok((p, pages));
        }
        pages = pages.saturating_sub(step);
    }
    Err(format!("the firmware has no free run of {} MiB or more ({} MiB asked for first)", min / 256, max / 256))
}

fn region_kind(ty: MemoryType) -> RegionKind {
    match ty {
        MemoryType::CONVENTIONAL | MemoryType::BOOT_SERVICES_CODE | MemoryType::BOOT_SERVICES_DATA => {
            RegionKind::Usable
        }
        MemoryType::LOADER_CODE | MemoryType::LOADER_DATA => RegionKind::Hypervisor,
        MemoryType::RUNTIME_SERVICES_CODE | MemoryType::RUNTIME_SERVICES_DATA => RegionKind::FirmwareRuntime,
        MemoryType::ACPI_RECLAIM => RegionKind::AcpiReclaim,
        MemoryType::ACPI_NON_VOLATILE => RegionKind::AcpiNvs,
        MemoryType::MMIO | MemoryType::MMIO_PORT_SPACE => RegionKind::Mmio,
        other => RegionKind::Reserved(other.0),
    }
}

/// Read a file from the boot volume: `Ok(None)` if it does not exist.
fn read_file(path: &str) -> Result<Option<Vec<u8>>, String> {
    let fs = boot::get_image_file_system(boot::image_handle()).map_err(|e| format!("no boot file system ({e:?})"))?;
    let mut fs = uefi::fs::FileSystem::new(fs);
    let name = uefi::CString16::try_from(path).map_err(|_| format!("{path}: not a valid UEFI path"))?;
    match fs.read(name.as_ref()) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(uefi::fs::Error::Io(e)) if e.uefi_error.status() == Status::NOT_FOUND => Ok(None),
        Err(e) => Err(format!("cannot read {path}: {e}")),
    }
}

/// The optional command line: the first line of `\EFI\BOOT\HV.CMD` on the boot
/// volume. Absent is normal; any other error is reported and treated as empty.
fn read_cmdline() -> String {
    match read_file("\\EFI\\BOOT\\HV.CMD") {
        Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).lines().next().unwrap_or("").trim().into(),
        Ok(None) => String::new(),
        Err(e) => {
            println!("note: {e}; empty command line");
            String::new()
        }
    }
}

/// Boot-time domains: `\EFI\HV\DOMAINS.CFG` (format: hv::domain::config) and the
/// kernel and initrd files it names in `\EFI\HV`. A bad file is reported and no
/// domain starts; a domain whose files cannot be read is reported and left out.
///
/// Each file is read once, however many domains name it (FAT names are compared
/// without case, as the file system does): three Linux domains of one 11 MiB kernel
/// hold 11 MiB of the heap until they are created, not 33.
fn read_domains() -> Vec<hv::BootDomain> {
    let text = match read_file("\\EFI\\HV\\DOMAINS.CFG") {
        Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
        Ok(None) => return Vec::new(),
        Err(e) => {
            println!("DOMAIN-CONFIG-ERROR {e}");
            return Vec::new();
        }
    };
    let configs = match hv::domain::config::parse(&text) {
        Ok(c) => c,
        Err(e) => {
            println!("DOMAIN-CONFIG-ERROR {e}");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    // The files read so far, by upper-cased name.
    let mut images: BTreeMap<String, hv::BootImage> = BTreeMap::new();
    for config in configs {
        let mut read = |what: &str, name: &str| {
            let key = name.to_ascii_uppercase();
            if let Some(image) = images.get(&key) {
                return Ok(image.clone());
            }
            let path = format!("\\EFI\\HV\\{name}");
            match read_image(&path) {
                Ok(Some(bytes)) => {
                    let image = Arc::new(bytes);
                    images.insert(key, image.clone());
                    Ok(image)
                }
                Ok(None) => Err(format!("domain {}: {what} {path} does not exist", config.name)),
                Err(e) => Err(format!("domain {}: {e}", config.name)),
            }
        };
        let kernel = match read("kernel", &config.kernel) {
            Ok(k) => k,
            Err(e) => {
                println!("DOMAIN-CONFIG-ERROR {e}");
                continue;
            }
        };
        let initrd = match config.initrd.as_deref().map(|name| read("initrd", name)) {
            None => Arc::new(Vec::new()),
            Some(Ok(i)) => i,
            Some(Err(e)) => {
                println!("DOMAIN-CONFIG-ERROR {e}");
                continue;
            }
        };
        out.push(hv::BootDomain { config, kernel, initrd });
    }
    let bytes: usize = images.values().map(|i| i.len()).sum();
    println!(
        "Boot domains: {} configured in \\EFI\\HV\\DOMAINS.CFG ({} distinct files, {} KiB on the heap)",
        out.len(),
        images.len(),
        bytes >> 10
    );
    out
}

/// Read a kernel or initrd image from the boot volume into one heap buffer of exactly
/// its size (no copy, no growth), allocated fallibly: a file larger than the heap has
/// room for is an error that says so, not an allocation failure. `Ok(None)` if it
/// does not exist.
fn read_image(path: &str) -> Result<Option<Vec<u8>>, String> {
    use uefi::proto::media::file::{File, FileAttribute, FileInfo, FileMode};
    let mut fs =
        boot::get_image_file_system(boot::image_handle()).map_err(|e| format!("no boot file system ({e:?})"))?;
    let mut root = fs.open_volume().map_err(|e| format!("cannot open the boot volume: {:?}", e.status()))?;
    let name = uefi::CString16::try_from(path).map_err(|_| format!("{path}: not a valid UEFI path"))?;
    let handle = match root.open(&name, FileMode::Read, FileAttribute::empty()) {
        Ok(h) => h,
        Err(e) if e.status() == Status::NOT_FOUND => return Ok(None),
        Err(e) => return Err(format!("cannot open {path}: {:?}", e.status())),
    };
    let Some(mut file) = handle.into_regular_file() else {
        return Err(format!("{path} is a directory, not a file"));
    };
    let info = file.get_boxed_info::<FileInfo>().map_err(|e| format!("cannot stat {path}: {:?}", e.status()))?;
    let size = usize::try_from(info.file_size()).map_err(|_| format!("{path} is too large"))?;
    let mut bytes = Vec::new();
    if bytes.try_reserve_exact(size).is_err() {
        let heap = hv::heap::stats();
        return Err(format!(
            "{path} is {size} bytes ({} MiB), more than the hypervisor's heap can hold now ({} of {} MiB in use)",
            size >> 20,
            heap.used >> 20,
            heap.size >> 20
        ));
    }
    bytes.resize(size, 0);
    let mut done = 0;
    while done < size {
        let n = file.read(&mut bytes[done..]).map_err(|e| format!("reading {path}: {:?}", e.status()))?;
        if n == 0 {
            return Err(format!("{path}: the file ended after {done} of {size} bytes"));
        }
        done += n;
    }
    Ok(Some(bytes))
}

fn fail(args: core::fmt::Arguments<'_>) -> ! {
    println!("FAIL: {args}");
    shutdown(Outcome::Failed)
}

/// Power off through the firmware's runtime services (valid after
/// ExitBootServices). The marker tells the log reader what happened.
fn shutdown(outcome: Outcome) -> ! {
    println!("SHUTDOWN outcome={outcome:?}");
    let status = match outcome {
        Outcome::Ready => Status::SUCCESS,
        Outcome::Refused => Status::UNSUPPORTED,
        Outcome::Failed => Status::ABORTED,
    };
    runtime::reset(ResetType::SHUTDOWN, status, None)
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    println!("FAIL: panic: {info}");
    shutdown(Outcome::Failed)
}
