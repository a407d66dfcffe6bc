//! Any bytes as a CNI network config: a config or a CNI error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = trellis_cni::NetConf::parse(data);
});
