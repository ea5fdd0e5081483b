//! Challenge-response authentication with a shared secret: each side proves it knows the secret
//! by signing the other side's fresh nonce with HMAC-SHA256. The secret never crosses the wire.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::types::VolumeId;
use crate::wire::MAC_BYTES;

/// Which side signs (the two directions use different labels, so a MAC cannot be reflected).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signer {
    /// The side that ships writes.
    Source,
    /// The side that applies them.
    Target,
}

fn hmac(
    secret: &[u8],
    signer: Signer,
    challenge: &[u8; MAC_BYTES],
    own: &[u8; MAC_BYTES],
    volume: &VolumeId,
) -> Hmac<Sha256> {
    // HMAC accepts keys of any length.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(match signer {
        Signer::Source => b"ublk-mirror source v1",
        Signer::Target => b"ublk-mirror target v1",
    });
    mac.update(challenge);
    mac.update(own);
    mac.update(&volume.0);
    mac
}

/// The secret a secret file holds: its bytes without surrounding whitespace (so base64, hex or
/// raw bytes all work, and a trailing newline does not count); `None` when nothing is left. Both
/// daemons read their secret file through this one rule.
#[must_use]
pub fn secret_from_file(bytes: &[u8]) -> Option<&[u8]> {
    Some(bytes.trim_ascii()).filter(|s| !s.is_empty())
}

/// The MAC `signer` sends in answer to the peer's `challenge`, binding its own nonce and the volume.
#[must_use]
pub fn sign(
    secret: &[u8],
    signer: Signer,
    challenge: &[u8; MAC_BYTES],
    own: &[u8; MAC_BYTES],
    volume: &VolumeId,
) -> [u8; MAC_BYTES] {
    let mut out = [0u8; MAC_BYTES];
    out.copy_from_slice(
        &hmac(secret, signer, challenge, own, volume)
            .finalize()
            .into_bytes(),
    );
    out
}

/// Checks a MAC in constant time.
#[must_use]
pub fn verify(
    secret: &[u8],
    signer: Signer,
    challenge: &[u8; MAC_BYTES],
    own: &[u8; MAC_BYTES],
    volume: &VolumeId,
    mac: &[u8; MAC_BYTES],
) -> bool {
    hmac(secret, signer, challenge, own, volume)
        .verify_slice(mac)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_bind_secret_role_and_nonces() {
        let v = VolumeId([1; 16]);
        let (a, b) = ([2u8; 32], [3u8; 32]);
        let m = sign(b"secret", Signer::Source, &a, &b, &v);
        assert!(verify(b"secret", Signer::Source, &a, &b, &v, &m));
        assert!(!verify(b"other", Signer::Source, &a, &b, &v, &m));
        assert!(!verify(b"secret", Signer::Target, &a, &b, &v, &m));
        assert!(!verify(b"secret", Signer::Source, &b, &a, &v, &m));
        assert!(!verify(
            b"secret",
            Signer::Source,
            &a,
            &b,
            &VolumeId([9; 16]),
            &m
        ));
    }
}
