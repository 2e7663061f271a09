//! Capability decoding against values recorded from the emulators (the `PROBE-RAW`
//! lines the boot image prints, checked in under `tests/fixtures/`) and against a
//! bare-metal Intel server with RDT built field by field from the SDM. Every decoded
//! field is asserted.

use hv::platform::caps::{
    Capabilities, FeatureControl, L3Monitoring, RdtMonitoring, SvmCaps, Unsupported, Vendor, Virtualization, probe,
};
use hv::platform::hw::Recorded;

fn fixture(name: &str) -> Recorded {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let body = text.trim().strip_prefix("PROBE-RAW ").expect("fixture starts with PROBE-RAW");
    Recorded::parse_line(body).unwrap()
}

fn vmx(caps: &Capabilities) -> hv::platform::caps::VmxCaps {
    match caps.virtualization {
        Virtualization::Vmx(v) => v,
        other => panic!("expected VMX, got {other:?}"),
    }
}

#[test]
fn qemu_epyc_tcg_is_svm_with_npt_and_nothing_else() {
    let caps = probe(&mut fixture("qemu-epyc.probe")).unwrap();
    assert_eq!(caps.vendor, Vendor::Amd);
    assert_eq!((caps.family, caps.model, caps.stepping), (0x17, 0x1, 2));
    assert_eq!((caps.max_basic_leaf, caps.max_extended_leaf), (0xd, 0x8000_001e));
    assert!(caps.under_hypervisor);
    assert_eq!(
        caps.virtualization,
        Virtualization::Svm(SvmCaps {
            revision: 1,
            asids: 16,
            features: 0x1,
            npt: true,
            nrips: false,
            vmcb_clean: false,
            flush_by_asid: false,
            decode_assists: false,
            disabled_by_firmware: false,
            vm_cr_locked: false,
        })
    );
    assert_eq!(caps.rdt, RdtMonitoring::Absent("CPUID.(EAX=7,ECX=0):EBX[12] (PQM) is 0"));
    assert_eq!(caps.check_usable(), Ok(()));
}

#[test]
fn bochs_skylake_x_has_ept_ad_and_pml() {
    let caps = probe(&mut fixture("bochs-skylake-x.probe")).unwrap();
    assert_eq!(caps.vendor, Vendor::Intel);
    assert_eq!((caps.family, caps.model, caps.stepping), (6, 0x55, 4));
    assert_eq!((caps.max_basic_leaf, caps.max_extended_leaf), (0x16, 0x8000_0008));
    assert!(!caps.under_hypervisor);
    let v = vmx(&caps);
    assert_eq!(v.feature_control, FeatureControl { locked: false, vmx_outside_smx: false });
    assert!(v.feature_control.vmx_usable(), "unlocked: the hypervisor may enable it");
    assert_eq!(v.vmcs_revision, 0x2b);
    assert!(v.true_controls);
    assert_eq!(v.pinbased, 0x7f_0000_0016);
    assert_eq!(v.procbased, 0xf7f9_fffe_0400_6172);
    assert_eq!(v.exit, 0x7f_ffff_0003_6dfb);
    assert_eq!(v.entry, 0xffff_0000_11fb);
    assert_eq!(v.procbased2, 0x0217_7fff_0000_0000);
    assert_eq!(v.ept_vpid_cap, 0xf01_0633_4141);
    assert!(v.ept && v.ept_ad && v.ept_4level && v.ept_wb && v.ept_2m && v.ept_1g);
    assert!(v.pml && v.vpid && v.unrestricted_guest && v.preemption_timer);
    assert_eq!(caps.rdt, RdtMonitoring::Absent("CPUID.(EAX=7,ECX=0):EBX[12] (PQM) is 0"));
    assert_eq!(caps.check_usable(), Ok(()));
}

#[test]
fn bochs_haswell_has_ept_without_pml() {
    let caps = probe(&mut fixture("bochs-haswell-4770.probe")).unwrap();
    assert_eq!(caps.vendor, Vendor::Intel);
    assert_eq!((caps.family, caps.model, caps.stepping), (6, 0x3c, 3));
    assert_eq!((caps.max_basic_leaf, caps.max_extended_leaf), (0xd, 0x8000_0008));
    let v = vmx(&caps);
    assert_eq!(v.procbased2, 0x4_7fff_0000_0000);
    assert!(v.ept && v.ept_ad && v.ept_4level && v.ept_wb && v.ept_2m && v.ept_1g);
    assert!(!v.pml, "secondary control bit 17 is not allowed on this model");
    assert!(v.vpid && v.unrestricted_guest && v.preemption_timer && v.true_controls);
    assert_eq!(caps.rdt, RdtMonitoring::Absent("CPUID.(EAX=7,ECX=0):EBX[12] (PQM) is 0"));
    assert_eq!(caps.check_usable(), Ok(()));
}

