//! Reading the few fields of an X.509 certificate pgsilo needs: the tls-server-end-point
//! channel binding data (RFC 5929) and the subject's common name.
//!
//! Certificates come off the network, so this is a small DER walker that cannot panic:
//! every length is checked against the bytes that remain, nesting is fixed (no recursion),
//! and anything unexpected gives `None`. It reads only the outer structure of the
//! certificate; it verifies nothing (rustls does that).

use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};

const INTEGER: u8 = 0x02;
const BIT_STRING: u8 = 0x03;
const OID: u8 = 0x06;
const UTF8_STRING: u8 = 0x0c;
const PRINTABLE_STRING: u8 = 0x13;
const T61_STRING: u8 = 0x14;
const IA5_STRING: u8 = 0x16;
const VISIBLE_STRING: u8 = 0x1a;
const UNIVERSAL_STRING: u8 = 0x1c;
const BMP_STRING: u8 = 0x1e;
const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
/// `[0]` constructed, context-specific: TBSCertificate's version, RSASSA-PSS-params' hashAlgorithm.
const EXPLICIT_0: u8 = 0xa0;

/// Signature algorithms (contents of the OBJECT IDENTIFIER, without tag and length).
const MD5_WITH_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x04]; // 1.2.840.113549.1.1.4
const SHA1_WITH_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x05]; // 1.2.840.113549.1.1.5
const RSASSA_PSS: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a]; // 1.2.840.113549.1.1.10
const SHA256_WITH_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b]; // 1.2.840.113549.1.1.11
const SHA384_WITH_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c]; // 1.2.840.113549.1.1.12
const SHA512_WITH_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d]; // 1.2.840.113549.1.1.13
const SHA224_WITH_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0e]; // 1.2.840.113549.1.1.14
const SHA1_WITH_RSA_OIW: &[u8] = &[0x2b, 0x0e, 0x03, 0x02, 0x1d]; // 1.3.14.3.2.29
const ECDSA_WITH_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01]; // 1.2.840.10045.4.1
const ECDSA_WITH_SHA224: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x01]; // 1.2.840.10045.4.3.1
const ECDSA_WITH_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02]; // 1.2.840.10045.4.3.2
const ECDSA_WITH_SHA384: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03]; // 1.2.840.10045.4.3.3
const ECDSA_WITH_SHA512: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04]; // 1.2.840.10045.4.3.4
const DSA_WITH_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x38, 0x04, 0x03]; // 1.2.840.10040.4.3
const DSA_WITH_SHA224: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x03, 0x01]; // 2.16.840.1.101.3.4.3.1
const DSA_WITH_SHA256: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x03, 0x02]; // 2.16.840.1.101.3.4.3.2

/// Hash algorithms, as RSASSA-PSS-params name them.
const SHA1: &[u8] = &[0x2b, 0x0e, 0x03, 0x02, 0x1a]; // 1.3.14.3.2.26
const SHA256: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01]; // 2.16.840.1.101.3.4.2.1
const SHA384: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02]; // 2.16.840.1.101.3.4.2.2
const SHA512: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03]; // 2.16.840.1.101.3.4.2.3
const SHA224: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x04]; // 2.16.840.1.101.3.4.2.4

/// id-at-commonName, 2.5.4.3.
const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];

/// The most length octets a long-form length may have: 4 covers 4 GiB, far beyond any
/// certificate, and keeps the arithmetic inside u64.
const MAX_LENGTH_OCTETS: usize = 4;

/// The most continuation octets of a high tag number (tag numbers above 30, which no
/// field read here uses; they are parsed only to be skipped).
const MAX_TAG_OCTETS: usize = 4;

/// The channel binding data of type tls-server-end-point (RFC 5929 section 4.1): the hash
/// of the whole DER certificate, with the hash function of the certificate's
/// signatureAlgorithm, except that MD5 and SHA-1 are replaced by SHA-256.
///
/// None when the input is not a certificate, or when its signature algorithm has no
/// single hash function (Ed25519, Ed448) or one not handled here: PostgreSQL then refuses
/// channel binding too.
pub fn server_end_point_hash(cert_der: &[u8]) -> Option<Vec<u8>> {
    let cert = Certificate::parse(cert_der)?;
    let hash = signature_hash(cert.signature_algorithm)?;
    Some(hash.digest(cert_der))
}

