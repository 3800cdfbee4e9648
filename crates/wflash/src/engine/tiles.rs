//! Tile policy: the tile each kernel family runs at given dims on this adapter (the
//! planner's default from the adapter's limits, or a measured one), and which tiles are valid.

use crate::kernels::{self, Family, TILED_BLOCK_MS, TILED_BLOCK_NS, TileConfig};
use crate::{Engine, Error, Result};

/// Query rows per workgroup of the tiled kernel by default (one invocation owns one row).
const TILED_BLOCK_M: u32 = 64;
/// The largest key tile of the tiled kernel by default; smaller when workgroup memory is short.
const TILED_MAX_BLOCK_N: u32 = 32;

impl Engine {
    /// Every tile `family` can run at these dims on this adapter, the default first. These are
    /// what `cargo xtask bench --tune` times.
    pub fn tile_candidates(
        &self,
        family: Family,
        head_dim: u32,
        value_dim: u32,
    ) -> Vec<TileConfig> {
        let mut tiles = match family {
            Family::Unrolled => kernels::unrolled_tiles(head_dim, value_dim),
            Family::Tiled => kernels::tiled_tiles(),
        };
        tiles.retain(|&t| self.check_tile(family, head_dim, value_dim, t).is_ok());
        if let Ok(default) = self.default_tile(family, head_dim, value_dim) {
            tiles.retain(|&t| t != default);
            tiles.insert(0, default);
        }
        tiles
    }

    /// Makes `family` use `tile` at these dims (`None`: back to the default), after checking
    /// that it can run here ([`Error::InvalidTile`] otherwise). Affects later calls only.
    pub fn set_tile(
        &self,
        family: Family,
        head_dim: u32,
        value_dim: u32,
        tile: Option<TileConfig>,
    ) -> Result<()> {
        let mut tuned = self
            .inner
            .tuned
            .write()
            .map_err(|_| Error::Internal("tuned tiles poisoned".into()))?;
        match tile {
            Some(tile) => {
                self.check_tile(family, head_dim, value_dim, tile)?;
                tuned.insert((family, head_dim, value_dim), tile);
            }
            None => {
                tuned.remove(&(family, head_dim, value_dim));
            }
        }
        Ok(())
    }

    /// The tuned tiles in effect: (family, head dim, value dim, tile), sorted.
    pub fn tuned_tiles(&self) -> Vec<(Family, u32, u32, TileConfig)> {
        let mut tiles: Vec<_> = self
            .inner
            .tuned
            .read()
            .map(|t| {
                t.iter()
                    .map(|(&(f, d, dv), &tile)| (f, d, dv, tile))
                    .collect()
            })
            .unwrap_or_default();
        tiles.sort();
        tiles
    }

    /// The tile `family` runs at these dims: the tuned one, else the default.
    pub(crate) fn tile_for(
        &self,
        family: Family,
        head_dim: u32,
        value_dim: u32,
    ) -> Result<TileConfig> {
        let tuned = self
            .inner
            .tuned
            .read()
            .ok()
            .and_then(|t| t.get(&(family, head_dim, value_dim)).copied());
        match tuned {
            Some(tile) => Ok(tile),
            None => self.default_tile(family, head_dim, value_dim),
        }
    }

    /// The planner's tile from the adapter's limits: the unrolled kernel's most rows per
    /// invocation; the tiled kernel's 64 rows and the largest key tile that fits in workgroup
    /// memory.
    fn default_tile(&self, family: Family, head_dim: u32, value_dim: u32) -> Result<TileConfig> {
        if family == Family::Unrolled {
            return Ok(kernels::unrolled_tile(head_dim, value_dim));
        }
        let limits = &self.inner.info.limits;
        let block_m = TILED_BLOCK_M
            .min(limits.max_compute_invocations_per_workgroup)
            .min(limits.max_compute_workgroup_size_x);
        let tile_bytes = |block_n| kernels::workgroup_bytes(block_m, block_n, head_dim, value_dim);
        let mut block_n = TILED_MAX_BLOCK_N;
        while block_n > 1 && tile_bytes(block_n) > limits.max_compute_workgroup_storage_size {
            block_n /= 2;
        }
        if tile_bytes(block_n) > limits.max_compute_workgroup_storage_size {
            return Err(Error::TooLarge {
                limit: "max_compute_workgroup_storage_size",
                needed: u64::from(tile_bytes(1)),
                max: u64::from(limits.max_compute_workgroup_storage_size),
                hint: " (one key row of K and V does not fit)",
            });
        }
        Ok(TileConfig { block_m, block_n })
    }

    /// Whether `family` can run `tile` at these dims here.
    fn check_tile(
        &self,
        family: Family,
        head_dim: u32,
        value_dim: u32,
        tile: TileConfig,
    ) -> Result<()> {
        let invalid = |reason| Error::InvalidTile {
            family: family.name(),
            head_dim,
            value_dim,
            block_m: tile.block_m,
            block_n: tile.block_n,
            reason,
        };
        match family {
            Family::Unrolled => {
                if !kernels::unrolled_tiles(head_dim, value_dim).contains(&tile) {
                    return Err(invalid(
                        "the unrolled kernel takes 4 keys per step and 8 lanes times a power of two rows, within its register bound",
                    ));
                }
            }
            Family::Tiled => {
                let limits = &self.inner.info.limits;
                if self.inner.info.device_type == wgpu::DeviceType::Cpu {
                    // CPU drivers end an invocation's loops after 65535 iterations in all
                    // (docs/PERF.md), and the planner's key limit was measured on the default
                    // tile: fewer rows (more staging iterations each) or smaller key tiles (more
                    // tiles) could pass it.
                    let default = self.default_tile(family, head_dim, value_dim)?;
                    if tile.block_m < default.block_m || tile.block_n < default.block_n {
                        return Err(invalid(
                            "on CPU adapters the tiled kernel's tile may not be smaller than its default",
                        ));
                    }
                }
                if !TILED_BLOCK_MS.contains(&tile.block_m)
                    || !TILED_BLOCK_NS.contains(&tile.block_n)
                {
                    return Err(invalid(
                        "block_m must be 32, 64 or 128 and block_n 4, 8, 16, 32 or 64",
                    ));
                }
                if tile.block_m > limits.max_compute_invocations_per_workgroup
                    || tile.block_m > limits.max_compute_workgroup_size_x
                {
                    return Err(invalid(
                        "more invocations than the adapter allows per workgroup",
                    ));
                }
                if kernels::workgroup_bytes(tile.block_m, tile.block_n, head_dim, value_dim)
                    > limits.max_compute_workgroup_storage_size
                {
                    return Err(invalid("the K/V tiles do not fit in workgroup memory"));
                }
            }
        }
        Ok(())
    }
}
