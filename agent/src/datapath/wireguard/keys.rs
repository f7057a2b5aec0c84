//! This node's WireGuard key pair: generated on first start, kept in a file of mode 0600 that
//! outlives the agent, replaced whole (write, fsync, rename) when rotated.
use std::{
    fs::{self, OpenOptions},
    io::{self, Read as _, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use crate::model::{format_wireguard_key, parse_wireguard_key};

/// Name of the private key file under the key directory (base64, as `wg genkey` writes it).
pub const PRIVATE_KEY_FILE: &str = "private.key";

/// A key pair: the private key and the public key derived from it.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyPair {
    /// The private key (never logged).
    pub private: [u8; 32],
    /// Its public key.
    pub public: [u8; 32],
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &format_wireguard_key(&self.public))
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    /// The pair of `private` (clamped as X25519 uses it).
    pub fn from_private(private: [u8; 32]) -> Self {
        let secret = x25519_dalek::StaticSecret::from(private);
        let public = x25519_dalek::PublicKey::from(&secret).to_bytes();
        Self {
            private: secret.to_bytes(),
            public,
        }
    }

    /// A new random pair.
    pub fn generate() -> io::Result<Self> {
        let mut b = [0u8; 32];
        fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
        Ok(Self::from_private(b))
    }

    /// The public key as `wg(8)` and the node record write it.
    pub fn public_base64(&self) -> String {
        format_wireguard_key(&self.public)
    }
}

/// The private key file in `dir`.
pub fn key_path(dir: &Path) -> PathBuf {
    dir.join(PRIVATE_KEY_FILE)
}

/// Reads the key pair kept in `dir`, or generates one and keeps it there
/// (the directory is created with mode 0700, the file with 0600). A file
/// that others may read is made 0600 (and said); one that holds no key is
/// an error, never overwritten: it may be an operator's.
pub fn load_or_generate(dir: &Path) -> io::Result<(KeyPair, bool)> {
    let path = key_path(dir);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let private = parse_wireguard_key(text.trim()).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} holds no WireGuard private key (base64 of 32 bytes); remove it to have a new one generated",
                        path.display()
                    ),
                )
            })?;
            let mode = fs::metadata(&path)?.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{:o}", mode & 0o777),
                    "the WireGuard private key was readable by others; set to 0600"
                );
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
            }
            Ok((KeyPair::from_private(private), false))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let pair = KeyPair::generate()?;
            store(dir, &pair)?;
            Ok((pair, true))
        }
        Err(e) => Err(e),
    }
}

/// Writes `pair`'s private key into `dir`, replacing the file whole: a crash
/// leaves the old key or the new one, never a torn file.
pub fn store(dir: &Path, pair: &KeyPair) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    let tmp = dir.join(format!(".{PRIVATE_KEY_FILE}.tmp"));
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(format!("{}\n", format_wireguard_key(&pair.private)).as_bytes())?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, key_path(dir))?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_kept_private_and_reread() {
        let dir = tempfile::tempdir().unwrap();
        let kd = dir.path().join("wg");
        let (a, new) = load_or_generate(&kd).unwrap();
        assert!(new);
        let mode = fs::metadata(key_path(&kd)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (b, new) = load_or_generate(&kd).unwrap();
        assert!(!new);
        assert_eq!(a, b);
        assert_eq!(a.public_base64().len(), 44);
        // Rotation replaces it.
        let c = KeyPair::generate().unwrap();
        store(&kd, &c).unwrap();
        assert_eq!(load_or_generate(&kd).unwrap().0, c);
        assert_ne!(a.public, c.public);
    }

    #[test]
    fn a_file_without_a_key_is_an_error_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(key_path(dir.path()), "not a key\n").unwrap();
        assert!(load_or_generate(dir.path()).is_err());
        assert_eq!(
            fs::read_to_string(key_path(dir.path())).unwrap(),
            "not a key\n"
        );
    }

    #[test]
    fn the_public_key_matches_wg_pubkey() {
        // `echo yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk= | wg pubkey`
        let private = parse_wireguard_key("yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=").unwrap();
        assert_eq!(
            KeyPair::from_private(private).public_base64(),
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
        );
    }
}
