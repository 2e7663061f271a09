//! hvctl: the host command line for the hypervisor.
fn main() {
    eprintln!("hvctl: no commands yet");
    std::process::exit(2);
}
