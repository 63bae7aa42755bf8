//! `/proc/PID/cgroup` text (`CgroupLayout::parse`), read as from the host's cgroup namespace or
//! from a pod's (the first byte picks how deep the agent's namespace is rooted): never a panic,
//! and the pod it names is always in the canonical form the `k8s:pod-uid` and
//! `k8s:container-id` selectors hold.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mayfly::attest::k8s::CgroupLayout;
use mayfly::selector::Selector;

fn lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fuzz_target!(|data: &[u8]| {
    let Some((&depth, rest)) = data.split_first() else {
        return;
    };
    let init = format!("0::/{}init.scope\n", "../".repeat(usize::from(depth % 6)));
    let layout = CgroupLayout::kubelet_default().in_namespace_of(&init);
    let text = String::from_utf8_lossy(rest);
    let Some(pod) = layout.parse(&text) else {
        return;
    };
    let uid = pod.pod_uid.as_str();
    let dashed = uid.len() == 36
        && uid
            .split('-')
            .map(str::len)
            .eq([8, 4, 4, 4, 12].into_iter())
        && lower_hex(&uid.replace('-', ""));
    assert!(dashed || (uid.len() == 32 && lower_hex(uid)), "{uid:?}");
    let cid = pod.container_id.as_str();
    assert!(cid.len() == 64 && lower_hex(cid), "{cid:?}");
    for s in [
        format!("k8s:pod-uid:{uid}"),
        format!("k8s:container-id:{cid}"),
    ] {
        assert_eq!(Selector::parse(&s).map(|s| s.to_string()), Ok(s));
    }
});
