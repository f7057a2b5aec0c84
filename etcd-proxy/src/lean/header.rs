//! Header blocks: a request's HPACK-decoded fields into `http` request parts, and response
//! headers and trailers encoded as literals that never touch the client's decoder table.
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Uri};

/// The largest decoded header list a request may carry (names, values and
/// 32 bytes each, as RFC 9113 counts them); also advertised in SETTINGS.
pub const MAX_HEADER_LIST: usize = 16 * 1024;

/// Why a request's header block does not make a request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    /// The block is not valid HPACK: the connection's decoder state is lost.
    #[error("header block is not valid HPACK: {0}")]
    Compression(String),
    /// The fields decode but do not form a valid request (the stream is reset).
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// The decoded list is larger than [`MAX_HEADER_LIST`].
    #[error("header list larger than {MAX_HEADER_LIST} bytes")]
    TooLarge,
}

/// A request's decoded head.
#[derive(Debug)]
pub struct RequestHead {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
}

/// Decodes a complete header block with the connection's decoder. The whole
/// block is always decoded, so that the decoder's table stays in step with
/// the client's even when the request is refused.
pub fn decode(
    decoder: &mut loona_hpack::Decoder<'static>,
    block: &[u8],
) -> Result<RequestHead, HeaderError> {
    let mut method = None;
    let mut scheme = None;
    let mut authority = None;
    let mut path = None;
    let mut headers = HeaderMap::new();
    let mut size = 0usize;
    let mut malformed = None;
    let mut regular_seen = false;
    decoder
        .decode_with_cb(block, |name, value| {
            size += name.len() + value.len() + 32;
            if size > MAX_HEADER_LIST || malformed.is_some() {
                return;
            }
            if let Some(pseudo) = name.strip_prefix(b":") {
                if regular_seen {
                    malformed = Some("pseudo-header after a regular header");
                    return;
                }
                let slot = match pseudo {
                    b"method" => &mut method,
                    b"scheme" => &mut scheme,
                    b"authority" => &mut authority,
                    b"path" => &mut path,
                    _ => {
                        malformed = Some("unknown pseudo-header");
                        return;
                    }
                };
                if slot.is_some() {
                    malformed = Some("repeated pseudo-header");
                    return;
                }
                *slot = Some(value.into_owned());
                return;
            }
            regular_seen = true;
            match (
                HeaderName::from_bytes(&name),
                HeaderValue::from_bytes(&value),
            ) {
                (Ok(n), Ok(v)) if name.iter().all(|c| !c.is_ascii_uppercase()) => {
                    headers.append(n, v);
                }
                _ => malformed = Some("invalid header field"),
            }
        })
        .map_err(|e| HeaderError::Compression(format!("{e:?}")))?;
    if size > MAX_HEADER_LIST {
        return Err(HeaderError::TooLarge);
    }
    if let Some(m) = malformed {
        return Err(HeaderError::Malformed(m));
    }
    let method = Method::from_bytes(&method.ok_or(HeaderError::Malformed("no :method"))?)
        .map_err(|_| HeaderError::Malformed("invalid :method"))?;
    let path = path.ok_or(HeaderError::Malformed("no :path"))?;
    let mut uri = Uri::builder().path_and_query(path);
    if let Some(a) = authority {
        uri = uri
            .scheme(scheme.as_deref().unwrap_or(b"https"))
            .authority(a);
    }
    let uri = uri
        .build()
        .map_err(|_| HeaderError::Malformed("invalid :path or :authority"))?;
    Ok(RequestHead {
        method,
        uri,
        headers,
    })
}

/// Encodes a response's status and headers.
pub fn encode_response(status: http::StatusCode, headers: &HeaderMap) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    if status == http::StatusCode::OK {
        // Indexed field 8 of the static table, ":status: 200".
        out.push(0x88);
    } else {
        // Literal without indexing, name from static entry 8 (":status").
        out.push(0x08);
        put_string(&mut out, status.as_str().as_bytes());
    }
    encode_fields(&mut out, headers);
    out
}

