//! A bitmap with one bit per guest page, plus its on-disk form `pages.bitmap`.
//!
//! Words are `u64`, bit `i % 64` of word `i / 64` is page `i` — the same layout as KVM's dirty
//! log and vm-memory's `AtomicBitmap::get_and_reset`, so the VMM can OR those in directly.
//!
//! File layout (little endian): magic `DMPGBMP\0` (8), format version u32, reserved u32,
//! page count u64, CRC32 of the word bytes u32, CRC32 of header bytes 0..28 u32, then the words.

use std::path::{Path, PathBuf};

use crate::error::{Result, SnapshotError};
use crate::fsutil;
use crate::FORMAT_VERSION;

pub const BITMAP_FILE: &str = "pages.bitmap";
const BITMAP_MAGIC: [u8; 8] = *b"DMPGBMP\0";
const BITMAP_HEADER_LEN: usize = 32;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageBitmap {
    pages: u64,
    words: Vec<u64>,
}

fn words_for(pages: u64) -> usize {
    pages.div_ceil(64) as usize
}

impl PageBitmap {
    /// All pages clear.
    pub fn new(pages: u64) -> Self {
        Self {
            pages,
            words: vec![0; words_for(pages)],
        }
    }

    /// All pages set.
    pub fn full(pages: u64) -> Self {
        let mut bitmap = Self {
            pages,
            words: vec![u64::MAX; words_for(pages)],
        };
        bitmap.clear_tail();
        bitmap
    }

    /// Wraps KVM-style words. Bits past `pages` are ignored; missing words count as clear.
    pub fn from_words(pages: u64, words: &[u64]) -> Self {
        let mut bitmap = Self::new(pages);
        bitmap.or_words(words);
        bitmap
    }

    pub fn page_count(&self) -> u64 {
        self.pages
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }

    pub fn get(&self, page: u64) -> bool {
        page < self.pages
            && self
                .words
                .get((page / 64) as usize)
                .is_some_and(|word| word & (1 << (page % 64)) != 0)
    }

    /// Sets one page; pages past the end are ignored.
    pub fn set(&mut self, page: u64) {
        if page < self.pages {
            if let Some(word) = self.words.get_mut((page / 64) as usize) {
                *word |= 1 << (page % 64);
            }
        }
    }

    /// Sets `count` pages starting at `start`, clipped to the bitmap.
    pub fn set_range(&mut self, start: u64, count: u64) {
        let end = start.saturating_add(count).min(self.pages);
        let mut page = start;
        while page < end {
            let bit = page % 64;
            let span = (64 - bit).min(end - page);
            let mask = if span == 64 {
                u64::MAX
            } else {
                ((1u64 << span) - 1) << bit
            };
            if let Some(word) = self.words.get_mut((page / 64) as usize) {
                *word |= mask;
            }
            page += span;
        }
    }

    /// ORs in KVM-style words (e.g. a dirty log or `AtomicBitmap::get_and_reset`).
    pub fn or_words(&mut self, words: &[u64]) {
        for (mine, theirs) in self.words.iter_mut().zip(words) {
            *mine |= theirs;
        }
        self.clear_tail();
    }

    /// Sets every page set in `other` (which must cover the same pages).
    pub fn or_assign(&mut self, other: &PageBitmap) {
        self.or_words(&other.words);
    }

    /// Clears every page set in `other`.
    pub fn and_not(&mut self, other: &PageBitmap) {
        for (mine, theirs) in self.words.iter_mut().zip(&other.words) {
            *mine &= !theirs;
        }
    }

