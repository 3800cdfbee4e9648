//! The vocabulary of every call, shared by all layers: shapes and element types, attention
//! and linear-attention options with their validation, the modifier table, errors. Nothing
//! here touches a device.

pub(crate) mod error;
pub(crate) mod linear;
pub(crate) mod modifier;
pub(crate) mod options;
pub(crate) mod shape;
