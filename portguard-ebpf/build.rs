use which::which;

/// Cargo does not know that the eBPF binary depends on bpf-linker; rebuild when it changes.
fn main() {
    if let Ok(bpf_linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
}
