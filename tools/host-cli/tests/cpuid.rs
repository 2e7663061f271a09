//! Integration tests of `hvctl cpuid` on the built binary, over the dumps checked in
//! under `levelling/testdata`. Golden files live in `tests/golden/`; regenerate with
//! `UPDATE_GOLDEN=1 cargo test -p host-cli` and review the diff.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn hvctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hvctl")).args(args).output().expect("run hvctl")
}

fn testdata(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../levelling/testdata").join(name).to_string_lossy().into_owned()
}

fn all_dumps() -> Vec<String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../levelling/testdata");
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cpuid"))
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}
fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn golden(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
    assert!(
        expected == actual,
        "output differs from {}; rerun with UPDATE_GOLDEN=1 and review the diff\n{actual}",
        path.display()
    );
}

fn one_line_error(o: &Output) {
    assert_eq!(o.status.code(), Some(2), "stderr: {}", stderr(o));
    let e = stderr(o);
    assert!(e.starts_with("hvctl: error: "), "{e}");
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    assert!(!e.contains("panicked") && !e.contains("RUST_BACKTRACE"), "{e}");
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hvctl-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn show_golden_genoa() {
    let o = hvctl(&["cpuid", "show", &testdata("constructed-amd-epyc-9654-genoa.cpuid")]);
    assert!(o.status.success(), "{}", stderr(&o));
    golden("show-genoa.txt", &stdout(&o));
}

#[test]
fn show_golden_sapphire_rapids() {
    let o = hvctl(&["cpuid", "show", &testdata("constructed-intel-xeon-8480-sapphire-rapids.cpuid")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("levelling:   full: VMX CPUID exiting"), "{out}");
    assert!(out.contains("   5 vmx                        never: nested virtualization is not supported"), "{out}");
    golden("show-sapphire-rapids.txt", &out);
}

#[test]
fn show_json_is_json() {
    let o = hvctl(&["cpuid", "show", "--json", &testdata("amd-epyc-kvm-host.cpuid")]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["vendor"], "AuthenticAMD");
    assert_eq!(v["family"], 0x19);
    assert!(v["raw"]["names"].as_array().unwrap().iter().any(|n| n == "hypervisor"));
    assert!(!v["max"]["names"].as_array().unwrap().iter().any(|n| n == "osxsave"));
}

#[test]
fn level_all_checked_in_dumps() {
    let files = all_dumps();
    let mut args = vec!["cpuid", "level"];
    args.extend(files.iter().map(String::as_str));
    let o = hvctl(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    // The KVM development VM has no nested virtualization: it is left out, with its reason.
    assert!(out.starts_with(&format!("common guest featureset of {} hosts", files.len() - 1)), "{out}");
    assert!(out.contains("left out: amd-epyc-kvm-host.cpuid cannot run guests: it has neither VMX nor SVM"), "{out}");
    for f in &files {
        assert!(out.contains(Path::new(f).file_name().unwrap().to_str().unwrap()), "{f}");
    }
    // The Intel server loses AMX-free AVX-512 FP16 (no other host has it).
    let spr = out.lines().find(|l| l.starts_with("constructed-intel-xeon")).unwrap();
    assert!(spr.contains("avx512_fp16"), "{spr}");

    args.push("--json");
    let o = hvctl(&args);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["hosts"].as_array().unwrap().len(), files.len() - 1);
    assert_eq!(v["left_out"].as_array().unwrap().len(), 1);
    assert_eq!(v["left_out"][0]["host"], "amd-epyc-kvm-host.cpuid");
    assert!(v["left_out"][0]["reason"].as_str().unwrap().starts_with("it has neither VMX nor SVM"));
    assert_eq!(v["mixed_vendors"], true);
}

#[test]
fn level_two_amd_hosts_golden() {
    let o = hvctl(&[
        "cpuid",
        "level",
        &testdata("amd-epyc-kvm-host.cpuid"),
        &testdata("constructed-amd-epyc-9654-genoa.cpuid"),
        &testdata("qemu-7.2-tcg-epyc.cpuid"),
    ]);
    assert!(o.status.success());
    golden("level-amd.txt", &stdout(&o));
}

#[test]
fn check_rejects_avx2_without_avx_naming_the_chain() {
    let policy = tmp("avx2-no-avx.policy");
    std::fs::write(&policy, "# AVX2 without AVX\nbase=host-default\n-avx\n+avx2\nvcpus=2\n").unwrap();
    let o = hvctl(&[
        "cpuid",
        "check",
        policy.to_str().unwrap(),
        "--on",
        &testdata("constructed-amd-epyc-9654-genoa.cpuid"),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("incompatible:"), "{out}");
    assert!(
        out.contains("avx2 (CPUID 0x7[0].EBX bit 5) is set, but it requires avx (CPUID 0x1.ECX bit 28), which is not set (dependency chain: avx2 -> avx)"),
        "{out}"
    );
    let o = hvctl(&[
        "cpuid",
        "check",
        "--json",
        policy.to_str().unwrap(),
        "--on",
        &testdata("constructed-amd-epyc-9654-genoa.cpuid"),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["compatible"], false);
}

#[test]
fn policy_then_check_across_hosts() {
    let out_file = tmp("genoa.policy");
    let genoa = testdata("constructed-amd-epyc-9654-genoa.cpuid");
    let o = hvctl(&[
        "cpuid",
        "policy",
        "base=host-max,-avx512f,+pcid,vcpus=4",
        "--on",
        &genoa,
        "-o",
        out_file.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("note: -avx512f also cleared what requires it: "), "{out}");
    assert!(out.contains("verified on constructed-amd-epyc-9654-genoa.cpuid"), "{out}");
    // Compatible with itself.
    let o = hvctl(&["cpuid", "check", out_file.to_str().unwrap(), "--on", &genoa]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    // Not with the Intel host (vendor) nor with the KVM guest (features it lacks).
    let o = hvctl(&[
        "cpuid",
        "check",
        out_file.to_str().unwrap(),
        "--on",
        &testdata("constructed-intel-xeon-8480-sapphire-rapids.cpuid"),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("the policy is for AuthenticAMD but the host is GenuineIntel"), "{}", stdout(&o));
    let o = hvctl(&["cpuid", "check", out_file.to_str().unwrap(), "--on", &testdata("qemu-7.2-tcg-epyc.cpuid")]);
    assert_eq!(o.status.code(), Some(1));
    // Zen 1 under TCG lacks what Genoa has, each named.
    assert!(
        stdout(&o).contains("wbnoinvd (CPUID 0x80000008.EBX bit 9) is set, but this host does not have it"),
        "{}",
        stdout(&o)
    );
    // The KVM development VM cannot run guests at all: that one reason, nothing else.
    let o = hvctl(&["cpuid", "check", out_file.to_str().unwrap(), "--on", &testdata("amd-epyc-kvm-host.cpuid")]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(out.contains("cannot run on amd-epyc-kvm-host.cpuid (1 reason):\n  - this host cannot run guests: it has neither VMX nor SVM: vmx (CPUID 0x1.ECX bit 5) and svm (CPUID 0x80000001.ECX bit 2) are both clear"), "{out}");
    assert_eq!(out.lines().count(), 2, "{out}");
}

#[test]
fn a_host_that_cannot_run_guests_gets_one_reason() {
    // A 32-bit CPU, constructed from the QEMU EPYC dump: no long mode, 32 linear bits.
    let text = std::fs::read_to_string(testdata("qemu-7.2-tcg-epyc.cpuid")).unwrap();
    let no_lm: String = text
        .lines()
        .map(|l| match l.split(' ').collect::<Vec<_>>().as_slice() {
            ["80000001", sub, a, b, c, d] => {
                let d = u32::from_str_radix(d, 16).unwrap() & !(1 << 29);
                format!("80000001 {sub} {a} {b} {c} {d:08x}\n")
            }
            ["80000008", sub, _, b, c, d] => format!("80000008 {sub} 00002020 {b} {c} {d}\n"),
            _ => format!("{l}\n"),
        })
        .collect();
    assert_ne!(no_lm, text);
    let dump = tmp("no-lm.cpuid");
    std::fs::write(&dump, no_lm).unwrap();
    let o = hvctl(&["cpuid", "policy", "base=host-default", "--on", dump.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let want = "rejected on no-lm.cpuid (1 reason):\n  - this host cannot run guests: it has no long mode: lm (CPUID 0x80000001.EDX bit 29) is clear or missing, and the hypervisor and its guests are 64-bit\n";
    assert_eq!(stdout(&o), want);
    let o = hvctl(&["cpuid", "show", dump.to_str().unwrap()]);
    assert!(o.status.success());
    assert!(
        stdout(&o).contains("guests:      none: this host cannot run guests: it has no long mode"),
        "{}",
        stdout(&o)
    );
    let o = hvctl(&["cpuid", "show", "--json", &testdata("amd-epyc-kvm-host.cpuid")]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(v["cannot_run_guests"].as_str().unwrap().starts_with("it has neither VMX nor SVM"));
}

#[test]
fn show_names_features_max_drops_for_undescribed_xsave_components() {
    // The QEMU EPYC dump without CPUID 0xD[2] (AVX's YMM_Hi128 state), and with its size 0.
    let text = std::fs::read_to_string(testdata("qemu-7.2-tcg-epyc.cpuid")).unwrap();
    assert!(text.contains("\n0000000d 00000002 00000100 "));
    let without: String =
        text.lines().filter(|l| !l.starts_with("0000000d 00000002 ")).map(|l| format!("{l}\n")).collect();
    let zero = text.replace("\n0000000d 00000002 00000100 ", "\n0000000d 00000002 00000000 ");
    for (name, dump) in [("no-0xd-2.cpuid", without), ("zero-0xd-2.cpuid", zero)] {
        let file = tmp(name);
        std::fs::write(&file, dump).unwrap();
        let o = hvctl(&["cpuid", "show", file.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        let out = stdout(&o);
        assert!(out.contains("  28 avx                        never on this host: needs XSAVE component 2 (CPUID 0xd[2]), which the host does not describe: the host has no CPUID 0xd subleaf for it, or reports its size as 0\n"), "{out}");
        assert!(out.contains("   5 avx2                       never on this host: requires avx\n"), "{out}");
        assert!(out.contains("  26 xsave                      default\n"), "{out}");
        let o = hvctl(&["cpuid", "show", "--json", file.to_str().unwrap()]);
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        let dropped = v["max_dropped"].as_array().unwrap();
        assert!(dropped.iter().any(|d| d["name"] == "avx" && d["reason"].as_str().unwrap().contains("CPUID 0xd[2]")));
        // host-max now verifies on that host; asking for avx anyway is refused, naming 0xd[2].
        for spec in ["base=host-max", "base=host-default"] {
            let o = hvctl(&["cpuid", "policy", spec, "--on", file.to_str().unwrap()]);
            assert_eq!(o.status.code(), Some(0), "{spec}: {}", stdout(&o));
        }
        let o = hvctl(&["cpuid", "policy", "base=host-max,+avx", "--on", file.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(1));
        assert!(stdout(&o).contains("CPUID 0xd[2] (XSAVE component 2) is needed by avx"), "{}", stdout(&o));
    }
}

#[test]
fn hygon_dhyana_is_shown_levelled_and_kept_apart_from_amd() {
    let dhyana = testdata("qemu-7.2-tcg-dhyana.cpuid");
    let o = hvctl(&["cpuid", "show", &dhyana]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("vendor:      HygonGenuine, family 0x18 model 0x0 stepping 1\n"), "{out}");
    assert!(out.contains("levelling:   full: SVM CPUID intercept"), "{out}");
    let policy = tmp("dhyana.policy");
    let o = hvctl(&["cpuid", "policy", "base=host-default,vcpus=2", "--on", &dhyana, "-o", policy.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(std::fs::read_to_string(&policy).unwrap().contains("\nvendor=hygon\n"));
    let o = hvctl(&["cpuid", "check", policy.to_str().unwrap(), "--on", &dhyana]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let o = hvctl(&["cpuid", "check", policy.to_str().unwrap(), "--on", &testdata("qemu-7.2-tcg-epyc.cpuid")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("the policy is for HygonGenuine but the host is AuthenticAMD"), "{}", stdout(&o));
    let o = hvctl(&["cpuid", "level", &dhyana, &testdata("qemu-7.2-tcg-epyc.cpuid")]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("note: the hosts have different vendors"), "{}", stdout(&o));
}

#[test]
fn policy_rejected_exits_1() {
    let o =
        hvctl(&["cpuid", "policy", "base=none,+avx512f", "--on", &testdata("constructed-amd-epyc-9654-genoa.cpuid")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("dependency chain: avx512f -> avx2"), "{}", stdout(&o));
}

#[test]
fn errors_are_one_line() {
    one_line_error(&hvctl(&["cpuid", "show", "/nonexistent/file.cpuid"]));
    one_line_error(&hvctl(&["cpuid", "frobnicate"]));
    one_line_error(&hvctl(&["cpuid", "show", "a", "--host"]));
    one_line_error(&hvctl(&["cpuid", "policy", "+no_such_feature", "--on", &testdata("amd-epyc-kvm-host.cpuid")]));
    let bad = tmp("bad.cpuid");
    std::fs::write(&bad, "# hvctl cpuid dump v1\n00000000 00000000 0000000d 68747541 444d4163\n").unwrap();
    let o = hvctl(&["cpuid", "show", bad.to_str().unwrap()]);
    one_line_error(&o);
    assert!(stderr(&o).contains("line 2"), "{}", stderr(&o));
    let intel_only_leaf1 = tmp("noleaf0.cpuid");
    std::fs::write(&intel_only_leaf1, "# hvctl cpuid dump v1\n00000001 00000000 00000000 00000000 00000000 00000000\n")
        .unwrap();
    one_line_error(&hvctl(&["cpuid", "level", intel_only_leaf1.to_str().unwrap()]));
    let o = hvctl(&["cpuid", "check", "/nonexistent.policy", "--on", &testdata("amd-epyc-kvm-host.cpuid")]);
    one_line_error(&o);
}

#[test]
fn dump_help_documents_the_format() {
    let o = hvctl(&["cpuid", "dump", "--help"]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("# hvctl cpuid dump v1"));
}

#[cfg(target_arch = "x86_64")]
#[test]
fn dump_this_host_parses_back() {
    let o = hvctl(&["cpuid", "dump", "--source", "test"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let d = levelling::parse_dump(&stdout(&o)).unwrap();
    assert_eq!(d.source.as_deref(), Some("test"));
    assert!(d.records.iter().any(|r| r.leaf == 0));
    let o = hvctl(&["cpuid", "show", "--host"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// The pair the end-to-end QEMU (SVM) ↔ Bochs (VMX) migration uses: one AMD guest on both.
#[test]
fn level_epyc_and_skylake_x_across_vendors() {
    let (epyc, skx) = (testdata("qemu-7.2-tcg-epyc.cpuid"), testdata("bochs-2.7-corei7-skylake-x.cpuid"));
    let policy = tmp("xvendor.policy");
    let o = hvctl(&["cpuid", "level", &epyc, &skx, "-o", policy.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("presented:   AuthenticAMD, family 0x17 model 0x1 stepping 2 (signature 0x00800f12), brand \"AMD EPYC Processor\", from qemu-7.2-tcg-epyc.cpuid\n"), "{out}");
    assert!(out.contains("note: the hosts have different vendors: the guest sees AuthenticAMD on every host, and the policy runs on GenuineIntel and AuthenticAMD hosts (host-vendors=intel+amd)\n"), "{out}");
    assert!(out.contains("  - syscall-compat-ud: a 32-bit (compatibility-mode) process that uses SYSCALL"), "{out}");
    assert!(out.contains("(on bochs-2.7-corei7-skylake-x.cpuid)\n"), "{out}");
    assert!(
        out.contains("\n  vendor=amd,host-vendors=intel+amd,signature=0x00800f12,brand=AMD EPYC Processor,"),
        "{out}"
    );
    golden("level-xvendor.txt", &out);
    // The written policy runs on both hosts; on the Intel one with its caveats.
    let text = std::fs::read_to_string(&policy).unwrap();
    assert!(text.contains("\nhost-vendors=intel+amd\n"), "{text}");
    assert!(
        text.contains("# caveats on GenuineIntel hosts: syscall-compat-ud vendor-msrs vendor-exempt-mitigations\n"),
        "{text}"
    );
    let o = hvctl(&["cpuid", "check", policy.to_str().unwrap(), "--on", &skx]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let out = stdout(&o);
    assert!(
        out.contains("caveats: the guest sees AuthenticAMD on this GenuineIntel host:\n  - syscall-compat-ud: "),
        "{out}"
    );
    let o = hvctl(&["cpuid", "check", policy.to_str().unwrap(), "--on", &epyc]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(!stdout(&o).contains("caveats"), "{}", stdout(&o));
    let o = hvctl(&["cpuid", "check", "--json", policy.to_str().unwrap(), "--on", &skx]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["compatible"], true);
    assert_eq!(v["vendor"], "AuthenticAMD");
    assert_eq!(v["caveats"][0]["name"], "syscall-compat-ud");
    // The one-line spec is what `hvctl domain create --cpuid` takes; it verifies on both.
    let o = hvctl(&["cpuid", "level", "--json", &epyc, &skx]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["cross_vendor"], true);
    assert_eq!(v["presented"]["vendor"], "AuthenticAMD");
    assert_eq!(v["presented"]["signature"], "0x00800f12");
    assert_eq!(v["presented"]["from"], "qemu-7.2-tcg-epyc.cpuid");
    assert_eq!(v["host_vendors"], serde_json::json!(["GenuineIntel", "AuthenticAMD"]));
    assert_eq!(v["dropped"].as_array().unwrap().len(), 0);
    let caveats: Vec<&str> = v["caveats"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(caveats, ["syscall-compat-ud", "vendor-msrs", "vendor-exempt-mitigations"]);
    assert_eq!(v["caveats"][0]["hosts"], serde_json::json!(["bochs-2.7-corei7-skylake-x.cpuid"]));
    assert!(v["caveats"][2]["obligation"].is_null());
    assert_eq!(v["hosts"][1]["caveats"].as_array().unwrap().len(), 3);
    let spec = v["spec"].as_str().unwrap();
    for on in [&epyc, &skx] {
        let o = hvctl(&["cpuid", "policy", spec, "--on", on]);
        assert_eq!(o.status.code(), Some(0), "{on}: {}", stdout(&o));
        assert!(!stdout(&o).contains("note:"), "{}", stdout(&o));
    }
}

#[test]
fn level_with_an_explicit_vendor() {
    let (epyc, skx) = (testdata("qemu-7.2-tcg-epyc.cpuid"), testdata("bochs-2.7-corei7-skylake-x.cpuid"));
    let o = hvctl(&["cpuid", "level", "--vendor", "intel", &epyc, &skx]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("presented:   GenuineIntel, family 0x6 model 0x55 stepping 4 (signature 0x00050654)"),
        "{out}"
    );
    for c in [
        "sysenter-compat-ud",
        "sysenter-msr-width",
        "sysret-ss-attrs",
        "null-selector-base",
        "vendor-msrs",
        "vendor-keyed-mitigations",
    ] {
        assert!(out.contains(&format!("  - {c}: ")), "{c}: {out}");
    }
    assert!(!out.contains("syscall-compat-ud"), "{out}");
    // A vendor no host of the pool has is refused, saying why.
    let o = hvctl(&["cpuid", "level", "--vendor", "hygon", &epyc, &skx]);
    one_line_error(&o);
    assert!(stderr(&o).contains("no host of the pool (intel+amd) is HygonGenuine"), "{}", stderr(&o));
    one_line_error(&hvctl(&["cpuid", "level", "--vendor", "via", &epyc]));
}

#[test]
fn level_drops_features_whose_xsave_layout_differs() {
    let (genoa, spr) = (
        testdata("constructed-amd-epyc-9654-genoa.cpuid"),
        testdata("constructed-intel-xeon-8480-sapphire-rapids.cpuid"),
    );
    let o = hvctl(&["cpuid", "level", &genoa, &spr]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("dropped for the pool (in every host's max):\n  avx512f (CPUID 0x7[0].EBX bit 16): XSAVE component 5 (CPUID 0xd[5]) is laid out differently: size 64 at offset 832 on constructed-amd-epyc-9654-genoa.cpuid but size 64 at offset 1088 on constructed-intel-xeon-8480-sapphire-rapids.cpuid"), "{out}");
    assert!(out.contains("  avx512bw (CPUID 0x7[0].EBX bit 30): requires avx512f, which the pool dropped\n"), "{out}");
    let o = hvctl(&["cpuid", "level", "--json", &genoa, &spr]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(v["dropped"].as_array().unwrap().iter().any(|d| d["name"] == "avx512f"));
    assert!(!v["common"]["names"].as_array().unwrap().iter().any(|n| n == "avx512f"));
    // And the levelled policy verifies on both.
    let spec = v["spec"].as_str().unwrap().to_string();
    for on in [&genoa, &spr] {
        let o = hvctl(&["cpuid", "policy", &spec, "--on", on]);
        assert_eq!(o.status.code(), Some(0), "{on}: {}", stdout(&o));
    }
}

/// The data lines (not comments) of a dump.
fn data_lines(text: &str) -> Vec<String> {
    text.lines().filter(|l| !l.starts_with('#')).map(str::to_string).collect()
}

#[test]
fn dump_from_a_hypervisor_is_its_hosts_records() {
    let file = testdata("qemu-7.2-tcg-epyc.cpuid");
    let target = common::fake_cpuid_hv("dump-epyc", &file);
    for flag in ["--connect", "--from"] {
        let o = hvctl(&["cpuid", "dump", flag, &target]);
        assert!(o.status.success(), "{}", stderr(&o));
        let out = stdout(&o);
        assert_eq!(out.lines().next(), Some("# hvctl cpuid dump v1"));
        assert_eq!(
            out.lines().nth(1),
            Some(format!("# source: fake hv serving dump-epyc, fetched from {target} with hvctl cpuid dump").as_str())
        );
        let expected = data_lines(&std::fs::read_to_string(&file).unwrap());
        assert!(expected.len() > 20, "the test dump has {} records", expected.len());
        assert_eq!(data_lines(&out), expected);
    }
}

/// `level --json` with the host labels taken out (they are file names or targets).
fn level_json_without_labels(args: &[&str]) -> serde_json::Value {
    let o = hvctl(args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    let mut v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    v["presented"]["from"] = serde_json::Value::Null;
    for h in v["hosts"].as_array_mut().unwrap() {
        h["host"] = serde_json::Value::Null;
        h["source"] = serde_json::Value::Null;
    }
    for c in v["caveats"].as_array_mut().unwrap() {
        c["hosts"] = serde_json::Value::Null;
    }
    v
}

#[test]
fn level_from_hypervisors_equals_level_over_their_dumps() {
    let (a, b) = (testdata("qemu-7.2-tcg-epyc.cpuid"), testdata("bochs-2.7-corei7-skylake-x.cpuid"));
    let ta = common::fake_cpuid_hv("level-a", &a);
    let tb = common::fake_cpuid_hv("level-b", &b);
    let from = format!("{ta},{tb}");
    let live = level_json_without_labels(&["cpuid", "level", "--from", &from, "--json"]);
    let files = level_json_without_labels(&["cpuid", "level", &a, &b, "--json"]);
    assert_eq!(live, files);
    assert!(live["cross_vendor"].as_bool().unwrap(), "AMD and Intel hosts: {live}");
    // The text form names each host by its target.
    let o = hvctl(&["cpuid", "level", "--from", &from]);
    let out = stdout(&o);
    assert!(out.lines().any(|l| l.starts_with(&ta)), "{out}");
    assert!(out.lines().any(|l| l.starts_with(&tb)), "{out}");
}

#[test]
fn level_from_an_unreachable_hypervisor_fails_naming_it() {
    let ta = common::fake_cpuid_hv("level-up", &testdata("qemu-7.2-tcg-epyc.cpuid"));
    let down = format!("unix:{}:5000", tmp("nobody-here.vsock").display());
    let o = hvctl(&["--connect-timeout", "0.2", "cpuid", "level", "--from", &format!("{ta},{down}")]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.starts_with(&format!("hvctl: error: {down}: ")), "{e}");
    assert!(stdout(&o).is_empty());
}

#[test]
fn check_on_a_hypervisor_verifies_against_its_host() {
    let epyc = testdata("qemu-7.2-tcg-epyc.cpuid");
    let target = common::fake_cpuid_hv("check-epyc", &epyc);
    let policy = tmp("check-on-target.policy");
    let o = hvctl(&["cpuid", "policy", "base=host-max", "--on", &epyc, "-o", policy.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let p = policy.to_str().unwrap();
    let o = hvctl(&["cpuid", "check", p, "--on", &target]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o).lines().next(), Some(format!("compatible: {p} can run on {target}").as_str()));
    // The same policy on an Intel host: refused, exit 1, for the vendor.
    let intel = common::fake_cpuid_hv("check-skx", &testdata("bochs-2.7-corei7-skylake-x.cpuid"));
    let o = hvctl(&["cpuid", "check", p, "--on", &intel]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stdout(&o).starts_with(&format!("incompatible: {p} cannot run on {intel}")), "{}", stdout(&o));
}
