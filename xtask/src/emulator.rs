//! Running the image on an emulator with a timeout, collecting the serial log.
//!
//! QEMU 7.2 TCG + OVMF (4 MiB) with `-cpu EPYC` emulates AMD SVM with NPT; its serial
//! goes to our pipe, and a copy, cleaned of escape sequences, to `serial.log` in the
//! run directory. Bochs 2.7 + OVMF (2 MiB, code and vars joined into one ROM)
//! emulates Intel VMX with EPT/A/D/PML; its serial goes to a file we poll (`serial.txt`,
//! raw), and its
//! exit status is always 1, so outcomes come from serial markers only. Each run gets
//! its own directory under target/xtask/runs/NAME with a fresh ESP copy, so runs do
//! not share firmware variables or Bochs' vvfat redolog.
//!
//! A run that serves the control channel ([`RunConfig::vsock`]) also gets COM2, the
//! serial control channel, as a raw byte stream on the unix socket `RUNDIR/com2.sock`
//! ([`Session::serial_socket`]): QEMU serves it itself (`-chardev socket,server=on`),
//! Bochs through [`crate::serial_relay`] (its own socket modes take one client for its
//! lifetime). One client at a time on both; the next connects after it.

use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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
    /// Serve the control channel: on QEMU a virtio-vsock device (served by
    /// vhost-device-vsock) and COM2 on a socket; on Bochs, which has no virtio-vsock,
    /// COM2 on a socket alone (see [`Session::serial_socket`]).
    pub vsock: bool,
    /// Contents of \EFI\HV\DOMAINS.CFG (boot-time domains), if any.
    pub domains: Option<String>,
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

/// A file to put into the run's ESP as `\EFI\HV\NAME` (e.g. a Linux kernel as
/// `VMLINUZ`), for DOMAINS.CFG to name: (NAME, the file on the host).
pub type Staged = (String, PathBuf);

fn prepare_dir(esp: &Esp, config: &RunConfig, staged: &[Staged]) -> Result<PathBuf> {
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
    let guests = dir.join("esp").join("EFI").join("HV");
    std::fs::create_dir_all(&guests).map_err(|e| format!("cannot create {}: {e}", guests.display()))?;
    for name in crate::image::GUESTS {
        let file = format!("{name}.elf");
        std::fs::copy(esp.dir.join("EFI").join("HV").join(&file), guests.join(&file))
            .map_err(|e| format!("cannot copy {file}: {e}"))?;
    }
    for (name, from) in staged {
        // A copy, not a link: QEMU's vvfat is read-write and writes back to this tree.
        // Both emulators read the ESP as a vvfat directory, not an image we build, so
        // there is no size to fix: a 14 MB bzImage staged here loads through OVMF on
        // QEMU and on Bochs alike.
        std::fs::copy(from, guests.join(name))
            .map_err(|e| format!("cannot stage {} as \\EFI\\HV\\{name}: {e}", from.display()))?;
    }
    if let Some(cfg) = &config.domains {
        std::fs::write(guests.join("DOMAINS.CFG"), cfg).map_err(|e| format!("DOMAINS.CFG: {e}"))?;
    }
    Ok(dir)
}

/// Boot `esp` on `platform` and collect the serial log until the hypervisor shuts the
/// machine down, the emulator exits, or the timeout fires.
pub fn run(platform: &Platform, esp: &Esp, config: &RunConfig) -> Result<RunResult> {
    let mut session = Session::spawn(platform, esp, config)?;
    let mut echo = Echo::new(config.echo);
    let outcome = session.wait_until(config.timeout, &mut echo, |log| log.outcome().is_some());
    let ready_after = session.ready_after;
    let timed_out = matches!(outcome, Wait::TimedOut);
    if matches!(outcome, Wait::Matched(_)) {
        // The hypervisor powered off; give the emulator a moment to exit by itself.
        let _ = session.wait_until(Duration::from_secs(10) + session.start.elapsed(), &mut echo, |_| false);
    }
    session.stop();
    echo.flush(&session.serial_bytes());
    Ok(RunResult {
        serial: session.serial(),
        elapsed: session.start.elapsed(),
        ready_after,
        timed_out,
        dir: session.dir.clone(),
    })
}

