//! API keys: generation (`tg-` + base62 of 32 random bytes), HMAC-SHA256 digests under the server
//! secret, the visible prefix, and loading or creating the server secret.

use std::io::Write;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Every customer and admin key starts with this.
pub const KEY_PREFIX: &str = "tg-";
/// Characters of the random part shown in listings (`tg-` + these).
pub const VISIBLE_CHARS: usize = 8;
/// base62 length of 32 bytes (62^43 > 2^256).
const BODY_LEN: usize = 43;
const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Errors loading the server secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("server secret in ${0} is shorter than 32 bytes")]
    TooShort(String),
    #[error("server secret file {0}: {1}")]
    File(PathBuf, std::io::Error),
    #[error("server secret file {0} is malformed (expected 64 hex characters)")]
    Malformed(PathBuf),
    #[error(
        "no server secret: set ${0} (at least 32 bytes) or configure [auth] secret_file; \
         a PostgreSQL store shared by several tollgate processes needs the same secret in each"
    )]
    Missing(String),
}

/// Base62 encoding of a big-endian byte string, left-padded with '0' to `width`.
pub fn base62(bytes: &[u8], width: usize) -> String {
    let mut digits: Vec<u8> = Vec::with_capacity(width);
    let mut num: Vec<u8> = bytes.to_vec();
    while num.iter().any(|&b| b != 0) {
        let mut rem: u32 = 0;
        for b in num.iter_mut() {
            let acc = (rem << 8) | u32::from(*b);
            *b = (acc / 62) as u8;
            rem = acc % 62;
        }
        digits.push(ALPHABET[rem as usize]);
    }
    while digits.len() < width {
        digits.push(b'0');
    }
    digits.reverse();
    String::from_utf8(digits).unwrap_or_default()
}

/// A new random key: `tg-` + 43 base62 characters encoding 32 bytes from the OS RNG.
pub fn generate_key() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{KEY_PREFIX}{}", base62(&bytes, BODY_LEN))
}

/// The visible prefix of a key (`tg-` + 8 characters), safe to store, list and log.
pub fn visible_prefix(raw: &str) -> Option<String> {
    let body = raw.strip_prefix(KEY_PREFIX)?;
    let head = body.get(..VISIBLE_CHARS)?;
    Some(format!("{KEY_PREFIX}{head}"))
}

/// Cheap shape check before hashing: `tg-` + base62, or an imported key (6-256 printable ASCII
/// characters, e.g. a former static key), bounded length.
pub fn well_formed(raw: &str) -> bool {
    if let Some(b) = raw.strip_prefix(KEY_PREFIX) {
        return raw.len() <= 128
            && b.len() >= VISIBLE_CHARS
            && b.bytes().all(|c| c.is_ascii_alphanumeric());
    }
    importable(raw)
}

/// Whether `raw` may be imported as a key (an existing key brought over, e.g. a static key).
pub fn importable(raw: &str) -> bool {
    (6..=256).contains(&raw.len()) && raw.bytes().all(|c| c.is_ascii_graphic())
}

/// The listing prefix of an imported key: derived from its digest, never from the key itself.
pub fn imported_prefix(digest: &str) -> String {
    format!("imp-{}", digest.get(..12).unwrap_or(digest))
}

/// The server secret keyed into every key digest, held as the HMAC state already keyed with it
/// (each digest then starts from a copy instead of hashing the secret's pads again).
#[derive(Clone)]
pub struct ServerSecret(Hmac<Sha256>);

impl std::fmt::Debug for ServerSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerSecret(***)")
    }
}

impl ServerSecret {
    pub fn from_bytes(b: Vec<u8>) -> ServerSecret {
        ServerSecret::keyed(&b)
    }

    fn keyed(secret: &[u8]) -> ServerSecret {
        // HMAC takes keys of any length, so this cannot fail.
        ServerSecret(Hmac::<Sha256>::new_from_slice(secret).unwrap_or_else(|_| unreachable!()))
    }

    /// Hex HMAC-SHA256 of the raw key under this secret: the only form a key is stored in.
    pub fn digest(&self, raw_key: &str) -> String {
        let mut mac = self.0.clone();
        mac.update(raw_key.as_bytes());
        hex(&mac.finalize().into_bytes())
    }

