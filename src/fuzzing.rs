//! Entry points for the fuzz targets in `fuzz/` (compiled only with `--cfg fuzzing`, which
//! cargo-fuzz sets). Each is a thin wrapper that calls the production parser the agent uses on
//! input it does not control; none re-implements any of it.

use crate::lease::{GrantInput, Lease};
use crate::proto::admin as pb;
use crate::store::{RedbError, RedbStore};

/// A lease record as the stores decode it (`RedbStore::decode`): format 1 (JSON), 2 to 5
/// (postcard), checked to hold the lease named by `key`.
pub fn store_decode(store: &RedbStore, key: &str, bytes: &[u8]) -> Result<Lease, RedbError> {
    store.decode(key, bytes)
}

/// A lease as the stores write it now (format 5).
pub fn store_encode(store: &RedbStore, lease: &Lease) -> Result<Vec<u8>, RedbError> {
    store.encode(lease)
}

/// The kubelet's `/pods` body as the kubelet client reads it: decoded, then indexed by
/// container id.
pub fn kubelet_pods(body: &[u8]) -> Result<(), serde_json::Error> {
    let list: crate::attest::k8s::pods::PodList = serde_json::from_slice(body)?;
    std::hint::black_box(crate::attest::k8s::pods::PodIndex::build(list));
    Ok(())
}

/// HPACK's Huffman decoding (RFC 7541 §5.2, Appendix B): appends to `dst`.
pub fn huffman_decode(src: &[u8], dst: &mut Vec<u8>) -> bool {
    crate::server::listen::huffman::decode(src, dst).is_ok()
}

/// The Huffman encoding the unit tests check the decoder against.
pub fn huffman_encode(src: &[u8]) -> Vec<u8> {
    crate::server::listen::huffman::encode(src)
}

/// A `Grant` request, from its protobuf bytes, as the admin server turns it into a
/// [`GrantInput`] for [`crate::lease::validate_grant`]. `None`: the bytes are no `GrantRequest`.
pub fn admin_grant_input(bytes: &[u8]) -> Option<Result<GrantInput, tonic::Status>> {
    let r = <pb::GrantRequest as prost::Message>::decode(bytes).ok()?;
    Some(crate::server::admin::grant_input(r))
}

/// A `Renew` request, from its protobuf bytes: its lease ID and its TTL as the admin server
/// converts it. `None`: the bytes are no `RenewRequest`.
pub fn admin_renew_request(
    bytes: &[u8],
) -> Option<(String, Result<Option<std::time::Duration>, tonic::Status>)> {
    let r = <pb::RenewRequest as prost::Message>::decode(bytes).ok()?;
    Some((r.lease_id, crate::server::admin::duration("ttl", r.ttl)))
}

/// A `Delegate` request, from its protobuf bytes: the parent it names and the input as the
/// Delegation server converts it. `None`: the bytes are no `DelegateRequest`.
pub fn delegate_input(
    bytes: &[u8],
) -> Option<(String, Result<crate::lease::DelegateInput, tonic::Status>)> {
    let r = <crate::proto::delegation::DelegateRequest as prost::Message>::decode(bytes).ok()?;
    Some((
        r.parent.clone(),
        crate::server::delegation::delegate_input(r),
    ))
}