/// A two-socket Ice Lake-SP class Xeon with RDT monitoring, constructed field by
/// field from the SDM's layouts (values chosen to exercise every field; not a dump).
fn intel_server_with_rdt() -> Recorded {
    let mut r = Recorded::default();
    // CPUID.0: max leaf 0x1b, "GenuineIntel" in EBX, EDX, ECX.
    r.cpuid.insert((0, 0), [0x1b, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]);
    // CPUID.1:EAX = family 6, extended model 6, model 0xA, stepping 6 -> model 0x6A.
    // ECX bit 5 VMX set, bit 31 (hypervisor) clear.
    r.cpuid.insert((1, 0), [0x0006_06a6, 0x0040_0800, 0x7ffe_fbff, 0xbfeb_fbff]);
    // CPUID.7.0:EBX bit 12 PQM (and 15 PQE) set.
    r.cpuid.insert((7, 0), [0, 0xf3bf_b7ef, 0, 0]);
    // CPUID.0xF.0: EBX = max RMID of any resource (255); EDX bit 1 = L3 monitoring.
    r.cpuid.insert((0xf, 0), [0, 0xff, 0, 0x2]);
    // CPUID.0xF.1: EAX[7:0] = 20 (width 24+20 = 44), EAX[8] overflow bit; EBX upscaling
    // 0x10000 bytes; ECX max RMID 143; EDX bits 0-2 occupancy, total, local.
    r.cpuid.insert((0xf, 1), [0x114, 0x1_0000, 0x8f, 0x7]);
    r.cpuid.insert((0x8000_0000, 0), [0x8000_0008, 0, 0, 0]);
    r.cpuid.insert((0x8000_0001, 0), [0, 0, 0x121, 0x2c10_0800]);
    // Firmware enabled VMX outside SMX and locked the MSR (the usual bare-metal state).
    r.msrs.insert(0x3a, 0x5);
    // IA32_VMX_BASIC: revision 4, bit 55 (true controls), WB (bits 53:50 = 6), 4 KiB.
    r.msrs.insert(0x480, 0x00da_1000_0000_0004);
    r.msrs.insert(0x48d, 0x0000_00ff_0000_0016);
    r.msrs.insert(0x48e, 0xfff9_fffe_0400_6172);
    r.msrs.insert(0x48f, 0x01ff_ffff_0003_6dfb);
    r.msrs.insert(0x490, 0x0003_ffff_0000_11fb);
    // Secondary allowed-1: bits 0..=18 (EPT 1, VPID 5, unrestricted 7, PML 17).
    r.msrs.insert(0x48b, 0x0007_ffff_0000_0000);
    // EPT_VPID_CAP: 4-level (6), WB (14), 2M (16), 1G (17), INVEPT (20), A/D (21).
    r.msrs.insert(0x48c, 0x0000_0f01_0673_4141);
    r
}

#[test]
fn bare_metal_intel_server_reports_rdt_monitoring_fields() {
    let mut hw = intel_server_with_rdt();
    let caps = probe(&mut hw).unwrap();
    assert_eq!((caps.family, caps.model, caps.stepping), (6, 0x6a, 6));
    assert!(!caps.under_hypervisor);
    let v = vmx(&caps);
    assert_eq!(v.feature_control, FeatureControl { locked: true, vmx_outside_smx: true });
    assert_eq!(v.vmcs_revision, 4);
    assert!(v.true_controls && v.ept && v.ept_ad && v.pml && v.vpid && v.unrestricted_guest && v.preemption_timer);
    assert_eq!(
        caps.rdt,
        RdtMonitoring::Present {
            max_rmid_any: 255,
            l3: L3Monitoring {
                max_rmid: 143,
                upscaling_factor: 0x1_0000,
                counter_width: 44,
                overflow_bit: true,
                occupancy: true,
                mbm_total: true,
                mbm_local: true,
            },
        }
    );
    let line = caps.machine_line();
    for kv in [
        "rdt.monitoring=1",
        "rdt.max_rmid_any=255",
        "rdt.l3.max_rmid=143",
        "rdt.l3.upscaling_factor=65536",
        "rdt.l3.counter_width=44",
        "rdt.l3.overflow_bit=1",
        "rdt.l3.mbm_local=1",
        "vmx.pml=1",
        "usable=1",
    ] {
        assert!(line.split(' ').any(|t| t == kv), "{kv} missing from {line}");
    }
}

