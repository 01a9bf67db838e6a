//! The Export protocol (DESIGN section 5): the generated tonic client and server for
//! `clustermesh.export.v1.Export`, and conversions between its messages and the domain model
//! ([`convert`]). Conversions from the wire validate everything, as the model does for
//! kvstore values: a peer's message never becomes a model value it could not be otherwise.

#![forbid(unsafe_code)]

/// Generated from `proto/clustermesh/export/v1/export.proto`.
#[allow(missing_docs, unreachable_pub, clippy::all, reason = "generated code")]
pub mod v1 {
    tonic::include_proto!("clustermesh.export.v1");
}

pub mod client;
pub mod convert;

pub use convert::{ConvertError, Object, ObjectRef};