/// Encodes trailers (or a trailers-only response's extra fields).
pub fn encode_trailers(headers: &HeaderMap) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    encode_fields(&mut out, headers);
    out
}

/// Every field as a literal without indexing with a literal name: the
/// client's decoder keeps nothing of it, and this side keeps no encoder table.
fn encode_fields(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        out.push(0x00);
        put_string(out, name.as_str().as_bytes());
        put_string(out, value.as_bytes());
    }
}

/// A string literal without Huffman coding (RFC 7541 §5.2).
fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    put_int(out, 0x00, 7, s.len());
    out.extend_from_slice(s);
}

/// An integer with an `n`-bit prefix (RFC 7541 §5.1); `first` holds the
/// bits above the prefix.
fn put_int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_block() -> Vec<u8> {
        let mut enc = loona_hpack::Encoder::new();
        enc.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"https"),
            (b":authority", b"proxy:2379"),
            (b":path", b"/etcdserverpb.Watch/Watch"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ])
    }

    #[test]
    fn request_fields_decode() {
        let mut d = loona_hpack::Decoder::new();
        let head = decode(&mut d, &request_block()).unwrap();
        assert_eq!(head.method, Method::POST);
        assert_eq!(head.uri.path(), "/etcdserverpb.Watch/Watch");
        assert_eq!(head.uri.authority().unwrap().as_str(), "proxy:2379");
        assert_eq!(head.headers["content-type"], "application/grpc");
        assert_eq!(head.headers["te"], "trailers");
    }

    #[test]
    fn huffman_coded_fields_decode() {
        // RFC 7541 C.4.1: a request with Huffman-coded literals.
        let block = [
            0x82, 0x86, 0x84, 0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab,
            0x90, 0xf4, 0xff,
        ];
        let mut d = loona_hpack::Decoder::new();
        let head = decode(&mut d, &block).unwrap();
        assert_eq!(head.method, Method::GET);
        assert_eq!(head.uri.authority().unwrap().as_str(), "www.example.com");
        assert_eq!(head.uri.path(), "/");
    }

    #[test]
    fn missing_path_and_late_pseudo_headers_are_malformed() {
        let mut enc = loona_hpack::Encoder::new();
        let block = enc.encode([(&b":method"[..], &b"POST"[..])]);
        let mut d = loona_hpack::Decoder::new();
        assert_eq!(
            decode(&mut d, &block).unwrap_err(),
            HeaderError::Malformed("no :path")
        );
        let block = enc.encode([(&b"te"[..], &b"trailers"[..]), (b":path", b"/")]);
        assert_eq!(
            decode(&mut d, &block).unwrap_err(),
            HeaderError::Malformed("pseudo-header after a regular header")
        );
    }

    #[test]
    fn oversized_list_is_refused_and_garbage_is_a_compression_error() {
        let big = vec![b'a'; MAX_HEADER_LIST];
        let mut enc = loona_hpack::Encoder::new();
        let block = enc.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":path", b"/"),
            (b"x-big", &big[..]),
        ]);
        let mut d = loona_hpack::Decoder::new();
        assert_eq!(decode(&mut d, &block).unwrap_err(), HeaderError::TooLarge);
        assert!(matches!(
            decode(&mut d, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Err(HeaderError::Compression(_))
        ));
    }

    #[test]
    fn response_fields_roundtrip_through_a_decoder() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/grpc"));
        h.insert(
            "grpc-message",
            HeaderValue::from_bytes(&[b'x'; 300]).unwrap(),
        );
        let block = encode_response(http::StatusCode::OK, &h);
        let mut d = loona_hpack::Decoder::new();
        let fields = d.decode(&block).unwrap();
        assert_eq!(fields[0], (b":status".to_vec(), b"200".to_vec()));
        assert_eq!(
            fields[1],
            (b"content-type".to_vec(), b"application/grpc".to_vec())
        );
        assert_eq!(fields[2].1.len(), 300);
        let block = encode_response(http::StatusCode::NOT_FOUND, &HeaderMap::new());
        assert_eq!(
            d.decode(&block).unwrap(),
            vec![(b":status".to_vec(), b"404".to_vec())]
        );
    }
}
