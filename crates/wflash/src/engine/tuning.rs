//! Measured tile choices per adapter: what `cargo xtask bench --tune` writes and the engine
//! reads.
//!
//! The planner's defaults come from the adapter's limits (workgroup memory, invocations) and, on
//! CPU adapters, from what the unrolled kernel can keep in registers. Which of the valid tiles is
//! fastest depends on the device and its driver, so it is measured: `--tune` times every
//! candidate of [`Engine::tile_candidates`](crate::Engine::tile_candidates) and stores the winners in a JSON file, one entry per
//! (adapter, driver). An engine loads the entries for its own adapter and driver when it is
//! created ([`EngineOptions::tuning`](crate::EngineOptions::tuning)); dims without an
//! entry keep the defaults. A tuned tile is checked against the same rules as the defaults, so a
//! file from another machine or an older version can make a tile slower, never wrong.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::kernels::{Family, TileConfig};
use crate::{Error, Result};

/// The file: tuned tiles of any number of adapters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TuningFile {
    pub adapters: Vec<AdapterTuning>,
}

/// The tuned tiles of one adapter and driver (as [`EngineInfo`](crate::EngineInfo) names them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterTuning {
    pub adapter: String,
    pub driver: String,
    pub driver_info: String,
    pub tiles: Vec<TunedTile>,
}

/// The measured winner for one kernel family and one (head dim, value dim).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunedTile {
    pub family: Family,
    pub head_dim: u32,
    pub value_dim: u32,
    pub block_m: u32,
    pub block_n: u32,
}

impl TunedTile {
    pub fn tile(&self) -> TileConfig {
        TileConfig {
            block_m: self.block_m,
            block_n: self.block_n,
        }
    }
}

impl TuningFile {
    /// Reads a tuning file. A missing file is an empty one; an unreadable or malformed file is
    /// [`Error::TuningFile`].
    pub fn load(path: &Path) -> Result<TuningFile> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Ok(TuningFile::default());
            }
            Err(err) => return Err(tuning_error(path, err.to_string())),
        };
        serde_json::from_str(&text).map_err(|err| tuning_error(path, err.to_string()))
    }

    /// Writes the file (pretty JSON), creating its folder.
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|err| tuning_error(path, err.to_string()))?;
        }
        let text = serde_json::to_string_pretty(self)
            .map_err(|err| tuning_error(path, err.to_string()))?;
        std::fs::write(path, text + "\n").map_err(|err| tuning_error(path, err.to_string()))
    }

    /// The tiles stored for this adapter and driver.
    pub fn tiles_for(&self, adapter: &str, driver: &str, driver_info: &str) -> &[TunedTile] {
        self.adapters
            .iter()
            .find(|a| a.adapter == adapter && a.driver == driver && a.driver_info == driver_info)
            .map_or(&[], |a| &a.tiles)
    }

    /// Stores `tile` for this adapter and driver, replacing the entry for its family and dims.
    pub fn set(&mut self, adapter: &str, driver: &str, driver_info: &str, tile: TunedTile) {
        let index = match self.adapters.iter().position(|a| {
            a.adapter == adapter && a.driver == driver && a.driver_info == driver_info
        }) {
            Some(index) => index,
            None => {
                self.adapters.push(AdapterTuning {
                    adapter: adapter.to_string(),
                    driver: driver.to_string(),
                    driver_info: driver_info.to_string(),
                    tiles: Vec::new(),
                });
                self.adapters.len() - 1
            }
        };
        let tiles = &mut self.adapters[index].tiles;
        tiles.retain(|t| {
            (t.family, t.head_dim, t.value_dim) != (tile.family, tile.head_dim, tile.value_dim)
        });
        tiles.push(tile);
        tiles.sort_by_key(|t| (t.family, t.head_dim, t.value_dim));
    }
}

fn tuning_error(path: &Path, reason: String) -> Error {
    Error::TuningFile {
        path: path.display().to_string(),
        reason,
    }
}

/// Where the tuning file is when [`EngineOptions::tuning`](crate::EngineOptions::tuning)
/// does not say: `$WFLASH_TUNING`, else `$XDG_CONFIG_HOME/wflash/tuning.json`, else
/// `$HOME/.config/wflash/tuning.json`; `None` when none of these variables is set.
pub fn default_tuning_path() -> Option<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(path) = var("WFLASH_TUNING") {
        return Some(PathBuf::from(path));
    }
    let config = var("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|home| PathBuf::from(home).join(".config")))?;
    Some(config.join("wflash").join("tuning.json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_replaces_and_round_trips() {
        let tile = |block_m| TunedTile {
            family: Family::Unrolled,
            head_dim: 64,
            value_dim: 64,
            block_m,
            block_n: 4,
        };
        let mut file = TuningFile::default();
        file.set("llvmpipe", "llvmpipe", "Mesa", tile(32));
        file.set("llvmpipe", "llvmpipe", "Mesa", tile(64));
        file.set("other", "d", "i", tile(16));
        assert_eq!(file.tiles_for("llvmpipe", "llvmpipe", "Mesa"), &[tile(64)]);
        assert_eq!(file.tiles_for("llvmpipe", "llvmpipe", "Mesa 2"), &[]);
        let dir = std::env::temp_dir().join(format!("wflash-tuning-{}", std::process::id()));
        let path = dir.join("tuning.json");
        file.save(&path).unwrap();
        assert_eq!(TuningFile::load(&path).unwrap(), file);
        std::fs::write(&path, "{ not json").unwrap();
        assert!(matches!(
            TuningFile::load(&path),
            Err(Error::TuningFile { .. })
        ));
        assert_eq!(
            TuningFile::load(&dir.join("missing.json")).unwrap(),
            TuningFile::default()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
