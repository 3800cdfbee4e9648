//! Device resources below the engine: tensors, the scratch pool, the memory ledger every
//! allocation is charged to, and readback waiting.

pub(crate) mod memory;
pub(crate) mod pool;
pub(crate) mod readback;
pub(crate) mod tensor;