    pub fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Maximal runs of set pages as `(first_page, page_count)`, in order.
    pub fn runs(&self) -> Runs<'_> {
        Runs {
            bitmap: self,
            next: 0,
        }
    }

    /// Maximal runs of clear pages as `(first_page, page_count)`, in order.
    pub fn clear_runs(&self) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        let mut position = 0;
        for (start, count) in self.runs() {
            if start > position {
                runs.push((position, start - position));
            }
            position = start + count;
        }
        if position < self.pages {
            runs.push((position, self.pages - position));
        }
        runs
    }

    fn clear_tail(&mut self) {
        let used = self.pages % 64;
        if used != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << used) - 1;
            }
        }
    }

    /// The `pages.bitmap` file image.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.words.len() * 8);
        for word in &self.words {
            body.extend_from_slice(&word.to_le_bytes());
        }
        let mut image = Vec::with_capacity(BITMAP_HEADER_LEN + body.len());
        image.extend_from_slice(&BITMAP_MAGIC);
        image.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        image.extend_from_slice(&0u32.to_le_bytes());
        image.extend_from_slice(&self.pages.to_le_bytes());
        image.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        let header_crc = crc32fast::hash(&image);
        image.extend_from_slice(&header_crc.to_le_bytes());
        image.extend_from_slice(&body);
        image
    }

    /// Parses a `pages.bitmap` image that must describe exactly `expected_pages` pages.
    pub fn decode(bytes: &[u8], expected_pages: u64, path: &Path) -> Result<Self> {
        let invalid = |reason: String| SnapshotError::InvalidBitmap {
            path: path.to_path_buf(),
            reason,
        };
        let (header, body) =
            bytes
                .split_at_checked(BITMAP_HEADER_LEN)
                .ok_or_else(|| SnapshotError::Truncated {
                    path: path.to_path_buf(),
                    expected: BITMAP_HEADER_LEN as u64,
                    actual: bytes.len() as u64,
                })?;
        let (magic, rest) = header.split_at(8);
        if magic != BITMAP_MAGIC {
            let mut found = [0u8; 8];
            found.copy_from_slice(magic);
            return Err(SnapshotError::BadMagic {
                path: path.to_path_buf(),
                what: "page bitmap",
                found,
            });
        }
        let read_u32 = |at: usize| {
            rest.get(at..at + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes)
        };
        let read_u64 = |at: usize| {
            rest.get(at..at + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
        };
        let header_crc = read_u32(20).unwrap_or_default();
        if crc32fast::hash(header.get(..28).unwrap_or_default()) != header_crc {
            return Err(SnapshotError::HeaderChecksum {
                path: path.to_path_buf(),
            });
        }
        let version = read_u32(0).unwrap_or_default();
        crate::state::check_format_version(version, path)?;
        let pages = read_u64(8).unwrap_or_default();
        if pages != expected_pages {
            return Err(invalid(format!(
                "covers {pages} pages, the memory file has {expected_pages}"
            )));
        }
        let expected_body = (words_for(pages) as u64).saturating_mul(8);
        if body.len() as u64 != expected_body {
            return Err(SnapshotError::Truncated {
                path: path.to_path_buf(),
                expected: expected_body.saturating_add(BITMAP_HEADER_LEN as u64),
                actual: bytes.len() as u64,
            });
        }
        let body_crc = read_u32(16).unwrap_or_default();
        if crc32fast::hash(body) != body_crc {
            return Err(SnapshotError::PayloadChecksum {
                path: path.to_path_buf(),
                expected: body_crc,
                actual: crc32fast::hash(body),
            });
        }
        let words: Vec<u64> = body
            .chunks_exact(8)
            .map(|chunk| {
                let mut word = [0u8; 8];
                word.copy_from_slice(chunk);
                u64::from_le_bytes(word)
            })
            .collect();
        let bitmap = Self::from_words(pages, &words);
        if bitmap.words != words {
            return Err(invalid("bits set past the last page".into()));
        }
        Ok(bitmap)
    }
}

/// Optional: the memory-file pages the guest used soon after its last wake (or boot), which a
/// lazy restore fetches first. A hint: a missing or unreadable one only costs speed.
pub const WORKING_SET_FILE: &str = "working-set.bitmap";

pub(crate) fn write_working_set(dir: &Path, bitmap: &PageBitmap, sync: bool) -> Result<()> {
    fsutil::write_file_atomic(&dir.join(WORKING_SET_FILE), &bitmap.encode(), sync)
}

/// Parses a working-set file image (as stored beside a snapshot) for a memory file of
/// `expected_pages` pages.
pub fn decode_working_set(bytes: &[u8], expected_pages: u64) -> Result<PageBitmap> {
    PageBitmap::decode(bytes, expected_pages, Path::new(WORKING_SET_FILE))
}

pub(crate) fn bitmap_path(dir: &Path) -> PathBuf {
    dir.join(BITMAP_FILE)
}

pub(crate) fn write_bitmap(dir: &Path, bitmap: &PageBitmap, sync: bool) -> Result<()> {
    fsutil::write_file_atomic(&bitmap_path(dir), &bitmap.encode(), sync)
}

