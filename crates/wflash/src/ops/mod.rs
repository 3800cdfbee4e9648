//! Operations: one folder per operation, each `plan` (decide everything on the host) and
//! `dispatch` (record what the plan says), behind the `Engine` methods users call.
//! Operations share only `passes` (packing, conversions, bindings), never each other's
//! internals; the exceptions are `attention_backward`, which differentiates an attention
//! call and so starts from attention's plan of it, and `decode`, whose split-KV partials go
//! through `merge`'s plan and recording.

pub(crate) mod attention;
pub(crate) mod attention_backward;
pub(crate) mod decode;
pub(crate) mod linear;
pub(crate) mod merge;
pub(crate) mod passes;
