//! Generated protobuf and gRPC code. Protocol types stay at the edge (`workload_api`, `admin`).
#![allow(clippy::all, missing_docs)]

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// The SPIFFE Workload API (no proto package).
pub mod workload {
    tonic::include_proto!("_");
}

/// mayfly's admin API.
pub mod admin {
    tonic::include_proto!("mayfly.admin.v1");
}

/// mayfly's Delegation service (on the workload socket).
pub mod delegation {
    tonic::include_proto!("mayfly.delegation.v1");
}

/// Protobuf over gRPC like tonic's `ProstCodec`, with a smaller encode buffer. A response
/// stream keeps its encode buffer for as long as it is open, and a Workload API stream is open
/// for as long as its workload runs: tonic's default 8 KiB, times a thousand open streams, is
/// 8 MiB. An X.509-SVID response is about 1.5 KiB; the buffer grows for a larger message.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for WorkloadCodec<T, U> {
    fn default() -> Self {
        WorkloadCodec(PhantomData)
    }
}

/// The encode buffer each Workload API response starts with.
const ENCODE_BUFFER: usize = 2048;
/// Tonic's default: how much a stream encodes before it yields to other tasks.
const YIELD_THRESHOLD: usize = 32 * 1024;

impl<T, U> Codec for WorkloadCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(ENCODE_BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::default())
    }
}