/// Reads `DIR/pages.bitmap`, which must cover `expected_pages` pages.
pub fn read_bitmap(dir: &Path, expected_pages: u64) -> Result<PageBitmap> {
    let path = bitmap_path(dir);
    let max = (words_for(expected_pages) as u64)
        .saturating_mul(8)
        .saturating_add(BITMAP_HEADER_LEN as u64);
    let bytes = fsutil::read_bounded(&path, max)?;
    PageBitmap::decode(&bytes, expected_pages, &path)
}

/// Iterator over runs of set bits; see [`PageBitmap::runs`].
pub struct Runs<'a> {
    bitmap: &'a PageBitmap,
    next: u64,
}

impl Runs<'_> {
    /// First page at or after `from` whose bit equals `set`, or the page count.
    fn find_bit(&self, from: u64, set: bool) -> u64 {
        let words = &self.bitmap.words;
        let mut index = (from / 64) as usize;
        let flip = if set { 0 } else { u64::MAX };
        let Some(&first) = words.get(index) else {
            return self.bitmap.pages;
        };
        let mut word = (first ^ flip) & (u64::MAX << (from % 64));
        loop {
            if word != 0 {
                let page = index as u64 * 64 + u64::from(word.trailing_zeros());
                return page.min(self.bitmap.pages);
            }
            index += 1;
            match words.get(index) {
                Some(&next) => word = next ^ flip,
                None => return self.bitmap.pages,
            }
        }
    }
}

impl Iterator for Runs<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        if self.next >= self.bitmap.pages {
            return None;
        }
        let start = self.find_bit(self.next, true);
        if start >= self.bitmap.pages {
            self.next = start;
            return None;
        }
        let end = self.find_bit(start, false);
        self.next = end;
        Some((start, end - start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_runs(bitmap: &PageBitmap) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        let mut page = 0;
        while page < bitmap.page_count() {
            if bitmap.get(page) {
                let start = page;
                while page < bitmap.page_count() && bitmap.get(page) {
                    page += 1;
                }
                runs.push((start, page - start));
            } else {
                page += 1;
            }
        }
        runs
    }

    #[test]
    fn runs_match_a_naive_scan() {
        let mut bitmap = PageBitmap::new(300);
        for range in [(0, 1), (2, 3), (63, 2), (100, 90), (299, 1)] {
            bitmap.set_range(range.0, range.1);
        }
        let runs: Vec<_> = bitmap.runs().collect();
        assert_eq!(runs, naive_runs(&bitmap));
        assert_eq!(runs, vec![(0, 1), (2, 3), (63, 2), (100, 90), (299, 1)]);
        assert_eq!(bitmap.count_ones(), 1 + 3 + 2 + 90 + 1);
        let clear = bitmap.clear_runs();
        assert_eq!(clear[0], (1, 1));
        assert_eq!(
            clear.iter().map(|r| r.1).sum::<u64>(),
            300 - bitmap.count_ones()
        );
    }

    #[test]
    fn full_and_tail_bits() {
        let full = PageBitmap::full(70);
        assert_eq!(full.count_ones(), 70);
        assert_eq!(full.runs().collect::<Vec<_>>(), vec![(0, 70)]);
        let from_kvm = PageBitmap::from_words(70, &[0, u64::MAX]);
        assert_eq!(from_kvm.count_ones(), 6);
        assert!(!from_kvm.get(70));
    }

    #[test]
    fn and_not_and_or() {
        let mut a = PageBitmap::new(128);
        a.set_range(0, 100);
        let mut b = PageBitmap::new(128);
        b.set_range(50, 78);
        a.and_not(&b);
        assert_eq!(a.runs().collect::<Vec<_>>(), vec![(0, 50)]);
        a.or_assign(&b);
        assert_eq!(a.runs().collect::<Vec<_>>(), vec![(0, 128)]);
    }

    #[test]
    fn encode_decode_round_trip_and_rejects() {
        let mut bitmap = PageBitmap::new(1000);
        bitmap.set_range(10, 500);
        let image = bitmap.encode();
        let path = Path::new("pages.bitmap");
        assert_eq!(PageBitmap::decode(&image, 1000, path).unwrap(), bitmap);
        assert!(PageBitmap::decode(&image, 999, path).is_err());
        for len in 0..image.len() {
            assert!(PageBitmap::decode(&image[..len], 1000, path).is_err());
        }
        for bit in 0..image.len() * 8 {
            let mut corrupt = image.clone();
            corrupt[bit / 8] ^= 1 << (bit % 8);
            assert!(
                PageBitmap::decode(&corrupt, 1000, path).is_err(),
                "bit {bit}"
            );
        }
    }
}
