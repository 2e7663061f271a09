//! `hvctl info`/`ping` when there is no hypervisor: one-line errors and the
//! documented exit codes (the live paths are covered by `cargo xtask test`'s
//! control-* system tests against a real hypervisor on QEMU); `hvctl info` naming its
//! transport against a minimal fake on the hybrid vsock socket. The serial transports
//! are in `serial.rs`.

mod common;

use common::{hvctl, stderr};

#[test]
fn missing_socket_is_a_connection_error_with_a_hint() {
    let o = hvctl(&["--connect", "unix:/nonexistent/hv/vm.vsock:5000", "--connect-timeout", "0.3", "info"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let e = stderr(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.starts_with("hvctl: error: /nonexistent/hv/vm.vsock does not exist: is the hypervisor running"), "{e}");
}

#[test]
fn nobody_listening_on_the_port_is_named() {
    let dir = std::env::temp_dir().join(format!("hvctl-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("vm.vsock");
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    // Like vhost-device-vsock when nothing listens on the port: read the handshake, hang up.
    let server = std::thread::spawn(move || {
        for _ in 0..20 {
            let Ok((mut s, _)) = listener.accept() else { return };
            let mut buf = [0u8; 64];
            let _ = std::io::Read::read(&mut s, &mut buf);
        }
    });
    let target = format!("unix:{}:5000", path.display());
    let o = hvctl(&["--connect", &target, "--connect-timeout", "0.3", "ping"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim(), "hvctl: error: nothing is listening on port 5000 — is the hypervisor running?");
    drop(server);
}

#[test]
fn no_target_at_all_is_a_usage_error() {
    let o = hvctl(&["info"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("pass --connect unix:PATH:PORT"), "{}", stderr(&o));
    let o = hvctl(&["--connect", "udp:1.2.3.4:5", "info", "--json"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("expected one of unix:PATH:PORT"), "{}", stderr(&o));
}

#[test]
fn help_documents_the_exit_codes() {
    let o = hvctl(&["--help"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("3 cannot reach the hypervisor"), "{out}");
    assert!(out.contains("4 the hypervisor answered with an error"), "{out}");
}

#[test]
fn info_over_hybrid_vsock_names_the_transport() {
    let target = common::fake_hv_target("info", |_| {
        wire::Response::Info(Box::new(wire::InfoReport {
            hv_version: "0.1.0 (fake)".into(),
            protocol_version: wire::PROTOCOL_VERSION,
            uptime_ns: 1,
            capabilities: Vec::new(),
            cpus: 1,
            memory_bytes: 1 << 29,
            services: Vec::new(),
            memory_use: wire::MemoryUse::default(),
            control: vec!["vsock port 5000 (CID 3)".into()],
            cpu_list: vec![
                wire::CpuInfo { apic_id: 0, state: wire::CpuState::Boot, package: Some(0), socket: Some(0) },
                wire::CpuInfo { apic_id: 1, state: wire::CpuState::Started, package: Some(1), socket: Some(1) },
                wire::CpuInfo { apic_id: 2, state: wire::CpuState::Failed, package: None, socket: None },
            ],
        }))
    });
    let o = hvctl(&["--connect", &target, "info"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = common::stdout(&o);
    assert!(out.lines().any(|l| l == format!("connected     vsock {target} (length-prefixed frames)")), "{out}");
    assert!(out.lines().any(|l| l == "control       vsock port 5000 (CID 3)"), "{out}");
    let o = hvctl(&["--connect", &target, "info", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&common::stdout(&o)).unwrap();
    assert_eq!(
        v["connected"],
        serde_json::json!({"transport": "vsock", "target": target, "framing": "length-prefixed frames"})
    );
    assert_eq!(v["control"], serde_json::json!(["vsock port 5000 (CID 3)"]));
}

#[test]
fn info_shows_the_sockets_and_their_cpus() {
    let target = common::fake_hv_target("info-sockets", |_| {
        wire::Response::Info(Box::new(wire::InfoReport {
            hv_version: "0.1.0 (fake)".into(),
            protocol_version: wire::PROTOCOL_VERSION,
            uptime_ns: 1,
            capabilities: Vec::new(),
            cpus: 3,
            memory_bytes: 1 << 29,
            services: Vec::new(),
            memory_use: wire::MemoryUse::default(),
            control: Vec::new(),
            cpu_list: vec![
                wire::CpuInfo { apic_id: 0, state: wire::CpuState::Boot, package: Some(0), socket: Some(0) },
                wire::CpuInfo { apic_id: 8, state: wire::CpuState::Started, package: Some(4), socket: Some(1) },
                wire::CpuInfo { apic_id: 1, state: wire::CpuState::Started, package: Some(0), socket: Some(0) },
                wire::CpuInfo { apic_id: 9, state: wire::CpuState::Failed, package: None, socket: None },
            ],
        }))
    });
    let o = hvctl(&["--connect", &target, "info"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = common::stdout(&o);
    assert!(out.lines().any(|l| l == "sockets       2: socket 0: APIC 0-1; socket 1: APIC 8"), "{out}");
    assert!(out.lines().any(|l| l == "  8      started  1       4"), "{out}");
    assert!(out.lines().any(|l| l == "  9      failed   -       -"), "{out}");
    let o = hvctl(&["--connect", &target, "info", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&common::stdout(&o)).unwrap();
    assert_eq!(v["sockets"], 2);
    assert_eq!(v["socket_cpus"], serde_json::json!([[0, 1], [8]]));
    assert_eq!(v["cpu_list"][1], serde_json::json!({"apic_id": 8, "state": "started", "package": 4, "socket": 1}));
    assert_eq!(v["cpu_list"][3]["socket"], serde_json::Value::Null);
}

#[test]
fn monitor_hwinfo_shows_the_sockets_without_rdt() {
    let target = common::fake_hv_target("hwinfo-sockets", |_| {
        wire::Response::MonitorHwInfo(wire::MonitorHwInfo {
            present: false,
            reason: Some("CPU has no RDT monitoring (CPUID.7.EBX[12]=0)".into()),
            usable_rmids: 0,
            max_rmid: 0,
            sockets: 2,
            socket_cpus: vec![vec![0], vec![1]],
            l3_bytes: 0,
            upscaling_factor: 0,
            counter_width: 0,
            hw_events: Vec::new(),
            all_events: vec!["vm_exits".into()],
        })
    });
    let o = hvctl(&["--connect", &target, "monitor", "hwinfo"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = common::stdout(&o);
    assert!(out.contains("not available: CPU has no RDT monitoring"), "{out}");
    assert!(out.lines().any(|l| l == "  Sockets         : 2 (socket 0: APIC 0; socket 1: APIC 1)"), "{out}");
    let o = hvctl(&["--connect", &target, "monitor", "hwinfo", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&common::stdout(&o)).unwrap();
    assert_eq!((v["sockets"].clone(), v["socket_cpus"].clone()), (serde_json::json!(2), serde_json::json!([[0], [1]])));
}