/// The subject's first common name (2.5.4.3), as PostgreSQL reads it with
/// X509_NAME_get_text_by_NID. UTF8String, PrintableString, IA5String, VisibleString,
/// BMPString and UniversalString are decoded; T61String is read as Latin-1 (best effort).
///
/// None when the input is not a certificate, the subject has no common name, or the first
/// one cannot be decoded or contains a NUL (PostgreSQL refuses embedded NULs too, so that
/// "admin\0.evil" cannot pass for "admin").
pub fn subject_common_name(cert_der: &[u8]) -> Option<String> {
    let cert = Certificate::parse(cert_der)?;
    let mut tbs = Reader::new(cert.tbs);
    if tbs.peek_tag() == Some(EXPLICIT_0) {
        tbs.read()?; // version
    }
    tbs.expect(INTEGER)?; // serialNumber
    tbs.expect(SEQUENCE)?; // signature
    tbs.expect(SEQUENCE)?; // issuer
    tbs.expect(SEQUENCE)?; // validity
    let subject = tbs.expect(SEQUENCE)?;

    // Name ::= SEQUENCE OF RelativeDistinguishedName (SET OF AttributeTypeAndValue).
    let mut rdns = Reader::new(subject);
    while !rdns.is_empty() {
        let mut attributes = Reader::new(rdns.expect(SET)?);
        while !attributes.is_empty() {
            let mut attribute = Reader::new(attributes.expect(SEQUENCE)?);
            if attribute.expect(OID)? == COMMON_NAME {
                return decode_directory_string(attribute.read()?);
            }
        }
    }
    None
}

/// The two parts of a certificate read here.
struct Certificate<'a> {
    /// Contents of the TBSCertificate SEQUENCE.
    tbs: &'a [u8],
    /// Contents of the outer signatureAlgorithm AlgorithmIdentifier.
    signature_algorithm: &'a [u8],
}

