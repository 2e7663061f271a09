//! `hvctl metrics scrape` on the built binary against fake hypervisors
//! (`common::fake_hv`): what a real connection yields, an unreachable hypervisor as
//! `hv_up 0` with exit 3, and, where Debian's promtool is installed, its verdict on
//! both formats (`cargo xtask test` installs it; the prometheus-* system tests need it).

mod common;

use common::{hvctl, openmetrics_problems, promtool, stderr, stdout};

fn fake_with_a_domain(name: &str) -> String {
    common::fake_hv_target(name, |req| match req {
        wire::Request::Info => wire::Response::Info(Box::new(wire::InfoReport {
            hv_version: "0.1.0 (fake)".into(),
            protocol_version: wire::PROTOCOL_VERSION,
            uptime_ns: 3_000_000_000,
            capabilities: Vec::new(),
            cpus: 1,
            memory_bytes: 1 << 29,
            services: Vec::new(),
            memory_use: wire::MemoryUse { frames_total: 1000, frames_free: 700, ..Default::default() },
            control: Vec::new(),
            cpu_list: Vec::new(),
        })),
        wire::Request::DomainList => wire::Response::DomainList(wire::DomainListReport {
            domains: vec![wire::DomainInfo {
                id: 4,
                name: "memwriter".into(),
                state: "running".into(),
                vcpus: 1,
                memory_bytes: 16 << 20,
                exits: vec![("io".into(), 12), ("npf".into(), 3)],
                runtime_ns: 5,
                unclaimed: Vec::new(),
                cpus: None,
            }],
            free_frames: 700,
            total_frames: 1000,
        }),
        wire::Request::MonitorStats { .. } => wire::Response::MonitorStats(Vec::new()),
        other => wire::Response::Error(wire::ErrorReply::new(wire::ErrorCode::Refused, other.name())),
    })
}

#[test]
fn scrape_reports_each_hypervisor_and_names_the_unreachable_one() {
    let a = fake_with_a_domain("metrics-a");
    let down = format!("unix:{}/nobody.vsock:5000", std::env::temp_dir().display());
    let o = hvctl(&[
        "--connect-timeout",
        "0.2",
        "metrics",
        "scrape",
        "--hypervisor",
        &format!("a={a}"),
        "--hypervisor",
        &format!("b={down}"),
    ]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim_end(), format!("hvctl: error: not reachable: b ({down}) (reported as hv_up 0)"));
    for line in [
        "hv_up{hypervisor=\"a\"} 1",
        "hv_up{hypervisor=\"b\"} 0",
        "hv_domain_vm_exits_total{hypervisor=\"a\",domain=\"4\",reason=\"io\"} 12",
        "hv_domain_info{hypervisor=\"a\",domain=\"4\",name=\"memwriter\"} 1",
        "hv_frames_free{hypervisor=\"a\"} 700",
        // MonitorHwInfo is refused by this fake: reported, not skipped.
        "hv_scrape_request_ok{hypervisor=\"a\",request=\"monitor-hwinfo\"} 0",
    ] {
        assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
    }
    assert_eq!(openmetrics_problems(&out), Vec::<String>::new(), "{out}");
}

#[test]
fn promtool_accepts_both_formats() {
    let a = fake_with_a_domain("metrics-promtool");
    let scrape = |format: &str| {
        let o = hvctl(&["metrics", "scrape", "--format", format, "--hypervisor", &format!("a={a}")]);
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    let Some((code, findings)) = promtool(&scrape("prometheus")) else {
        eprintln!("promtool is not installed: skipping its check (cargo xtask test installs it)");
        return;
    };
    assert_eq!((code, findings.as_str()), (0, ""), "0.0.4 format");
    let om = scrape("openmetrics");
    assert_eq!(openmetrics_problems(&om), Vec::<String>::new(), "{om}");
}
