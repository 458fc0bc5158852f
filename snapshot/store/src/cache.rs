//! A chunk cache on local disk, shared by every VM (and process) on a host: chunks as fetched
//! from a store (compressed), one file per chunk named by its hash, bounded in total size and
//! evicted least recently used first.
//!
//! - A hit is checked like a fetch (decompressed to the expected length, hash compared): a
//!   damaged cache file is deleted and the chunk fetched again, never served.
//! - Files are written to a temporary name and renamed, so concurrent writers and readers
//!   (several VMs waking from one template) see whole chunks or none.
//! - Use is recorded in the file's mtime (set on every hit); eviction deletes the oldest files
//!   until the cache is at 90 % of its bound. The bound is enforced per process from a scan of
//!   the directory, so several processes filling it at once may overshoot briefly.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use crate::chunk;
use crate::error::{io_err, Result};

/// Default bound of the chunk cache (10 GiB).
pub const DEFAULT_CACHE_BYTES: u64 = 10 << 30;

#[derive(Debug)]
pub struct ChunkCache {
    dir: PathBuf,
    max_bytes: u64,
    /// Bytes this process believes the cache holds (rescanned when it exceeds the bound).
    used: Mutex<u64>,
}

impl ChunkCache {
    /// Opens (creating, 0700) the cache directory `dir` bounded to `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self> {
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(io_err("create", dir))?;
            // Cached chunks are guest memory.
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(io_err("set permissions of", dir))?;
        }
        let cache = Self {
            dir: dir.to_path_buf(),
            max_bytes,
            used: Mutex::new(0),
        };
        let used = cache.scan().iter().map(|e| e.2).sum();
        *cache.used_lock() = used;
        Ok(cache)
    }

    /// `$DORMOUSE_CHUNK_CACHE`, else `/var/cache/dormouse/chunks` for root, else
    /// `$XDG_CACHE_HOME` (or `~/.cache`)`/dormouse/chunks`.
    pub fn default_dir() -> PathBuf {
        if let Some(dir) = std::env::var_os("DORMOUSE_CHUNK_CACHE") {
            return PathBuf::from(dir);
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            return PathBuf::from("/var/cache/dormouse/chunks");
        }
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(std::env::temp_dir);
        base.join("dormouse").join("chunks")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn used_lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.used.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path_of(&self, hash: &str) -> Option<PathBuf> {
        chunk::is_hash(hash).then(|| self.dir.join(hash))
    }

    /// The chunk `hash` holding `len` bytes, if cached and intact.
    pub fn get(&self, hash: &str, len: usize) -> Option<Vec<u8>> {
        let path = self.path_of(hash)?;
        let mut file = File::open(&path).ok()?;
        let max = chunk::max_compressed_len(len as u64);
        let mut compressed = Vec::new();
        if (&mut file)
            .take(max.saturating_add(1))
            .read_to_end(&mut compressed)
            .is_err()
        {
            return None;
        }
        match chunk::decode(hash, &compressed, len) {
            Ok(data) if compressed.len() as u64 <= max => {
                // Recently used: the last to be evicted.
                let _ = file.set_modified(SystemTime::now());
                Some(data)
            }
            Ok(_) | Err(_) => {
                tracing::warn!(path = %path.display(), "damaged chunk in the cache: deleted");
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    /// Stores the chunk `hash` as fetched (`compressed`, already checked by the caller).
    pub fn put(&self, hash: &str, compressed: &[u8]) {
        let Some(path) = self.path_of(hash) else {
            return;
        };
        if path.exists() {
            return;
        }
        let tmp = self.dir.join(format!(
            ".{hash}.{}.{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(compressed))
            .and_then(|()| fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            tracing::debug!("cannot cache chunk {hash}: {e}");
            return;
        }
        let over = {
            let mut used = self.used_lock();
            *used += compressed.len() as u64;
            *used > self.max_bytes
        };
        if over {
            self.evict();
        }
    }

    /// (path, mtime, size) of every cached chunk.
    fn scan(&self) -> Vec<(PathBuf, SystemTime, u64)> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let name = entry.file_name();
                if !chunk::is_hash(name.to_str()?) {
                    return None;
                }
                let meta = entry.metadata().ok()?;
                Some((entry.path(), meta.modified().ok()?, meta.len()))
            })
            .collect()
    }

    /// Deletes the least recently used chunks until the cache holds 90 % of its bound.
    fn evict(&self) {
        let mut entries = self.scan();
        entries.sort_by_key(|e| e.1);
        let mut used: u64 = entries.iter().map(|e| e.2).sum();
        let target = self.max_bytes / 10 * 9;
        let mut removed = 0usize;
        for (path, _, size) in entries {
            if used <= target {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                used = used.saturating_sub(size);
                removed += 1;
            }
        }
        tracing::debug!(removed, used, "chunk cache evicted");
        *self.used_lock() = used;
    }

    /// Bytes the cache holds now (a directory scan).
    pub fn size_on_disk(&self) -> u64 {
        self.scan().iter().map(|e| e.2).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(data: &[u8]) -> (String, Vec<u8>) {
        (chunk::hash_hex(data), chunk::compress(data).unwrap())
    }

    #[test]
    fn a_cached_chunk_comes_back_and_a_damaged_one_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(&dir.path().join("c"), 1 << 20).unwrap();
        let data = vec![7u8; 65536];
        let (hash, compressed) = stored(&data);
        assert!(cache.get(&hash, data.len()).is_none());
        cache.put(&hash, &compressed);
        assert_eq!(cache.get(&hash, data.len()).unwrap(), data);
        // A flipped byte in the file: detected, deleted, not served.
        let path = dir.path().join("c").join(&hash);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        assert!(cache.get(&hash, data.len()).is_none());
        assert!(!path.exists());
        // A name that is not a hash is never a path.
        assert!(cache.get("../../etc/passwd", 10).is_none());
    }

    #[test]
    fn the_least_recently_used_chunks_are_evicted_at_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        // Random-ish data so compression cannot shrink it below the bound's arithmetic.
        let chunk_of = |seed: u64| -> Vec<u8> {
            let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            (0..40_000)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        };
        let cache = ChunkCache::open(dir.path(), 100_000).unwrap();
        let chunks: Vec<_> = (1..=3).map(chunk_of).collect();
        let ids: Vec<_> = chunks.iter().map(|c| stored(c)).collect();
        cache.put(&ids[0].0, &ids[0].1);
        std::thread::sleep(std::time::Duration::from_millis(20));
        cache.put(&ids[1].0, &ids[1].1);
        std::thread::sleep(std::time::Duration::from_millis(20));
        // Use the first again: the second is now the oldest.
        assert!(cache.get(&ids[0].0, chunks[0].len()).is_some());
        std::thread::sleep(std::time::Duration::from_millis(20));
        cache.put(&ids[2].0, &ids[2].1);
        assert!(cache.size_on_disk() <= 100_000);
        assert!(
            cache.get(&ids[1].0, chunks[1].len()).is_none(),
            "LRU evicted"
        );
        assert!(cache.get(&ids[0].0, chunks[0].len()).is_some());
        assert!(cache.get(&ids[2].0, chunks[2].len()).is_some());
    }
}