impl<'a> Certificate<'a> {
    /// `Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }`,
    /// with nothing after it: the channel binding hash covers exactly these bytes.
    fn parse(der: &'a [u8]) -> Option<Certificate<'a>> {
        let mut outer = Reader::new(der);
        let cert = outer.expect(SEQUENCE)?;
        if !outer.is_empty() {
            return None;
        }
        let mut cert = Reader::new(cert);
        let tbs = cert.expect(SEQUENCE)?;
        let signature_algorithm = cert.expect(SEQUENCE)?;
        cert.expect(BIT_STRING)?;
        if !cert.is_empty() {
            return None;
        }
        Some(Certificate {
            tbs,
            signature_algorithm,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hash {
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl Hash {
    fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            Hash::Sha224 => Sha224::digest(data).to_vec(),
            Hash::Sha256 => Sha256::digest(data).to_vec(),
            Hash::Sha384 => Sha384::digest(data).to_vec(),
            Hash::Sha512 => Sha512::digest(data).to_vec(),
        }
    }
}

/// The hash RFC 5929 prescribes for a signature AlgorithmIdentifier's contents.
fn signature_hash(algorithm: &[u8]) -> Option<Hash> {
    let mut algorithm = Reader::new(algorithm);
    let oid = algorithm.expect(OID)?;
    match oid {
        MD5_WITH_RSA | SHA1_WITH_RSA | SHA1_WITH_RSA_OIW | ECDSA_WITH_SHA1 | DSA_WITH_SHA1 => Some(Hash::Sha256),
        SHA224_WITH_RSA | ECDSA_WITH_SHA224 | DSA_WITH_SHA224 => Some(Hash::Sha224),
        SHA256_WITH_RSA | ECDSA_WITH_SHA256 | DSA_WITH_SHA256 => Some(Hash::Sha256),
        SHA384_WITH_RSA | ECDSA_WITH_SHA384 => Some(Hash::Sha384),
        SHA512_WITH_RSA | ECDSA_WITH_SHA512 => Some(Hash::Sha512),
        RSASSA_PSS => pss_hash(&mut algorithm),
        _ => None,
    }
}

/// The hash of RSASSA-PSS-params (RFC 4055): `SEQUENCE { hashAlgorithm [0] EXPLICIT
/// AlgorithmIdentifier DEFAULT sha1, ... }`. Absent parameters or an absent hashAlgorithm
/// mean SHA-1, which RFC 5929 replaces by SHA-256.
fn pss_hash(algorithm: &mut Reader<'_>) -> Option<Hash> {
    if algorithm.is_empty() {
        return Some(Hash::Sha256);
    }
    let mut params = Reader::new(algorithm.expect(SEQUENCE)?);
    if params.peek_tag() != Some(EXPLICIT_0) {
        return Some(Hash::Sha256);
    }
    let mut explicit = Reader::new(params.expect(EXPLICIT_0)?);
    let mut hash_algorithm = Reader::new(explicit.expect(SEQUENCE)?);
    match hash_algorithm.expect(OID)? {
        SHA1 | SHA256 => Some(Hash::Sha256),
        SHA224 => Some(Hash::Sha224),
        SHA384 => Some(Hash::Sha384),
        SHA512 => Some(Hash::Sha512),
        _ => None,
    }
}

/// A directory string's text; see `subject_common_name`.
fn decode_directory_string(value: Element<'_>) -> Option<String> {
    let text = match value.tag {
        UTF8_STRING => std::str::from_utf8(value.contents).ok()?.to_owned(),
        PRINTABLE_STRING | IA5_STRING | VISIBLE_STRING => {
            if !value.contents.is_ascii() {
                return None;
            }
            value.contents.iter().copied().map(char::from).collect()
        }
        // T.61 is a stateful teletex code; its common printable subset matches Latin-1,
        // which is what certificates that use it in practice contain.
        T61_STRING => value.contents.iter().copied().map(char::from).collect(),
        BMP_STRING => {
            let units = value.contents.chunks_exact(2);
            if !units.remainder().is_empty() {
                return None;
            }
            char::decode_utf16(units.map(|u| u16::from_be_bytes([u[0], u[1]])))
                .collect::<Result<String, _>>()
                .ok()?
        }
        UNIVERSAL_STRING => {
            let units = value.contents.chunks_exact(4);
            if !units.remainder().is_empty() {
                return None;
            }
            units
                .map(|u| char::from_u32(u32::from_be_bytes([u[0], u[1], u[2], u[3]])))
                .collect::<Option<String>>()?
        }
        _ => return None,
    };
    if text.contains('\0') {
        return None;
    }
    Some(text)
}

/// One DER element. `tag` is the first identifier octet; a high tag number (low five bits
/// all set) keeps that octet, which matches none of the tags looked for here.
struct Element<'a> {
    tag: u8,
    contents: &'a [u8],
}

/// Reads consecutive DER elements from a slice.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn peek_tag(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    /// The next element, or None if the bytes do not hold a whole one.
    fn read(&mut self) -> Option<Element<'a>> {
        let (&tag, mut rest) = self.rest.split_first()?;
        if tag & 0x1f == 0x1f {
            let mut octets = 0;
            loop {
                let (&octet, tail) = rest.split_first()?;
                rest = tail;
                octets += 1;
                if octets > MAX_TAG_OCTETS {
                    return None;
                }
                if octet & 0x80 == 0 {
                    break;
                }
            }
        }
        let (&first, tail) = rest.split_first()?;
        rest = tail;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            // 0x80 alone is BER's indefinite length, which DER forbids.
            let count = usize::from(first & 0x7f);
            if count == 0 || count > MAX_LENGTH_OCTETS {
                return None;
            }
            let (octets, tail) = rest.split_at_checked(count)?;
            rest = tail;
            let len = octets.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
            usize::try_from(len).ok()?
        };
        let (contents, tail) = rest.split_at_checked(len)?;
        self.rest = tail;
        Some(Element { tag, contents })
    }

    /// The contents of the next element, which must have tag `tag`.
    fn expect(&mut self, tag: u8) -> Option<&'a [u8]> {
        let element = self.read()?;
        (element.tag == tag).then_some(element.contents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BmpString, CertificateParams, DnType, DnValue, Ia5String, KeyPair, PrintableString, SignatureAlgorithm,
        TeletexString, UniversalString, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519,
    };

    fn cert_with_cn(alg: &'static SignatureAlgorithm, cn: impl Into<DnValue>) -> Vec<u8> {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.distinguished_name.push(DnType::OrganizationName, "pgsilo tests");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn cert(alg: &'static SignatureAlgorithm) -> Vec<u8> {
        cert_with_cn(alg, "db.example.com")
    }