#[test]
fn rdt_is_absent_with_the_reason_when_l3_monitoring_is_missing() {
    let mut hw = intel_server_with_rdt();
    hw.cpuid.insert((0xf, 0), [0, 0xff, 0, 0]);
    let caps = probe(&mut hw).unwrap();
    assert_eq!(caps.rdt, RdtMonitoring::Absent("PQM is set but CPUID.(EAX=0xF,ECX=0):EDX[1] (L3 monitoring) is 0"));
    hw.cpuid.insert((0, 0), [0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]);
    let caps = probe(&mut hw).unwrap();
    assert_eq!(caps.rdt, RdtMonitoring::Absent("PQM is set but the max basic CPUID leaf is below 0xF"));
}

#[test]
fn legacy_control_msrs_are_used_without_true_controls() {
    let mut hw = intel_server_with_rdt();
    hw.msrs.insert(0x480, 0x0058_1000_0000_0004); // bit 55 clear
    hw.msrs.insert(0x481, 0x0000_003f_0000_0016); // legacy pin-based: no preemption timer (bit 6)
    hw.msrs.insert(0x482, 0xfff9_fffe_0401_e172);
    hw.msrs.insert(0x483, 0x01ff_ffff_0003_6dff);
    hw.msrs.insert(0x484, 0x0003_ffff_0000_11ff);
    let v = vmx(&probe(&mut hw).unwrap());
    assert!(!v.true_controls);
    assert_eq!(v.pinbased, 0x0000_003f_0000_0016);
    assert_eq!(v.procbased, 0xfff9_fffe_0401_e172);
    assert!(!v.preemption_timer);
}

#[test]
fn refusals_name_what_is_missing() {
    // QEMU `-cpu qemu64,-svm`: neither extension.
    let mut hw = fixture("qemu-epyc.probe");
    hw.cpuid.insert((0x8000_0001, 0), [0x800f12, 0, 0x71, 0x2dd3_fbfd]);
    let caps = probe(&mut hw).unwrap();
    assert_eq!(caps.virtualization, Virtualization::None);
    assert_eq!(caps.check_usable(), Err(Unsupported::NoVirtualization));
    assert!(caps.machine_line().contains(" virt=none "));
    assert!(caps.machine_line().ends_with(" usable=0"));

    // SVM disabled and locked by firmware (VM_CR.SVMDIS=1, LOCK=1).
    let mut hw = fixture("qemu-epyc.probe");
    hw.msrs.insert(0xc001_0114, 0x18);
    let caps = probe(&mut hw).unwrap();
    assert_eq!(caps.check_usable(), Err(Unsupported::SvmDisabled { locked: true }));
    assert!(caps.check_usable().unwrap_err().to_string().contains("VM_CR.SVMDIS=1"));

    // SVM without nested paging (QEMU `-cpu qemu64`).
    let mut hw = fixture("qemu-epyc.probe");
    hw.cpuid.insert((0x8000_000a, 0), [1, 0x10, 0, 0]);
    assert_eq!(probe(&mut hw).unwrap().check_usable(), Err(Unsupported::SvmNoNpt));

    // VMX locked off by firmware.
    let mut hw = intel_server_with_rdt();
    hw.msrs.insert(0x3a, 0x1);
    assert_eq!(probe(&mut hw).unwrap().check_usable(), Err(Unsupported::VmxLockedOff));

    // VMX without EPT.
    let mut hw = intel_server_with_rdt();
    hw.msrs.insert(0x48b, 0x0007_fffd_0000_0000);
    let caps = probe(&mut hw).unwrap();
    assert!(!vmx(&caps).ept && !vmx(&caps).pml && !vmx(&caps).ept_ad);
    assert_eq!(caps.check_usable(), Err(Unsupported::VmxNoEpt));
}

#[test]
fn a_recording_missing_an_msr_is_an_error_naming_it() {
    let mut hw = fixture("bochs-skylake-x.probe");
    hw.msrs.remove(&0x48c);
    let err = probe(&mut hw).unwrap_err();
    assert_eq!(err.to_string(), "MSR 0x48c (IA32_VMX_EPT_VPID_CAP) is needed by the probe but could not be read");
}
