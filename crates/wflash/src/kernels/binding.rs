//! Binding numbers (group 0) of every kernel's resources, named once: the WGSL files and the
//! generated accessors write `{binding.NAME}` and the composer fills in the number from here
//! (`kernels/wgsl.rs`); dispatch binds by the same constants.

macro_rules! bindings {
    ($($(#[$doc:meta])* $name:ident = $number:literal, $wgsl:literal;)*) => {
        $($(#[$doc])* pub const $name: u32 = $number;)*

        /// The number of `{binding.NAME}` in WGSL.
        pub(crate) fn number(wgsl_name: &str) -> Option<u32> {
            match wgsl_name {
                $($wgsl => Some($name),)*
                _ => None,
            }
        }
    };
}

bindings! {
    /// Every kernel's uniform block.
    PARAMS = 0, "params";
    /// Attention and linear attention: Q and O through their typed accessors.
    Q = 1, "q";
    O = 4, "o";
    /// Forward attention: K and V (tiled: storage buffers; unrolled: packed textures).
    K = 2, "k";
    V = 3, "v";
    LSE = 5, "lse";
    /// ALiBi slopes, sinks and temperatures (`row_data` in flash_common.wgsl).
    ROW_DATA = 6, "row_data";
    SEQUENCES = 7, "sequences";
    /// Packed bias and key-mask textures, bound only when compiled in.
    BIAS = 8, "bias";
    KEY_MASK = 9, "key_mask";
    /// Linear attention: K and V as storage buffers (recurrent) and packed textures (chunked,
    /// at K and V's numbers).
    LINEAR_K = 12, "linear_k";
    LINEAR_V = 13, "linear_v";
    DECAY_POWERS = 5, "decay_powers";
    CHUNK_STATES = 6, "chunk_states";
    KV_IN = 7, "kv_in";
    Z_IN = 8, "z_in";
    KV_OUT = 9, "kv_out";
    Z_OUT = 10, "z_out";
    STATE_TEXTURE = 11, "state_texture";
    /// Linear attention's backward (linear_bwd.wgsl): dO, packed Q and ĝ textures (ĝ written
    /// by the readout pass, read by the others) and the gradients.
    LINEAR_D_O = 14, "linear_do";
    LINEAR_Q_TEX = 15, "linear_q_tex";
    LINEAR_GRAD_TEX = 16, "linear_grad_tex";
    LINEAR_GRAD_OUT = 17, "linear_grad_out";
    LINEAR_DQ = 18, "linear_dq";
    LINEAR_DK = 19, "linear_dk";
    LINEAR_DV = 20, "linear_dv";
    /// The packing pass: the tensor it reads and the texture it writes.
    PACK_SOURCE = 1, "pack_source";
    PACK_TEXTURE = 2, "pack_texture";
    /// The conversion pass: its source and destination.
    CONVERT_FROM = 1, "convert_from";
    CONVERT_TO = 2, "convert_to";
    /// The backward passes (flash_bwd.wgsl): their own uniform block, the f32 inputs, the
    /// statistics, the packed textures and the gradients.
    BWD = 10, "bwd";
    BWD_Q = 11, "bwd_q";
    BWD_K = 12, "bwd_k";
    BWD_V = 13, "bwd_v";
    BWD_O = 14, "bwd_o";
    BWD_DO = 15, "bwd_do";
    BWD_STATS = 16, "bwd_stats";
    BWD_Q_TEX = 17, "bwd_q_tex";
    BWD_DO_TEX = 18, "bwd_do_tex";
    BWD_K_TEX = 19, "bwd_k_tex";
    BWD_V_TEX = 20, "bwd_v_tex";
    BWD_DQ = 21, "bwd_dq";
    BWD_DK = 22, "bwd_dk";
    BWD_DV = 23, "bwd_dv";
    BWD_D_TEMPERATURE = 24, "bwd_d_temperature";
    BWD_D_BIAS = 25, "bwd_d_bias";
    BWD_SINK_PARTIALS = 26, "bwd_sink_partials";
    /// The merge of partial attention results (merge.wgsl): the stacked outputs and LSEs,
    /// the merged output and LSE.
    MERGE_PARTS = 1, "merge_parts";
    MERGE_LSE = 2, "merge_lse";
    MERGE_OUT = 3, "merge_out";
    MERGE_LSE_OUT = 4, "merge_lse_out";
    /// Decoding (decode.wgsl): sequence lengths, the cache (read by the split pass, written by
    /// the append pass), the new tokens appended, the partial outputs and LSEs. Q at `Q`.
    DECODE_LENGTHS = 2, "decode_lengths";
    DECODE_K = 3, "decode_k";
    DECODE_V = 4, "decode_v";
    DECODE_PARTIAL_O = 5, "decode_partial_o";
    DECODE_PARTIAL_LSE = 6, "decode_partial_lse";
    DECODE_NEW = 7, "decode_new";
    DECODE_CACHE = 8, "decode_cache";
    DECODE_BLOCKS = 9, "decode_blocks";
    DECODE_ROW_DATA = 10, "decode_row_data";
    /// The reduction pass (flash_bwd.wgsl's `reduce_sum`).
    REDUCE_IN = 1, "reduce_in";
    REDUCE_OUT = 2, "reduce_out";
}
