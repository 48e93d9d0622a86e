//! A stable-toolchain smoke fuzzer: thousands of deterministic mutations of the
//! fixtures through both parsers. Any panic fails the test; errors are fine. The real
//! coverage-guided fuzzing lives in `fuzz/` (cargo-fuzz, nightly).

use hvx_import::{ovf, vmx, vmx_vm};

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// xorshift64*: deterministic, so a failure reproduces from the iteration number.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const TOKENS: &[&[u8]] = &[
    b"<",
    b">",
    b"</Item>",
    b"<Item>",
    b"&amp;",
    b"\"",
    b"=",
    b"|",
    b"|2",
    b"\n",
    b"0",
    b"99999999999999999999",
    b"-1",
    b"ovf:/disk/",
    b"..",
    b"/",
    b"present = \"TRUE\"",
    b"scsi0:0.",
    b"ethernet9.",
    b"<!DOCTYPE x>",
    b"byte * 2^64",
    b"\xff\xfe",
];

fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(4) {
            0 => {
                let end = (at + rng.below(64)).min(out.len());
                out.drain(at..end);
            }
            1 => {
                let token = TOKENS[rng.below(TOKENS.len())];
                out.splice(at..at, token.iter().copied());
            }
            2 if !out.is_empty() => {
                let i = at.min(out.len() - 1);
                out[i] = rng.next() as u8;
            }
            _ => {
                // Duplicate a slice: repeated elements, nested items.
                let end = (at + rng.below(200)).min(out.len());
                let copy = out[at..end].to_vec();
                out.splice(at..at, copy);
            }
        }
    }
    out
}

#[test]
fn ovf_parser_never_panics_on_mutations() {
    let seeds: Vec<Vec<u8>> = [
        "single-vm.ovf",
        "vapp-collection.ovf",
        "many-devices.ovf",
        "efi-windows.ovf",
    ]
    .iter()
    .map(|f| fixture(f))
    .collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut parsed = 0;
    for _ in 0..4000 {
        let seed = rng.below(seeds.len());
        let input = mutate(&mut rng, &seeds[seed]);
        let text = String::from_utf8_lossy(&input);
        if ovf::parse(&text, "x").is_ok() {
            parsed += 1;
        }
    }
    // Many mutations land in whitespace or text and still parse: the harness reaches
    // the mapping code, not just the XML error path.
    assert!(parsed > 100, "only {parsed} mutated descriptors parsed");
}

/// The fidelity corpus (deployment options, blank disks, vCloud sections, nested
/// collections) mutated the same way, parsed with each deployment option.
#[test]
fn ovf_parser_never_panics_on_corpus_mutations() {
    let dir = format!("{}/tests/corpus", env!("CARGO_MANIFEST_DIR"));
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .expect("corpus")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "ovf"))
        .map(|p| std::fs::read(&p).expect("read"))
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 6);
    let options = [None, Some("tiny"), Some("large"), Some("")];
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let mut parsed = 0;
    for i in 0..4000 {
        let seed = rng.below(seeds.len());
        let input = mutate(&mut rng, &seeds[seed]);
        let text = String::from_utf8_lossy(&input);
        let opts = ovf::OvfOptions {
            deployment_option: options[i % options.len()].map(str::to_owned),
        };
        if ovf::parse_with(&text, "x", &opts).is_ok() {
            parsed += 1;
        }
    }
    // Fewer parse than above: options other than the default exist in one file only,
    // and problems.ovf never parses; still enough to reach the mapping code.
    assert!(
        parsed > 50,
        "only {parsed} mutated corpus descriptors parsed"
    );
}

#[test]
fn vmx_parser_never_panics_on_mutations() {
    let seeds = [fixture("esx-linux.vmx"), fixture("workstation-efi.vmx")];
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let mut parsed = 0;
    for _ in 0..6000 {
        let seed = rng.below(seeds.len());
        let input = mutate(&mut rng, &seeds[seed]);
        let text = String::from_utf8_lossy(&input);
        if let Ok(v) = vmx::parse(&text)
            && vmx_vm::application(&v, "x").is_ok()
        {
            parsed += 1;
        }
    }
    assert!(parsed > 100, "only {parsed} mutated VMX files mapped");
}
