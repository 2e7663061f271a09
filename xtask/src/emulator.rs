//! Running the image on an emulator with a timeout, collecting the serial log.
//!
//! QEMU 7.2 TCG + OVMF (4 MiB) with `-cpu EPYC` emulates AMD SVM with NPT; its serial
//! goes to our pipe. Bochs 2.7 + OVMF (2 MiB, code and vars joined into one ROM)
//! emulates Intel VMX with EPT/A/D/PML; its serial goes to a file we poll, and its
//! exit status is always 1, so outcomes come from serial markers only. Each run gets
//! its own directory under target/xtask/runs/NAME with a fresh ESP copy, so runs do
//! not share firmware variables or Bochs' vvfat redolog.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::Result;
use crate::image::Esp;
use crate::serial::{SerialLog, clean};
use crate::tools;

/// Where to boot.
#[derive(Debug, Clone)]
pub enum Platform {
    /// QEMU TCG with this `-cpu` model.
    Qemu {
        /// e.g. "EPYC", "qemu64,-svm".
        cpu: String,
    },
    /// Bochs with this CPU model.
    Bochs {
        /// e.g. "corei7_skylake_x".
        model: String,
    },
}

impl Platform {
    /// Default timeout: generous for a loaded 2-core machine.
    pub fn default_timeout_secs(&self) -> u64 {
        match self {
            Platform::Qemu { .. } => 60,
            Platform::Bochs { .. } => 180,
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Platform::Qemu { cpu } => write!(f, "QEMU TCG -cpu {cpu}"),
            Platform::Bochs { model } => write!(f, "Bochs {model}"),
        }
    }
}

/// How to run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Run directory name.
    pub name: String,
    /// Kill the emulator after this long.
    pub timeout: Duration,
    /// Written to \EFI\BOOT\HV.CMD when not empty.
    pub cmdline: String,
    /// Copy the serial output to our stdout as it arrives.
    pub echo: bool,
}

/// What a run produced.
#[derive(Debug)]
pub struct RunResult {
    /// Raw serial output.
    pub serial: String,
    /// Time from start to the emulator's end (or to the timeout).
    pub elapsed: Duration,
    /// Time from start until the READY line appeared.
    pub ready_after: Option<Duration>,
    /// The timeout fired and the emulator was killed.
    pub timed_out: bool,
    /// Where the run's files are (ESP copy, logs).
    pub dir: PathBuf,
}

fn prepare_dir(esp: &Esp, config: &RunConfig) -> Result<PathBuf> {
    let dir = esp.dir.parent().unwrap_or(Path::new(".")).join("xtask").join("runs").join(&config.name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| format!("cannot clean {}: {e}", dir.display()))?;
    }
    let boot = dir.join("esp").join("EFI").join("BOOT");
    std::fs::create_dir_all(&boot).map_err(|e| format!("cannot create {}: {e}", boot.display()))?;
    std::fs::copy(&esp.efi, boot.join("BOOTX64.EFI")).map_err(|e| format!("cannot copy the image: {e}"))?;
    if !config.cmdline.is_empty() {
        std::fs::write(boot.join("HV.CMD"), format!("{}\n", config.cmdline)).map_err(|e| format!("HV.CMD: {e}"))?;
    }
    Ok(dir)
}

/// Boot `esp` on `platform` and collect the serial log until the hypervisor shuts the
/// machine down, the emulator exits, or the timeout fires.
pub fn run(platform: &Platform, esp: &Esp, config: &RunConfig) -> Result<RunResult> {
    let dir = prepare_dir(esp, config)?;
    match platform {
        Platform::Qemu { cpu } => run_qemu(cpu, &dir, config),
        Platform::Bochs { model } => run_bochs(model, &dir, config),
    }
}

fn run_qemu(cpu: &str, dir: &Path, config: &RunConfig) -> Result<RunResult> {
    let vars = dir.join("vars.fd");
    std::fs::copy(tools::OVMF_VARS_4M, &vars).map_err(|e| format!("cannot copy {}: {e}", tools::OVMF_VARS_4M))?;
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-nodefaults", "-machine", "q35", "-accel", "tcg", "-cpu", cpu, "-m", "512M"])
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,unit=0,readonly=on,file={}", tools::OVMF_CODE_4M))
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,unit=1,file={}", vars.display()))
        .arg("-drive")
        .arg(format!("format=raw,file=fat:rw:{}", dir.join("esp").display()))
        .args(["-serial", "stdio", "-display", "none", "-no-reboot"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(dir.join("qemu.stderr")).map_err(|e| format!("qemu.stderr: {e}"))?));
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("cannot start qemu-system-x86_64: {e}"))?;
    let mut stdout = child.stdout.take().ok_or("qemu has no stdout pipe")?;
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    watch(child, start, config, move |serial| {
        while let Ok(chunk) = rx.try_recv() {
            serial.extend_from_slice(&chunk);
        }
        // Block briefly for more output so the loop does not spin.
        if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(50)) {
            serial.extend_from_slice(&chunk);
        }
    })
    .map(|r| RunResult { dir: dir.to_path_buf(), ..r })
}