    /// Loads the secret: the environment variable `env_name` if set, else the file `file`
    /// (created with 32 random bytes, mode 0600, if it does not exist yet).
    pub fn load(env_name: &str, file: Option<&Path>) -> Result<ServerSecret, SecretError> {
        if let Ok(v) = std::env::var(env_name) {
            if v.len() < 32 {
                return Err(SecretError::TooShort(env_name.to_string()));
            }
            return Ok(ServerSecret::keyed(v.as_bytes()));
        }
        let Some(path) = file else {
            return Err(SecretError::Missing(env_name.to_string()));
        };
        match std::fs::read_to_string(path) {
            Ok(s) => {
                let b =
                    unhex(s.trim()).ok_or_else(|| SecretError::Malformed(path.to_path_buf()))?;
                if b.len() < 32 {
                    return Err(SecretError::Malformed(path.to_path_buf()));
                }
                Ok(ServerSecret::keyed(&b))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_secret_file(path),
            Err(e) => Err(SecretError::File(path.to_path_buf(), e)),
        }
    }
}

fn create_secret_file(path: &Path) -> Result<ServerSecret, SecretError> {
    let mut bytes = vec![0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    match opts.open(path) {
        Ok(mut f) => {
            f.write_all(hex(&bytes).as_bytes())
                .and_then(|_| f.write_all(b"\n"))
                .and_then(|_| f.sync_all())
                .map_err(|e| SecretError::File(path.to_path_buf(), e))?;
            tracing::info!(path = %path.display(), "created a new server secret file (mode 0600)");
            Ok(ServerSecret::keyed(&bytes))
        }
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let s = std::fs::read_to_string(path)
                .map_err(|e| SecretError::File(path.to_path_buf(), e))?;
            unhex(s.trim())
                .filter(|b| b.len() >= 32)
                .map(|b| ServerSecret::keyed(&b))
                .ok_or_else(|| SecretError::Malformed(path.to_path_buf()))
        }
        Err(e) => Err(SecretError::File(path.to_path_buf(), e)),
    }
}

/// Constant-time equality of two digests.
pub fn digests_equal(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

pub fn hex(b: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(H[(x >> 4) as usize] as char);
        s.push(H[(x & 15) as usize] as char);
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_shape() {
        let k = generate_key();
        assert!(k.starts_with("tg-"));
        assert_eq!(k.len(), 3 + 43);
        assert!(well_formed(&k));
        assert_ne!(generate_key(), k);
        let p = visible_prefix(&k).unwrap_or_default();
        assert_eq!(p.len(), 11);
        assert!(k.starts_with(&p));
        assert!(!well_formed("sk-ab"));
        assert!(!well_formed("tg-abc"));
        assert!(!well_formed("tg-abcdefgh'; DROP TABLE"));
        assert!(well_formed("sk-imported-key"), "imported keys are accepted");
        assert!(!well_formed("has a space"));
        assert!(!well_formed(&"x".repeat(300)));
    }

    #[test]
    fn base62_known_values() {
        assert_eq!(base62(&[0], 1), "0");
        assert_eq!(base62(&[61], 1), "z");
        assert_eq!(base62(&[62], 1), "10");
        assert_eq!(base62(&[0xff; 32], 43).len(), 43);
    }

    /// RFC 4231 test case 2: stored digests of existing keys must not change.
    #[test]
    fn digest_is_standard_hmac_sha256() {
        let s = ServerSecret::from_bytes(b"Jefe".to_vec());
        let want = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
        assert_eq!(s.digest("what do ya want for nothing?"), want);
        assert_eq!(
            s.digest("what do ya want for nothing?"),
            want,
            "the keyed state is reused, not consumed"
        );
    }

    #[test]
    fn digest_is_keyed() {
        let a = ServerSecret::from_bytes(vec![1; 32]);
        let b = ServerSecret::from_bytes(vec![2; 32]);
        let k = generate_key();
        assert_eq!(a.digest(&k), a.digest(&k));
        assert_ne!(a.digest(&k), b.digest(&k));
        assert_eq!(a.digest(&k).len(), 64);
        assert!(!a.digest(&k).contains(&k[3..]));
        assert!(digests_equal(&a.digest(&k), &a.digest(&k)));
        assert!(!digests_equal(&a.digest(&k), &b.digest(&k)));
    }

    #[test]
    fn secret_file_created_0600_and_reused() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("x.secret");
        let env = "TOLLGATE_TEST_SECRET_THAT_IS_NOT_SET";
        let s1 = ServerSecret::load(env, Some(&path)).unwrap_or_else(|e| panic!("{e}"));
        let s2 = ServerSecret::load(env, Some(&path)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s1.digest("tg-x"), s2.digest("tg-x"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path)
                .map(|m| m.permissions().mode() & 0o777)
                .unwrap_or(0);
            assert_eq!(mode, 0o600);
        }
        assert!(ServerSecret::load(env, None).is_err());
    }
}
