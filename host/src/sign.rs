//! Signatures, computed for each attempt right before sending: the body is
//! byte-identical across attempts, the Standard Webhooks timestamp is fresh.
//! Pure: the caller passes the time.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::rules::{SignatureStyle, Webhook, check_whsec};

/// The Standard Webhooks headers: the message id (the delivery id), the
/// Unix time signed, and the signatures.
pub const WEBHOOK_ID: &str = "webhook-id";
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// `sha256=<hex HMAC-SHA256(secret, body)>`, as GitHub-style receivers verify.
pub fn hmac_sha256_header(secret: &str, body: &[u8]) -> String {
    format!("sha256={}", hex(&hmac(secret.as_bytes(), &[body])))
}

/// `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>` for one
/// `whsec_` secret, per the Standard Webhooks specification.
pub fn standard_signature(
    whsec: &str,
    msg_id: &str,
    timestamp: u64,
    body: &[u8],
) -> Result<String, String> {
    let key = check_whsec(whsec)?;
    let ts = timestamp.to_string();
    let mac = hmac(&key, &[msg_id.as_bytes(), b".", ts.as_bytes(), b".", body]);
    Ok(format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac)
    ))
}

/// The signature headers of one attempt. During a rotation (several
/// secrets) the HMAC header is signed with the first secret, as GitHub-style
/// receivers check one value; Standard Webhooks lists one signature per
/// secret, space-separated, so receivers on either secret verify.
pub fn headers<'w>(
    webhook: &'w Webhook,
    delivery_id: &str,
    now_secs: u64,
    body: &[u8],
) -> Vec<(&'w str, String)> {
    let mut out = Vec::new();
    for style in &webhook.signature {
        match style {
            SignatureStyle::HmacSha256 => {
                if let Some(secret) = webhook.secrets.first() {
                    out.push((
                        webhook.signature_header.as_str(),
                        hmac_sha256_header(&secret.value, body),
                    ));
                }
            }
            SignatureStyle::StandardWebhooks => {
                let sigs: Vec<String> = webhook
                    .secrets
                    .iter()
                    .filter_map(|s| standard_signature(&s.value, delivery_id, now_secs, body).ok())
                    .collect();
                out.push((WEBHOOK_ID, delivery_id.to_string()));
                out.push((WEBHOOK_TIMESTAMP, now_secs.to_string()));
                out.push((WEBHOOK_SIGNATURE, sigs.join(" ")));
            }
        }
    }
    out
}

/// Checks `sha256=<hex>` against the body in constant time (for `listen`).
pub fn verify_hmac_sha256(secret: &str, body: &[u8], header: &str) -> bool {
    let Some(hex_sig) = header.strip_prefix("sha256=") else {
        return false;
    };
    let mut mac =
        HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC accepts any key length");
    mac.update(body);
    match decode_hex(hex_sig) {
        Some(sig) => mac.verify_slice(&sig).is_ok(),
        None => false,
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Constant-time equality for secrets such as API keys.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_a_known_vector() {
        // RFC 4231 test case 2.
        let mac = hmac(b"Jefe", &[b"what do ya want for nothing?"]);
        assert_eq!(
            hex(&mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let header = hmac_sha256_header("Jefe", b"what do ya want for nothing?");
        assert!(verify_hmac_sha256(
            "Jefe",
            b"what do ya want for nothing?",
            &header
        ));
        assert!(!verify_hmac_sha256("Jefe", b"tampered", &header));
        assert!(!verify_hmac_sha256(
            "other",
            b"what do ya want for nothing?",
            &header
        ));
    }

    #[test]
    fn standard_webhooks_signature_matches_the_spec_example() {
        // The example of the Standard Webhooks specification (and its
        // reference libraries' tests).
        let sig = standard_signature(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        )
        .unwrap();
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn constant_time_eq_compares_whole_values() {
        assert!(constant_time_eq(b"key-1", b"key-1"));
        assert!(!constant_time_eq(b"key-1", b"key-2"));
        assert!(!constant_time_eq(b"key", b"key-1"));
    }
}
