//! The kubelet's `/pods` document, as the kubelet client decodes and indexes it: never a
//! panic, whatever a kubelet (or whatever answers on its port) sends.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = mayfly::fuzzing::kubelet_pods(data);
});