/// How a wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// The condition held, this long after start.
    Matched(Duration),
    /// The emulator exited first.
    Exited,
    /// The deadline passed.
    TimedOut,
}

/// Copies serial output to stdout, whole lines at a time (so an escape sequence split
/// across reads is still recognised and stripped).
#[derive(Debug)]
pub struct Echo {
    on: bool,
    done: usize,
}

impl Echo {
    /// Echo when `on`.
    pub fn new(on: bool) -> Self {
        Self { on, done: 0 }
    }
    fn lines(&mut self, serial: &[u8]) {
        if self.on
            && let Some(end) = serial[self.done..].iter().rposition(|&b| b == b'\n')
        {
            print!("{}", clean(&String::from_utf8_lossy(&serial[self.done..self.done + end + 1])));
            self.done += end + 1;
        }
    }
    fn flush(&mut self, serial: &[u8]) {
        if self.on && serial.len() > self.done {
            println!("{}", clean(&String::from_utf8_lossy(&serial[self.done..])));
            self.done = serial.len();
        }
    }
}

/// A running emulator (and its vsock backend), whose serial output a background
/// thread collects. Dropping it stops both processes.
#[derive(Debug)]
pub struct Session {
    child: Child,
    backend: Option<Child>,
    serial: Arc<Mutex<Vec<u8>>>,
    stop_collector: Arc<AtomicBool>,
    /// When the emulator started.
    pub start: Instant,
    /// When READY first appeared, if it did (measured by `wait_until`).
    pub ready_after: Option<Duration>,
    /// The run's directory.
    pub dir: PathBuf,
    /// The hybrid vsock socket (`unix:PATH:PORT` target), when a vsock device is attached.
    pub vsock_socket: Option<PathBuf>,
    /// COM2 as a raw byte stream (`unix:PATH` target: serial packets, wire::serial),
    /// when the control channel is served: QEMU's own socket, or Bochs' relay.
    pub serial_socket: Option<PathBuf>,
    /// The COM2 relay of a Bochs run.
    relay: Option<crate::serial_relay::SerialRelay>,
    /// The file the serial output is kept in as it arrives.
    pub serial_path: PathBuf,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Session {
    /// Start `platform` on a fresh copy of `esp`.
    pub fn spawn(platform: &Platform, esp: &Esp, config: &RunConfig) -> Result<Session> {
        Self::spawn_staged(platform, esp, config, &[])
    }

    /// Like [`Session::spawn`], with `staged` files added to `\EFI\HV` of its ESP.
    pub fn spawn_staged(platform: &Platform, esp: &Esp, config: &RunConfig, staged: &[Staged]) -> Result<Session> {
        Self::spawn_cpus(platform, esp, config, staged, 1)
    }

    /// Like [`Session::spawn_staged`] on a machine of `cpus` physical CPUs (QEMU
    /// `-smp N` with multi-threaded TCG, Bochs `cpu: count=N`); every other caller
    /// gets one.
    pub fn spawn_cpus(
        platform: &Platform,
        esp: &Esp,
        config: &RunConfig,
        staged: &[Staged],
        cpus: u32,
    ) -> Result<Session> {
        Self::spawn_threads(platform, esp, config, staged, cpus, TcgThreads::OnePerCpu)
    }

    /// Like [`Session::spawn_cpus`], with QEMU's TCG `threads` chosen (Bochs always
    /// emulates its CPUs on one thread).
    pub fn spawn_threads(
        platform: &Platform,
        esp: &Esp,
        config: &RunConfig,
        staged: &[Staged],
        cpus: u32,
        threads: TcgThreads,
    ) -> Result<Session> {
        Self::spawn_sockets(platform, esp, config, staged, cpus, None, threads)
    }

    /// Like [`Session::spawn_cpus`], the `cpus` spread over `sockets` packages of one
    /// thread per core (QEMU `-smp N,sockets=S,cores=N/S,threads=1`); `None` leaves
    /// QEMU's default topology (one socket). Bochs cannot be told, and refuses.
    pub fn spawn_sockets(
        platform: &Platform,
        esp: &Esp,
        config: &RunConfig,
        staged: &[Staged],
        cpus: u32,
        sockets: Option<u32>,
        threads: TcgThreads,
    ) -> Result<Session> {
        if let Some(n) = sockets
            && (n == 0 || !cpus.is_multiple_of(n))
        {
            return Err(format!("{cpus} CPUs do not divide into {n} sockets"));
        }
        let dir = prepare_dir(esp, config, staged)?;
        match platform {
            Platform::Qemu { cpu } => spawn_qemu(cpu, dir, config, cpus, sockets, threads),
            Platform::Bochs { .. } if sockets.is_some() => {
                Err("a socket topology can only be given to QEMU, not to Bochs".into())
            }
            Platform::Bochs { model } => spawn_bochs(model, dir, config, cpus),
        }
    }

    /// The serial output so far.
    pub fn serial_bytes(&self) -> Vec<u8> {
        self.serial.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The serial output so far, as text.
    pub fn serial(&self) -> String {
        String::from_utf8_lossy(&self.serial_bytes()).into_owned()
    }

    /// Whether the emulator has exited.
    pub fn exited(&mut self) -> bool {
        self.exit_status().is_some()
    }

    /// How the emulator ended, once it has.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Wait until `done` holds for the serial log, the emulator exits, or `deadline`
    /// (measured from the start of the emulator) passes. Echoes as it goes.
    pub fn wait_until(
        &mut self,
        deadline: Duration,
        echo: &mut Echo,
        mut done: impl FnMut(&SerialLog) -> bool,
    ) -> Wait {
        loop {
            let bytes = self.serial_bytes();
            echo.lines(&bytes);
            let log = SerialLog::new(&String::from_utf8_lossy(&bytes));
            if self.ready_after.is_none() && log.ready_at() {
                self.ready_after = Some(self.start.elapsed());
            }
            if done(&log) {
                return Wait::Matched(self.start.elapsed());
            }
            if self.exited() {
                // Let the collector pick up the last output (READY may be in it; its
                // time is then known only to within this wait).
                std::thread::sleep(Duration::from_millis(200));
                let bytes = self.serial_bytes();
                echo.lines(&bytes);
                if self.ready_after.is_none() && SerialLog::new(&String::from_utf8_lossy(&bytes)).ready_at() {
                    self.ready_after = Some(self.start.elapsed());
                }
                return Wait::Exited;
            }
            if self.start.elapsed() > deadline {
                return Wait::TimedOut;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stop the emulator and the vsock backend (idempotent).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(b) = self.backend.as_mut() {
            let _ = b.kill();
            let _ = b.wait();
        }
        if let Some(r) = self.relay.as_mut() {
            r.stop();
        }
        std::thread::sleep(Duration::from_millis(100));
        self.stop_collector.store(true, Ordering::Relaxed);
    }
}

/// Start vhost-device-vsock for guest CID 4 and wait for its socket.
fn start_vsock_backend(dir: &Path) -> Result<(Child, PathBuf, PathBuf)> {
    let vhost = dir.join("vhost.sock");
    let uds = dir.join("vm.vsock");
    let log = std::fs::File::create(dir.join("vhost-device-vsock.log")).map_err(|e| format!("vsock log: {e}"))?;
    let err = log.try_clone().map_err(|e| format!("vsock log: {e}"))?;
    let mut child = Command::new(tools::vhost_device_vsock()?)
        .arg("--vm")
        .arg(format!("guest-cid=4,socket={},uds-path={}", vhost.display(), uds.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(err))
        .spawn()
        .map_err(|e| format!("cannot start vhost-device-vsock: {e}"))?;
    let start = Instant::now();
    while !vhost.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "vhost-device-vsock exited ({status}) before creating its socket; see {}",
                dir.join("vhost-device-vsock.log").display()
            ));
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            return Err("vhost-device-vsock did not create its socket within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((child, vhost, uds))
}

/// How QEMU's TCG maps the machine's CPUs onto host threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcgThreads {
    /// Multi-threaded TCG (MTTCG) when there is more than one CPU: each CPU on its own
    /// host thread, so the hypervisor's CPUs really run at the same time.
    OnePerCpu,
    /// All CPUs on one host thread, taking turns (QEMU's round robin moves on when
    /// a CPU halts or when its 100 ms kick timer fires): the
    /// hypervisor still sees and uses every CPU, but no two instructions ever run at
    /// once. It avoids QEMU's MTTCG fault that corrupts SVM state (README, SMP).
    One,
}

/// RAM of a QEMU machine: room for 1 GiB guests (the sizes people run) beside the
/// hypervisor, its heap and the firmware. TCG allocates guest RAM lazily, so what
/// no guest touches costs the host nothing.
const QEMU_MEMORY: &str = "2G";

fn spawn_qemu(
    cpu: &str,
    dir: PathBuf,
    config: &RunConfig,
    cpus: u32,
    sockets: Option<u32>,
    threads: TcgThreads,
) -> Result<Session> {
    let vars = dir.join("vars.fd");
    std::fs::copy(tools::OVMF_VARS_4M, &vars).map_err(|e| format!("cannot copy {}: {e}", tools::OVMF_VARS_4M))?;
    let mut cmd = Command::new("qemu-system-x86_64");
    // One CPU: the single-threaded TCG every other run uses. More: by default one
    // host thread per vCPU, so a spinning CPU does not slow the others' emulation.
    let accel = match threads {
        TcgThreads::OnePerCpu if cpus > 1 => "tcg,thread=multi",
        TcgThreads::OnePerCpu => "tcg",
        TcgThreads::One => "tcg,thread=single",
    };
    cmd.args(["-nodefaults", "-accel", accel, "-cpu", cpu, "-m", QEMU_MEMORY])
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,unit=0,readonly=on,file={}", tools::OVMF_CODE_4M))
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,unit=1,file={}", vars.display()))
        .arg("-drive")
        .arg(format!("format=raw,file=fat:rw:{}", dir.join("esp").display()))
        .args(["-serial", "stdio", "-display", "none", "-no-reboot"]);
    match sockets {
        Some(n) => {
            cmd.arg("-smp").arg(format!("{cpus},sockets={n},cores={},threads=1", cpus / n));
        }
        None if cpus > 1 => {
            cmd.arg("-smp").arg(cpus.to_string());
        }
        None => {}
    }
    // The second -serial is COM2 (0x2F8): the serial control channel. `wait=off`: QEMU
    // starts without a client, and takes the next one when one leaves.
    let serial_socket = config.vsock.then(|| dir.join("com2.sock"));
    if let Some(path) = &serial_socket {
        cmd.arg("-chardev")
            .arg(format!("socket,id=com2,path={},server=on,wait=off", path.display()))
            .args(["-serial", "chardev:com2"]);
    }
    // vhost-user needs guest RAM the backend can map: a shared memfd backend. Without
    // it the device still appears but fails at driver start (PLATFORMS.md).
    let (backend, vsock_socket) = if config.vsock {
        let (child, vhost, uds) = start_vsock_backend(&dir)?;
        cmd.args(["-machine", "q35,memory-backend=mem0"])
            .arg("-object")
            .arg(format!("memory-backend-memfd,id=mem0,size={QEMU_MEMORY},share=on"))
            .arg("-chardev")
            .arg(format!("socket,id=vs0,path={}", vhost.display()))
            .args(["-device", "vhost-user-vsock-pci,chardev=vs0"]);
        (Some(child), Some(uds))
    } else {
        cmd.args(["-machine", "q35"]);
        (None, None)
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(dir.join("qemu.stderr")).map_err(|e| format!("qemu.stderr: {e}"))?));
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("cannot start qemu-system-x86_64: {e}"))?;
    let mut stdout = child.stdout.take().ok_or("qemu has no stdout pipe")?;
    let serial = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let sink = serial.clone();
    let serial_path = dir.join("serial.log");
    let mut file = LogFile::create(&serial_path)?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            file.write(&buf[..n]);
            if let Ok(mut s) = sink.lock() {
                s.extend_from_slice(&buf[..n]);
            }
        }
        file.finish();
    });
    Ok(Session {
        child,
        backend,
        serial,
        stop_collector: stop,
        start,
        ready_after: None,
        dir,
        vsock_socket,
        serial_socket,
        relay: None,
        serial_path,
    })
}

