//! Device resources below the engine: tensors, the scratch pool, the memory ledger every
//! allocation is charged to, readback waiting, and the gate that serialises device use on GL.

pub(crate) mod gate;
pub(crate) mod memory;
pub(crate) mod pool;
pub(crate) mod readback;
pub(crate) mod scopes;
pub(crate) mod tensor;