    /// A DER element, encoded independently of the reader under test.
    fn tlv(tag: u8, contents: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = contents.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes: Vec<u8> = len.to_be_bytes().into_iter().skip_while(|&b| b == 0).collect();
            out.push(0x80 | bytes.len() as u8);
            out.extend(bytes);
        }
        out.extend_from_slice(contents);
        out
    }

    /// An OBJECT IDENTIFIER from its dotted form (so the tests do not share the module's
    /// byte constants).
    fn oid(dotted: &str) -> Vec<u8> {
        let arcs: Vec<u64> = dotted.split('.').map(|a| a.parse().unwrap()).collect();
        let mut body = Vec::new();
        let mut encode = |mut arc: u64| {
            let mut groups = vec![(arc & 0x7f) as u8];
            arc >>= 7;
            while arc > 0 {
                groups.push(0x80 | (arc & 0x7f) as u8);
                arc >>= 7;
            }
            body.extend(groups.into_iter().rev());
        };
        encode(arcs[0] * 40 + arcs[1]);
        arcs[2..].iter().for_each(|&a| encode(a));
        tlv(OID, &body)
    }

    fn seq(parts: &[&[u8]]) -> Vec<u8> {
        tlv(SEQUENCE, &parts.concat())
    }

    /// A real certificate's body re-wrapped with another outer signatureAlgorithm; only
    /// that algorithm matters to the channel binding hash.
    fn with_outer_algorithm(der: &[u8], algorithm: &[u8]) -> Vec<u8> {
        let mut outer = Reader::new(der);
        let mut cert = Reader::new(outer.expect(SEQUENCE).unwrap());
        let tbs = cert.expect(SEQUENCE).unwrap();
        seq(&[&tlv(SEQUENCE, tbs), algorithm, &tlv(BIT_STRING, &[0, 1, 2, 3])])
    }

    /// A certificate with the given subject Name contents (the fields the reader skips
    /// are minimal but well-formed).
    fn cert_with_subject(subject: &[u8]) -> Vec<u8> {
        let algorithm = seq(&[&oid("1.2.840.10045.4.3.2")]);
        let name = |text: &str| {
            tlv(
                SEQUENCE,
                &tlv(SET, &seq(&[&oid("2.5.4.10"), &tlv(UTF8_STRING, text.as_bytes())])),
            )
        };
        let tbs = seq(&[
            &tlv(EXPLICIT_0, &tlv(INTEGER, &[2])),
            &tlv(INTEGER, &[1]),
            &algorithm,
            &name("issuer"),
            &seq(&[]),
            &tlv(SEQUENCE, subject),
            &seq(&[]),
        ]);
        seq(&[&tbs, &algorithm, &tlv(BIT_STRING, &[0])])
    }

    fn cn(value: &[u8]) -> Vec<u8> {
        tlv(SET, &seq(&[&oid("2.5.4.3"), value]))
    }

    #[test]
    fn end_point_hash_follows_the_certificate_signature_hash() {
        let p256 = cert(&PKCS_ECDSA_P256_SHA256);
        assert_eq!(server_end_point_hash(&p256).unwrap(), Sha256::digest(&p256).to_vec());
        let p384 = cert(&PKCS_ECDSA_P384_SHA384);
        assert_eq!(server_end_point_hash(&p384).unwrap(), Sha384::digest(&p384).to_vec());
    }

    #[test]
    fn ed25519_has_no_end_point_hash() {
        assert_eq!(server_end_point_hash(&cert(&PKCS_ED25519)), None);
    }

    // rcgen cannot generate RSA keys with ring, so RSA, PSS, MD5 and SHA-1 certificates
    // are a real certificate's body with the outer algorithm replaced.
    #[test]
    fn end_point_hash_per_algorithm_identifier() {
        let base = cert(&PKCS_ECDSA_P256_SHA256);
        let null = tlv(0x05, &[]);
        let pss = |hash: Option<&str>| {
            let params = match hash {
                Some(h) => seq(&[
                    &tlv(EXPLICIT_0, &seq(&[&oid(h), &null])),
                    &tlv(0xa2, &tlv(INTEGER, &[32])),
                ]),
                None => seq(&[]),
            };
            seq(&[&oid("1.2.840.113549.1.1.10"), &params])
        };
        let cases: Vec<(&str, Vec<u8>, Option<Hash>)> = vec![
            (
                "md5WithRSAEncryption",
                seq(&[&oid("1.2.840.113549.1.1.4"), &null]),
                Some(Hash::Sha256),
            ),
            (
                "sha1WithRSAEncryption",
                seq(&[&oid("1.2.840.113549.1.1.5"), &null]),
                Some(Hash::Sha256),
            ),
            ("sha1WithRSA (OIW)", seq(&[&oid("1.3.14.3.2.29")]), Some(Hash::Sha256)),
            (
                "sha224WithRSAEncryption",
                seq(&[&oid("1.2.840.113549.1.1.14"), &null]),
                Some(Hash::Sha224),
            ),
            (
                "sha256WithRSAEncryption",
                seq(&[&oid("1.2.840.113549.1.1.11"), &null]),
                Some(Hash::Sha256),
            ),
            (
                "sha384WithRSAEncryption",
                seq(&[&oid("1.2.840.113549.1.1.12"), &null]),
                Some(Hash::Sha384),
            ),
            (
                "sha512WithRSAEncryption",
                seq(&[&oid("1.2.840.113549.1.1.13"), &null]),
                Some(Hash::Sha512),
            ),
            ("ecdsa-with-SHA1", seq(&[&oid("1.2.840.10045.4.1")]), Some(Hash::Sha256)),
            (
                "ecdsa-with-SHA224",
                seq(&[&oid("1.2.840.10045.4.3.1")]),
                Some(Hash::Sha224),
            ),
            (
                "ecdsa-with-SHA512",
                seq(&[&oid("1.2.840.10045.4.3.4")]),
                Some(Hash::Sha512),
            ),
            ("dsa-with-sha1", seq(&[&oid("1.2.840.10040.4.3")]), Some(Hash::Sha256)),
            (
                "dsa-with-sha256",
                seq(&[&oid("2.16.840.1.101.3.4.3.2")]),
                Some(Hash::Sha256),
            ),
            ("PSS, SHA-256", pss(Some("2.16.840.1.101.3.4.2.1")), Some(Hash::Sha256)),
            ("PSS, SHA-384", pss(Some("2.16.840.1.101.3.4.2.2")), Some(Hash::Sha384)),
            ("PSS, SHA-512", pss(Some("2.16.840.1.101.3.4.2.3")), Some(Hash::Sha512)),
            ("PSS, SHA-1", pss(Some("1.3.14.3.2.26")), Some(Hash::Sha256)),
            ("PSS, default hash", pss(None), Some(Hash::Sha256)),
            (
                "PSS, no parameters",
                seq(&[&oid("1.2.840.113549.1.1.10")]),
                Some(Hash::Sha256),
            ),
            ("PSS, SHA3-256", pss(Some("2.16.840.1.101.3.4.2.8")), None),
            (
                "PSS, parameters not a SEQUENCE",
                seq(&[&oid("1.2.840.113549.1.1.10"), &null]),
                None,
            ),
            ("Ed25519", seq(&[&oid("1.3.101.112")]), None),
            ("Ed448", seq(&[&oid("1.3.101.113")]), None),
            (
                "md2WithRSAEncryption",
                seq(&[&oid("1.2.840.113549.1.1.2"), &null]),
                None,
            ),
            ("no OID", seq(&[&null]), None),
        ];
        for (name, algorithm, expected) in cases {
            let der = with_outer_algorithm(&base, &algorithm);
            assert_eq!(server_end_point_hash(&der), expected.map(|h| h.digest(&der)), "{name}");
        }
    }

    #[test]
    fn common_name_of_a_generated_certificate() {
        let p256 = cert(&PKCS_ECDSA_P256_SHA256);
        assert_eq!(subject_common_name(&p256).as_deref(), Some("db.example.com"));
        let strings: Vec<(DnValue, &str)> = vec![
            (DnValue::Utf8String("Zoë ☃".into()), "Zoë ☃"),
            (
                DnValue::PrintableString(PrintableString::try_from("Print able").unwrap()),
                "Print able",
            ),
            (DnValue::Ia5String(Ia5String::try_from("ia5@x").unwrap()), "ia5@x"),
            (
                DnValue::TeletexString(TeletexString::try_from("teletex").unwrap()),
                "teletex",
            ),
            (DnValue::BmpString(BmpString::try_from("bmp ☃").unwrap()), "bmp ☃"),
            (
                DnValue::UniversalString(UniversalString::try_from("univ 🐘").unwrap()),
                "univ 🐘",
            ),
        ];
        for (value, expected) in strings {
            let der = cert_with_cn(&PKCS_ECDSA_P256_SHA256, value);
            assert_eq!(subject_common_name(&der).as_deref(), Some(expected));
        }
    }

    #[test]
    fn common_name_is_the_first_of_several() {
        let ou = tlv(SET, &seq(&[&oid("2.5.4.11"), &tlv(UTF8_STRING, b"unit")]));
        let subject = [
            ou,
            cn(&tlv(UTF8_STRING, b"first")),
            cn(&tlv(PRINTABLE_STRING, b"second")),
        ]
        .concat();
        assert_eq!(
            subject_common_name(&cert_with_subject(&subject)).as_deref(),
            Some("first")
        );

        // A multi-valued RDN is read in order too.
        let multi = tlv(
            SET,
            &[
                seq(&[&oid("2.5.4.10"), &tlv(UTF8_STRING, b"org")]),
                seq(&[&oid("2.5.4.3"), &tlv(UTF8_STRING, b"inside")]),
            ]
            .concat(),
        );
        assert_eq!(
            subject_common_name(&cert_with_subject(&multi)).as_deref(),
            Some("inside")
        );
        // The T61String byte 0xe9 is read as Latin-1 é.
        let latin = cn(&tlv(T61_STRING, b"caf\xe9"));
        assert_eq!(subject_common_name(&cert_with_subject(&latin)).as_deref(), Some("café"));
    }

    #[test]
    fn common_name_absent_or_unusable() {
        let cases: &[(&str, Vec<u8>)] = &[
            ("empty subject", vec![]),
            ("no CN", tlv(SET, &seq(&[&oid("2.5.4.10"), &tlv(UTF8_STRING, b"org")]))),
            ("embedded NUL", cn(&tlv(UTF8_STRING, b"admin\0.evil"))),
            ("invalid UTF-8", cn(&tlv(UTF8_STRING, b"\xff\xfe"))),
            ("non-ASCII PrintableString", cn(&tlv(PRINTABLE_STRING, b"caf\xe9"))),
            ("odd BMPString", cn(&tlv(BMP_STRING, b"\x00a\x00"))),
            ("lone surrogate", cn(&tlv(BMP_STRING, b"\xd8\x00"))),
            ("bad UniversalString", cn(&tlv(UNIVERSAL_STRING, b"\x00\x11\x00\x00"))),
            ("OCTET STRING value", cn(&tlv(0x04, b"x"))),
            ("CN without value", tlv(SET, &seq(&[&oid("2.5.4.3")]))),
            ("RDN not a SET", seq(&[&oid("2.5.4.3"), &tlv(UTF8_STRING, b"x")])),
        ];
        for (name, subject) in cases {
            assert_eq!(subject_common_name(&cert_with_subject(subject)), None, "{name}");
        }
    }

    #[test]
    fn every_prefix_and_trailing_garbage_is_refused() {
        for der in [cert(&PKCS_ECDSA_P256_SHA256), cert(&PKCS_ED25519)] {
            for end in 0..der.len() {
                assert_eq!(server_end_point_hash(&der[..end]), None, "prefix {end}");
                assert_eq!(subject_common_name(&der[..end]), None, "prefix {end}");
            }
            let mut longer = der.clone();
            longer.push(0);
            assert_eq!(server_end_point_hash(&longer), None);
            assert_eq!(subject_common_name(&longer), None);
        }
    }

    #[test]
    fn hostile_lengths_are_refused() {
        let cases: &[&[u8]] = &[
            b"",
            b"\x30",
            b"\x30\x80\x00\x00",             // indefinite length
            b"\x30\x85\x01\x00\x00\x00\x00", // five length octets
            b"\x30\x84\xff\xff\xff\xff",     // 4 GiB claimed
            b"\x30\x89\xff\xff\xff\xff\xff\xff\xff\xff\xff",
            b"\x3f\xff\xff\xff\xff\xff\x00", // endless high tag number
            b"\x30\x03\x30\x01",             // inner longer than outer
            b"\x30\x00",
        ];
        for case in cases {
            assert_eq!(server_end_point_hash(case), None, "{case:02x?}");
            assert_eq!(subject_common_name(case), None, "{case:02x?}");
        }
    }

    #[test]
    fn mutated_certificates_never_panic() {
        let der = cert(&PKCS_ECDSA_P256_SHA256);
        for i in 0..der.len() {
            for value in [0x00, 0x7f, 0x80, 0x81, 0x84, 0xff, der[i] ^ 0x01] {
                let mut mutated = der.clone();
                mutated[i] = value;
                let _ = server_end_point_hash(&mutated);
                let _ = subject_common_name(&mutated);
            }
        }
        let mut seed = 0x9e3779b97f4a7c15u64;
        for _ in 0..5000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 64) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (seed >> (i % 8 * 8)) as u8 ^ i as u8).collect();
            let framed = [&[0x30, len as u8][..], &bytes].concat();
            let _ = server_end_point_hash(&framed);
            let _ = subject_common_name(&framed);
        }
    }
}