/// The serial log on disk, written whole lines at a time and cleaned of OVMF's escape
/// sequences, so `cat` or `tail -f` shows it as the console did; a line is on disk as
/// soon as it is complete (an instance that hangs still leaves its last words).
#[derive(Debug)]
struct LogFile {
    file: std::fs::File,
    /// The bytes after the last newline, not yet written.
    partial: Vec<u8>,
}

impl LogFile {
    fn create(path: &Path) -> Result<Self> {
        let file = std::fs::File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(Self { file, partial: Vec::new() })
    }

    /// Append `bytes`; a failed write loses log lines, never the run, so it is ignored.
    fn write(&mut self, bytes: &[u8]) {
        self.partial.extend_from_slice(bytes);
        if let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') {
            let lines: Vec<u8> = self.partial.drain(..=end).collect();
            let _ = self.file.write_all(clean(&String::from_utf8_lossy(&lines)).as_bytes());
        }
    }

    /// The emulator is gone: write what is left of the last line.
    fn finish(&mut self) {
        if !self.partial.is_empty() {
            let rest = std::mem::take(&mut self.partial);
            let _ = writeln!(self.file, "{}", clean(&String::from_utf8_lossy(&rest)));
        }
    }
}

fn spawn_bochs(model: &str, dir: PathBuf, config: &RunConfig, cpus: u32) -> Result<Session> {
    // Bochs 2.7 takes at most a 2 MiB ROM: Debian's 2 MiB vars and code, joined.
    let rom = dir.join("ovmf-2m.fd");
    let mut image = std::fs::read(tools::OVMF_VARS_2M).map_err(|e| format!("{}: {e}", tools::OVMF_VARS_2M))?;
    image.extend(std::fs::read(tools::OVMF_CODE_2M).map_err(|e| format!("{}: {e}", tools::OVMF_CODE_2M))?);
    std::fs::write(&rom, image).map_err(|e| format!("{}: {e}", rom.display()))?;
    let serial_path = dir.join("serial.txt");
    let bochs_serial = serial_path.clone();
    std::fs::write(&serial_path, b"").map_err(|e| format!("{}: {e}", serial_path.display()))?;
    // Verified settings (shared/PLATFORMS.md), plus: the sound and speaker devices are
    // set to dummy/off because on a machine without a sound card Bochs' ALSA probe
    // aborts with "buffer overflow detected".
    // COM2 connects to the relay, which must listen before Bochs starts.
    let relay =
        if config.vsock { Some(crate::serial_relay::SerialRelay::start(&dir.join("com2.sock"))?) } else { None };
    let com2 = relay
        .as_ref()
        .map(|r| format!("com2: enabled=true, mode=socket-client, dev=127.0.0.1:{}\n", r.tcp_port))
        .unwrap_or_default();
    let bxrc = format!(
        "display_library: rfb, options=\"timeout=0\"
memory: host=512, guest=512
romimage: file={rom}, address=0xffe00000, options=none
vgaromimage: file={vga}
boot: disk
ata0: enabled=true, ioaddr1=0x1f0, ioaddr2=0x3f0, irq=14
ata0-master: type=disk, path={esp}, mode=vvfat, journal={redolog}
pci: enabled=1, chipset=i440fx
cpu: count={cpus}, ips=50000000, model={model}, reset_on_triple_fault=0, ignore_bad_msrs=1
clock: sync=none, time0=local, rtc_sync=0
com1: enabled=true, mode=file, dev={serial}
panic: action=fatal
log: {log}
speaker: enabled=0
sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy
{com2}",
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
    let serial = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (sink, stopped) = (serial.clone(), stop.clone());
    std::thread::spawn(move || {
        while !stopped.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
            if let (Ok(now), Ok(mut s)) = (std::fs::read(&serial_path), sink.lock())
                && now.len() > s.len()
            {
                let have = s.len();
                s.extend_from_slice(&now[have..]);
            }
        }
    });
    Ok(Session {
        child,
        backend: None,
        serial,
        stop_collector: stop,
        start,
        ready_after: None,
        dir,
        vsock_socket: None,
        serial_socket: relay.as_ref().map(|r| r.socket.clone()),
        relay,
        serial_path: bochs_serial,
    })
}