fn run_bochs(model: &str, dir: &Path, config: &RunConfig) -> Result<RunResult> {
    // Bochs 2.7 takes at most a 2 MiB ROM: Debian's 2 MiB vars and code, joined.
    let rom = dir.join("ovmf-2m.fd");
    let mut image = std::fs::read(tools::OVMF_VARS_2M).map_err(|e| format!("{}: {e}", tools::OVMF_VARS_2M))?;
    image.extend(std::fs::read(tools::OVMF_CODE_2M).map_err(|e| format!("{}: {e}", tools::OVMF_CODE_2M))?);
    std::fs::write(&rom, image).map_err(|e| format!("{}: {e}", rom.display()))?;
    let serial_path = dir.join("serial.txt");
    std::fs::write(&serial_path, b"").map_err(|e| format!("{}: {e}", serial_path.display()))?;
    // Verified settings (shared/PLATFORMS.md), plus: the sound and speaker devices are
    // set to dummy/off because on a machine without a sound card Bochs' ALSA probe
    // aborts with "buffer overflow detected".
    let bxrc = format!(
        "display_library: rfb, options=\"timeout=0\"
memory: host=512, guest=512
romimage: file={rom}, address=0xffe00000, options=none
vgaromimage: file={vga}
boot: disk
ata0: enabled=true, ioaddr1=0x1f0, ioaddr2=0x3f0, irq=14
ata0-master: type=disk, path={esp}, mode=vvfat, journal={redolog}
pci: enabled=1, chipset=i440fx
cpu: count=1, ips=50000000, model={model}, reset_on_triple_fault=0, ignore_bad_msrs=1
clock: sync=none, time0=local, rtc_sync=0
com1: enabled=true, mode=file, dev={serial}
panic: action=fatal
log: {log}
speaker: enabled=0
sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy
",
        rom = rom.display(),
        vga = tools::VGABIOS,
        esp = dir.join("esp").display(),
        redolog = dir.join("vvfat-redolog").display(),
        serial = serial_path.display(),
        log = dir.join("bochs.log").display(),
    );
    let bxrc_path = dir.join("hv.bxrc");
    std::fs::write(&bxrc_path, bxrc).map_err(|e| format!("{}: {e}", bxrc_path.display()))?;
    // Without a command file Bochs stops in its debugger at t=0; `c` continues.
    let rc = dir.join("cont.rc");
    std::fs::write(&rc, "c\n").map_err(|e| format!("{}: {e}", rc.display()))?;
    let out = std::fs::File::create(dir.join("bochs.out")).map_err(|e| format!("bochs.out: {e}"))?;
    let err = out.try_clone().map_err(|e| format!("bochs.out: {e}"))?;
    let start = Instant::now();
    let child = Command::new("bochs")
        .arg("-q")
        .arg("-f")
        .arg(&bxrc_path)
        .arg("-rc")
        .arg(&rc)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .map_err(|e| format!("cannot start bochs: {e}"))?;
    watch(child, start, config, move |serial| {
        std::thread::sleep(Duration::from_millis(100));
        if let Ok(now) = std::fs::read(&serial_path)
            && now.len() > serial.len()
        {
            serial.extend_from_slice(&now[serial.len()..]);
        }
    })
    .map(|r| RunResult { dir: dir.to_path_buf(), ..r })
}

/// Poll `collect` for serial output until the emulator exits, the hypervisor's
/// SHUTDOWN marker appears (then give the emulator a few seconds to exit by itself),
/// or the timeout fires. The emulator never outlives this function.
fn watch(
    mut child: Child,
    start: Instant,
    config: &RunConfig,
    mut collect: impl FnMut(&mut Vec<u8>),
) -> Result<RunResult> {
    let mut serial = Vec::new();
    let mut echoed = 0;
    let mut ready_after = None;
    let mut shutdown_seen: Option<Instant> = None;
    let mut timed_out = false;
    loop {
        collect(&mut serial);
        // Echo whole lines only, so an escape sequence split across reads is still
        // recognised and stripped.
        if config.echo
            && let Some(end) = serial[echoed..].iter().rposition(|&b| b == b'\n')
        {
            print!("{}", clean(&String::from_utf8_lossy(&serial[echoed..echoed + end + 1])));
            echoed += end + 1;
        }
        let text = String::from_utf8_lossy(&serial);
        if ready_after.is_none() && SerialLog::new(&text).ready_at() {
            ready_after = Some(start.elapsed());
        }
        if shutdown_seen.is_none() && SerialLog::new(&text).outcome().is_some() {
            shutdown_seen = Some(Instant::now());
        }
        if let Ok(Some(_)) = child.try_wait() {
            collect(&mut serial);
            break;
        }
        if shutdown_seen.is_some_and(|t| t.elapsed() > Duration::from_secs(10)) {
            let _ = child.kill();
            break;
        }
        if start.elapsed() > config.timeout {
            timed_out = true;
            let _ = child.kill();
            break;
        }
    }
    let _ = child.wait();
    if config.echo && serial.len() > echoed {
        print!("{}", clean(&String::from_utf8_lossy(&serial[echoed..])));
    }
    Ok(RunResult {
        serial: String::from_utf8_lossy(&serial).into_owned(),
        elapsed: start.elapsed(),
        ready_after,
        timed_out,
        dir: PathBuf::new(),
    })
}
