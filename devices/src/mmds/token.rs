//! MMDS V2 session tokens: random, kept in a bounded table for one VM (so a token of another VM,
//! or of this VM before a restore, is unknown), valid until their TTL ends.
//!
//! Firecracker encrypts the expiry into the token instead of keeping a table; a table needs no
//! cipher, and its bound means a guest minting tokens without end evicts its own oldest ones.

use std::time::{Duration, Instant};

pub const MIN_TTL_SECONDS: u32 = 1;
pub const MAX_TTL_SECONDS: u32 = 21600;
/// Live tokens kept; past this the one expiring first is evicted.
pub const MAX_TOKENS: usize = 256;
const TOKEN_BYTES: usize = 32;
/// Base64 of 32 bytes (no padding needed: 32 * 4 / 3 rounded up is 43, plus one `=`).
const TOKEN_TEXT_LEN: usize = 44;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error(
        "Invalid time to live value provided for token: {0}. Please provide a value between \
         {MIN_TTL_SECONDS} and {MAX_TTL_SECONDS}."
    )]
    InvalidTtl(u32),
    #[error("Failed to generate a token: {0}")]
    Random(String),
}

#[derive(Debug, Default)]
pub struct TokenTable {
    tokens: Vec<([u8; TOKEN_BYTES], Instant)>,
}

fn random_bytes() -> Result<[u8; TOKEN_BYTES], TokenError> {
    let mut bytes = [0u8; TOKEN_BYTES];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into `bytes`, valid for writes.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if usize::try_from(n).ok() != Some(bytes.len()) {
        return Err(TokenError::Random(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    Ok(bytes)
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn encode(bytes: &[u8; TOKEN_BYTES]) -> String {
    let mut out = String::with_capacity(TOKEN_TEXT_LEN);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                let index = ((n >> (18 - 6 * i)) & 63) as usize;
                out.push(char::from(ALPHABET.get(index).copied().unwrap_or(b'A')));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Compares without an early exit, so the time taken says nothing about a guess's prefix.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl TokenTable {
    /// A new token valid for `ttl_seconds` from `now`.
    pub fn generate(&mut self, ttl_seconds: u32, now: Instant) -> Result<String, TokenError> {
        if !(MIN_TTL_SECONDS..=MAX_TTL_SECONDS).contains(&ttl_seconds) {
            return Err(TokenError::InvalidTtl(ttl_seconds));
        }
        let bytes = random_bytes()?;
        self.tokens.retain(|(_, expiry)| *expiry > now);
        if self.tokens.len() >= MAX_TOKENS {
            if let Some(first) = self
                .tokens
                .iter()
                .enumerate()
                .min_by_key(|(_, (_, expiry))| *expiry)
                .map(|(i, _)| i)
            {
                self.tokens.swap_remove(first);
            }
        }
        let expiry = now + Duration::from_secs(u64::from(ttl_seconds));
        self.tokens.push((bytes, expiry));
        Ok(encode(&bytes))
    }

    /// Whether `token` was generated here and has not expired at `now`.
    pub fn is_valid(&self, token: &str, now: Instant) -> bool {
        if token.len() != TOKEN_TEXT_LEN {
            return false;
        }
        self.tokens.iter().any(|(bytes, expiry)| {
            *expiry > now && same(encode(bytes).as_bytes(), token.as_bytes())
        })
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_valid_until_their_ttl_and_unique() {
        let mut table = TokenTable::default();
        let now = Instant::now();
        let a = table.generate(10, now).unwrap();
        let b = table.generate(10, now).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), TOKEN_TEXT_LEN);
        assert!(table.is_valid(&a, now + Duration::from_secs(9)));
        assert!(!table.is_valid(&a, now + Duration::from_secs(10)));
        assert!(!table.is_valid("nope", now));
        assert!(
            !TokenTable::default().is_valid(&a, now),
            "another VM's table"
        );
    }

    #[test]
    fn ttl_out_of_range_is_refused() {
        let mut table = TokenTable::default();
        let now = Instant::now();
        assert_eq!(table.generate(0, now), Err(TokenError::InvalidTtl(0)));
        assert_eq!(
            table.generate(21601, now),
            Err(TokenError::InvalidTtl(21601))
        );
        assert!(table.generate(21600, now).is_ok());
    }

    #[test]
    fn the_table_stays_bounded() {
        let mut table = TokenTable::default();
        let now = Instant::now();
        let first = table.generate(1, now).unwrap();
        for _ in 0..MAX_TOKENS + 10 {
            table.generate(100, now).unwrap();
        }
        assert_eq!(table.len(), MAX_TOKENS);
        assert!(
            !table.is_valid(&first, now),
            "the first to expire went first"
        );
    }

    #[test]
    fn base64_matches_a_known_vector() {
        let mut bytes = [0u8; TOKEN_BYTES];
        bytes[..3].copy_from_slice(b"Man");
        assert!(encode(&bytes).starts_with("TWFu"));
        assert!(encode(&bytes).ends_with('='));
    }
}
