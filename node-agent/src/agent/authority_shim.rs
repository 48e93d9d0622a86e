//! Serves the kubelet's plugin-registration client, which h2 alone cannot.
//!
//! The kubelet (k8s v1.34 `pluginmanager/operationexecutor`) dials a plugin's
//! registration socket with grpc-go and no `WithAuthority`, so its requests carry the
//! socket's path as HTTP/2 `:authority`; h2's server resets such a stream as malformed
//! (hyperium/h2#487). Instead of patching h2, the agent accepts those connections
//! itself and proxies each one to its in-process tonic server over an in-memory pipe,
//! rewriting only the client's header blocks: a `:authority` that is not a URI
//! authority becomes `localhost`. Everything else (SETTINGS, DATA, the server's side)
//! passes byte for byte.
//!
//! Header blocks are HPACK-compressed against a table the client builds per
//! connection, so the shim keeps one decoder per connection and re-encodes every block
//! as literals *without* indexing: the server's decoder table then stays empty and
//! never disagrees with the client's.

use std::time::Duration;

use fluke_hpack::decoder::Decoder;
use fluke_hpack::encoder::encode_integer_into;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio_stream::wrappers::ReceiverStream;

use super::error::AgentError;

/// What every HTTP/2 client sends first (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Largest client frame payload accepted; h2's server advertises 16 KiB, so a
/// conforming client never comes near it.
const MAX_FRAME_PAYLOAD: usize = 64 * 1024;
/// Largest header block (HEADERS plus CONTINUATIONs) accepted.
const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// Frames the shim writes stay within the smallest SETTINGS_MAX_FRAME_SIZE a peer
/// may announce.
const OUT_FRAME_PAYLOAD: usize = 16 * 1024;
/// The dynamic table size h2's server allows its clients (it announces no
/// SETTINGS_HEADER_TABLE_SIZE, so the default); more is a client bug.
const CLIENT_TABLE_SIZE: usize = 4096;
/// Buffer of the in-memory pipe to the tonic server.
const PIPE_BUFFER: usize = 64 * 1024;

const FRAME_HEADERS: u8 = 0x1;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// The authority used when the client's is not one.
const FALLBACK_AUTHORITY: &[u8] = b"localhost";

fn malformed(why: impl Into<String>) -> AgentError {
    AgentError::Invalid(format!(
        "registration client sent malformed HTTP/2: {}",
        why.into()
    ))
}

/// One frame's 9-byte header (RFC 9113 §4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FrameHeader {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHeader {
    fn parse(b: &[u8; 9]) -> Self {
        FrameHeader {
            len: (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        // Callers keep `len` below 2^24 (OUT_FRAME_PAYLOAD or a frame read as such).
        let len = (self.len as u32).to_be_bytes();
        out.extend_from_slice(&len[1..]);
        out.push(self.kind);
        out.push(self.flags);
        out.extend_from_slice(&self.stream.to_be_bytes());
    }
}

/// Reads one frame; `None` at a clean end of stream between frames.
async fn read_frame<R: AsyncRead + Unpin>(
    from: &mut R,
) -> Result<Option<(FrameHeader, Vec<u8>)>, AgentError> {
    let mut head = [0u8; 9];
    let first = from
        .read(&mut head[..1])
        .await
        .map_err(AgentError::io("read from the registration client"))?;
    if first == 0 {
        return Ok(None);
    }
    from.read_exact(&mut head[1..])
        .await
        .map_err(AgentError::io(
            "read a frame header from the registration client",
        ))?;
    let header = FrameHeader::parse(&head);
    if header.len > MAX_FRAME_PAYLOAD {
        return Err(malformed(format!(
            "a {} byte frame (at most {MAX_FRAME_PAYLOAD})",
            header.len
        )));
    }
    let mut payload = vec![0u8; header.len];
    from.read_exact(&mut payload)
        .await
        .map_err(AgentError::io("read a frame from the registration client"))?;
    Ok(Some((header, payload)))
}

/// The header block fragment of a HEADERS frame's payload, without padding and
/// priority fields.
fn headers_fragment(flags: u8, payload: &[u8]) -> Result<&[u8], AgentError> {
    let mut start = 0;
    let mut end = payload.len();
    if flags & FLAG_PADDED != 0 {
        let pad = usize::from(
            *payload
                .first()
                .ok_or_else(|| malformed("PADDED HEADERS without a pad length"))?,
        );
        start = 1;
        end = end
            .checked_sub(pad)
            .filter(|e| *e >= start)
            .ok_or_else(|| malformed("HEADERS padding longer than the frame"))?;
    }
    if flags & FLAG_PRIORITY != 0 {
        start += 5;
        if start > end {
            return Err(malformed("HEADERS too short for its priority fields"));
        }
    }
    Ok(&payload[start..end])
}

/// A string literal without Huffman coding (RFC 7541 §5.2).
fn put_string(value: &[u8], out: &mut Vec<u8>) {
    // Writing into a Vec cannot fail.
    let _ = encode_integer_into(value.len(), 7, 0, out);
    out.extend_from_slice(value);
}

/// Whether h2's server takes this `:authority` (the same parse it applies).
fn is_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// Decodes a connection's client header blocks and re-encodes them, fixed.
struct HeaderRewriter {
    decoder: Decoder<'static>,
}

impl HeaderRewriter {
    fn new() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(CLIENT_TABLE_SIZE);
        HeaderRewriter { decoder }
    }

    /// The block with a malformed `:authority` replaced, every field a literal
    /// without indexing (RFC 7541 §6.2.2) so the server's table stays empty.
    fn rewrite(&mut self, block: &[u8]) -> Result<Vec<u8>, AgentError> {
        let fields = self
            .decoder
            .decode(block)
            .map_err(|e| malformed(format!("HPACK: {e:?}")))?;
        let mut out = Vec::with_capacity(block.len() + 16);
        for (name, value) in &fields {
            let value: &[u8] = if name == b":authority" && !is_authority(value) {
                FALLBACK_AUTHORITY
            } else {
                value
            };
            out.push(0x00);
            put_string(name, &mut out);
            put_string(value, &mut out);
        }
        Ok(out)
    }
}

/// A header block as one HEADERS frame, or HEADERS plus CONTINUATIONs when it is
/// longer than a frame may be.
fn header_frames(stream: u32, end_stream: bool, block: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(block.len() + 9);
    let mut chunks: Vec<&[u8]> = block.chunks(OUT_FRAME_PAYLOAD).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let mut flags = 0;
        if i == last {
            flags |= FLAG_END_HEADERS;
        }
        let kind = if i == 0 {
            if end_stream {
                flags |= FLAG_END_STREAM;
            }
            FRAME_HEADERS
        } else {
            FRAME_CONTINUATION
        };
        FrameHeader {
            len: chunk.len(),
            kind,
            flags,
            stream,
        }
        .write(&mut out);
        out.extend_from_slice(chunk);
    }
    out
}

/// Copies the client's side to the server, header blocks rewritten, until the client
/// closes (Ok) or sends something malformed (Err: the caller drops the connection).
async fn forward_client<R, W>(mut from: R, mut to: W) -> Result<(), AgentError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let write_err = || AgentError::io("write to the registration server");
    let mut preface = [0u8; 24];
    from.read_exact(&mut preface)
        .await
        .map_err(AgentError::io("read the HTTP/2 preface"))?;
    if &preface != PREFACE {
        return Err(malformed("no HTTP/2 client preface"));
    }
    to.write_all(PREFACE).await.map_err(write_err())?;
    let mut rewriter = HeaderRewriter::new();
    while let Some((header, payload)) = read_frame(&mut from).await? {
        match header.kind {
            FRAME_HEADERS => {
                let mut block = headers_fragment(header.flags, &payload)?.to_vec();
                let mut end_headers = header.flags & FLAG_END_HEADERS != 0;
                while !end_headers {
                    let (next, fragment) = read_frame(&mut from)
                        .await?
                        .ok_or_else(|| malformed("closed inside a header block"))?;
                    if next.kind != FRAME_CONTINUATION || next.stream != header.stream {
                        return Err(malformed(format!(
                            "frame type {} on stream {} inside stream {}'s header block",
                            next.kind, next.stream, header.stream
                        )));
                    }
                    if block.len() + fragment.len() > MAX_HEADER_BLOCK {
                        return Err(malformed(format!(
                            "a header block over {MAX_HEADER_BLOCK} bytes"
                        )));
                    }
                    block.extend_from_slice(&fragment);
                    end_headers = next.flags & FLAG_END_HEADERS != 0;
                }
                let fixed = rewriter.rewrite(&block)?;
                let end_stream = header.flags & FLAG_END_STREAM != 0;
                to.write_all(&header_frames(header.stream, end_stream, &fixed))
                    .await
                    .map_err(write_err())?;
            }
            FRAME_CONTINUATION => {
                return Err(malformed("CONTINUATION outside a header block"));
            }
            _ => {
                let mut frame = Vec::with_capacity(9 + payload.len());
                header.write(&mut frame);
                frame.extend_from_slice(&payload);
                to.write_all(&frame).await.map_err(write_err())?;
            }
        }
        to.flush().await.map_err(write_err())?;
    }
    to.shutdown().await.map_err(write_err())
}

/// Proxies one client connection to `server` (the tonic end of a pipe) until either
/// side is done. A malformed client frame ends both.
pub async fn proxy<C>(client: C, server: DuplexStream) -> Result<(), AgentError>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let (client_read, mut client_write) = tokio::io::split(client);
    let (mut server_read, server_write) = tokio::io::split(server);
    let upstream = forward_client(client_read, server_write);
    let downstream = async {
        let copied = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
        match copied {
            // The kubelet hangs up once it has its answers; not a failure.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                Ok(0)
            }
            other => other.map_err(AgentError::io("copy to the registration client")),
        }
    };
    tokio::pin!(upstream, downstream);
    tokio::select! {
        up = &mut upstream => {
            up?;
            // The client closed its side; the server may still be answering.
            downstream.await.map(drop)
        }
        down = &mut downstream => down.map(drop),
    }
}

/// The connections accepted on `listener`, each proxied through the shim, as the
/// server ends of pipes for `tonic::transport::Server::serve_with_incoming`.
pub fn incoming(
    listener: tokio::net::UnixListener,
) -> ReceiverStream<Result<DuplexStream, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            match accepted {
                Ok((client, _)) => {
                    let (near, far) = tokio::io::duplex(PIPE_BUFFER);
                    tokio::spawn(async move {
                        if let Err(e) = proxy(client, near).await {
                            tracing::warn!(error = %e, "plugin registration connection dropped");
                        }
                    });
                    if tx.send(Ok(far)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    // EMFILE and the like: say so, back off, keep serving.
                    tracing::warn!(error = %e, "accepting a plugin registration connection");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::csi::registration;
    use fluke_hpack::encoder::Encoder;
    use hvx_proto::pluginregistration as reg;
    use prost::Message;
    use std::path::PathBuf;

    const SOCKET_PATH: &[u8] = b"/var/lib/kubelet/plugins_registry/x.sock";
    const ENDPOINT: &str = "/var/lib/kubelet/plugins/vm.hvx.dev/csi.sock";

    /// A tonic Registration server taking connections from the returned sender.
    fn registration_server() -> tokio::sync::mpsc::Sender<Result<DuplexStream, std::io::Error>> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(reg::registration_server::RegistrationServer::new(
                    registration(PathBuf::from(ENDPOINT)),
                ))
                .serve_with_incoming(ReceiverStream::new(rx)),
        );
        tx
    }

    /// The client end of a connection to the Registration server, through the shim
    /// or straight, and the server's connection sender (dropping it stops the server).
    async fn connect(
        shim: bool,
    ) -> (
        DuplexStream,
        tokio::sync::mpsc::Sender<Result<DuplexStream, std::io::Error>>,
    ) {
        let server = registration_server();
        let (client, far) = tokio::io::duplex(PIPE_BUFFER);
        if shim {
            let (near, to_server) = tokio::io::duplex(PIPE_BUFFER);
            tokio::spawn(proxy(far, near));
            server.send(Ok(to_server)).await.expect("server running");
        } else {
            server.send(Ok(far)).await.expect("server running");
        }
        (client, server)
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        FrameHeader {
            len: payload.len(),
            kind,
            flags,
            stream,
        }
        .write(&mut out);
        out.extend_from_slice(payload);
        out
    }

    fn get_info_headers(authority: &[u8]) -> Vec<(&'static [u8], Vec<u8>)> {
        vec![
            (b":method", b"POST".to_vec()),
            (b":scheme", b"http".to_vec()),
            (
                b":path",
                b"/pluginregistration.Registration/GetInfo".to_vec(),
            ),
            (b":authority", authority.to_vec()),
            (b"content-type", b"application/grpc".to_vec()),
            (b"te", b"trailers".to_vec()),
            (b"user-agent", b"grpc-go/1.72.1".to_vec()),
        ]
    }

    /// An empty InfoRequest as a gRPC message (no compression, length 0).
    const EMPTY_GRPC_MESSAGE: [u8; 5] = [0, 0, 0, 0, 0];

    #[derive(Debug, PartialEq)]
    enum Outcome {
        Answer(reg::PluginInfo),
        Reset(u32),
        Closed,
    }

    /// Reads the server's frames until stream `stream` is answered, reset or the
    /// connection ends (acking the server's SETTINGS).
    async fn outcome(client: &mut DuplexStream, stream: u32) -> Outcome {
        outcome_with(client, stream, &mut Decoder::new()).await
    }

    /// [`outcome`] with the decoder of the server's earlier blocks on this connection.
    async fn outcome_with(
        client: &mut DuplexStream,
        stream: u32,
        decoder: &mut Decoder<'static>,
    ) -> Outcome {
        let mut data = Vec::new();
        loop {
            let Ok(Some((h, payload))) = read_frame(client).await else {
                return Outcome::Closed;
            };
            match h.kind {
                0x4 if h.flags & 0x1 == 0 => {
                    let ack = frame(0x4, 0x1, 0, &[]);
                    if client.write_all(&ack).await.is_err() {
                        return Outcome::Closed;
                    }
                }
                0x0 if h.stream == stream => data.extend_from_slice(&payload),
                0x1 => {
                    // Every server block goes through the decoder (its table).
                    let fields = decoder
                        .decode(headers_fragment(h.flags, &payload).expect("fragment"))
                        .expect("server HPACK");
                    if h.stream == stream && h.flags & FLAG_END_STREAM != 0 {
                        let status = fields
                            .iter()
                            .find(|(n, _)| n == b"grpc-status")
                            .map(|(_, v)| v.clone());
                        assert_eq!(status.as_deref(), Some(&b"0"[..]), "{fields:?}");
                        assert!(data.len() >= 5, "a gRPC message: {data:?}");
                        let info = reg::PluginInfo::decode(&data[5..]).expect("PluginInfo");
                        return Outcome::Answer(info);
                    }
                }
                0x3 if h.stream == stream => {
                    let code = payload
                        .get(..4)
                        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                        .unwrap_or(u32::MAX);
                    return Outcome::Reset(code);
                }
                0x7 => return Outcome::Closed,
                _ => {}
            }
        }
    }

    async fn send_get_info(client: &mut DuplexStream, stream: u32, headers: Vec<u8>) {
        client.write_all(&headers).await.expect("write");
        client
            .write_all(&frame(0x0, FLAG_END_STREAM, stream, &EMPTY_GRPC_MESSAGE))
            .await
            .expect("write");
    }

    async fn start(client: &mut DuplexStream) {
        client.write_all(PREFACE).await.expect("preface");
        client
            .write_all(&frame(0x4, 0, 0, &[]))
            .await
            .expect("settings");
    }

    fn encode(encoder: &mut Encoder<'_>, headers: &[(&'static [u8], Vec<u8>)]) -> Vec<u8> {
        encoder.encode(headers.iter().map(|(n, v)| (*n, v.as_slice())))
    }

    fn expected() -> reg::PluginInfo {
        reg::PluginInfo {
            r#type: "CSIPlugin".into(),
            name: "vm.hvx.dev".into(),
            endpoint: ENDPOINT.into(),
            supported_versions: vec!["1.0.0".into()],
        }
    }

    async fn within<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(20), f)
            .await
            .expect("no hang")
    }

    #[tokio::test]
    async fn socket_path_authority_is_answered_through_the_shim_and_refused_without() {
        for shim in [true, false] {
            let (mut client, _server) = connect(shim).await;
            start(&mut client).await;
            let block = encode(&mut Encoder::new(), &get_info_headers(SOCKET_PATH));
            let headers = frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &block);
            send_get_info(&mut client, 1, headers).await;
            let got = within(outcome(&mut client, 1)).await;
            if shim {
                assert_eq!(got, Outcome::Answer(expected()));
            } else {
                // h2 resets the stream (PROTOCOL_ERROR): what the kubelet hits.
                assert_eq!(got, Outcome::Reset(0x1), "h2 took a path as :authority");
            }
        }
    }

    #[tokio::test]
    async fn dynamic_table_entries_from_earlier_blocks_are_decoded() {
        let (mut client, _server) = connect(true).await;
        start(&mut client).await;
        // The first block adds the socket path `:authority` and `te` to the client's
        // dynamic table (literals with incremental indexing); the second names them
        // by index only (62: the newest entry, te; 63: the authority). Pseudo-headers
        // first, as HTTP/2 requires.
        let base: Vec<_> = get_info_headers(SOCKET_PATH)
            .into_iter()
            .filter(|(n, _)| *n != b":authority" && *n != b"te")
            .collect();
        let mut first = vec![0x41];
        put_string(SOCKET_PATH, &mut first);
        first.extend(encode(&mut Encoder::new(), &base));
        first.push(0x40);
        put_string(b"te", &mut first);
        put_string(b"trailers", &mut first);
        let mut second = vec![0x80 | 63];
        second.extend(encode(&mut Encoder::new(), &base));
        second.push(0x80 | 62);
        assert!(!second.windows(8).any(|w| w == b"/var/lib"));
        send_get_info(
            &mut client,
            1,
            frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &first),
        )
        .await;
        let mut decoder = Decoder::new();
        assert_eq!(
            within(outcome_with(&mut client, 1, &mut decoder)).await,
            Outcome::Answer(expected())
        );
        send_get_info(
            &mut client,
            3,
            frame(FRAME_HEADERS, FLAG_END_HEADERS, 3, &second),
        )
        .await;
        assert_eq!(
            within(outcome_with(&mut client, 3, &mut decoder)).await,
            Outcome::Answer(expected())
        );
    }

    #[tokio::test]
    async fn padded_prioritised_headers_split_over_continuations_are_answered() {
        let (mut client, _server) = connect(true).await;
        start(&mut client).await;
        let block = encode(&mut Encoder::new(), &get_info_headers(SOCKET_PATH));
        let (a, rest) = block.split_at(7);
        let (b, c) = rest.split_at(rest.len() / 2);
        // Pad length 3, then priority (stream dependency 0, weight 16), fragment, pad.
        let mut first = vec![3u8, 0, 0, 0, 0, 15];
        first.extend_from_slice(a);
        first.extend_from_slice(&[0, 0, 0]);
        let mut bytes = frame(FRAME_HEADERS, FLAG_PADDED | FLAG_PRIORITY, 1, &first);
        bytes.extend(frame(FRAME_CONTINUATION, 0, 1, b));
        bytes.extend(frame(FRAME_CONTINUATION, FLAG_END_HEADERS, 1, c));
        send_get_info(&mut client, 1, bytes).await;
        assert_eq!(
            within(outcome(&mut client, 1)).await,
            Outcome::Answer(expected())
        );
    }

    /// Runs the shim on `bytes` from a client and returns how it ended.
    async fn shim_result(bytes: Vec<u8>) -> Result<(), AgentError> {
        let (mut client, far) = tokio::io::duplex(PIPE_BUFFER);
        // A server that reads and discards, so only the client side decides.
        let (near, mut server) = tokio::io::duplex(PIPE_BUFFER);
        tokio::spawn(async move {
            let mut sink = vec![0u8; 4096];
            while matches!(server.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        let run = tokio::spawn(proxy(far, near));
        // The shim may close before reading everything: a failed write is expected.
        let _ = client.write_all(&bytes).await;
        let result = within(run).await.expect("no panic");
        // The shim closed the client's connection.
        let mut rest = Vec::new();
        let _ = within(client.read_to_end(&mut rest)).await;
        result
    }

    fn with_preface(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut out = PREFACE.to_vec();
        for f in frames {
            out.extend_from_slice(f);
        }
        out
    }

    #[tokio::test]
    async fn malformed_client_frames_close_the_connection() {
        let block = encode(&mut Encoder::new(), &get_info_headers(SOCKET_PATH));
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("not HTTP/2", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
            (
                "oversized frame",
                with_preface(&[frame(0x0, 0, 1, &vec![0; MAX_FRAME_PAYLOAD + 1])]),
            ),
            (
                "DATA inside a header block",
                with_preface(&[
                    frame(FRAME_HEADERS, 0, 1, &block[..4]),
                    frame(0x0, 0, 1, b"x"),
                ]),
            ),
            (
                "CONTINUATION of another stream",
                with_preface(&[
                    frame(FRAME_HEADERS, 0, 1, &block[..4]),
                    frame(FRAME_CONTINUATION, FLAG_END_HEADERS, 3, &block[4..]),
                ]),
            ),
            (
                "stray CONTINUATION",
                with_preface(&[frame(FRAME_CONTINUATION, FLAG_END_HEADERS, 1, &block)]),
            ),
            (
                "padding longer than the frame",
                with_preface(&[frame(
                    FRAME_HEADERS,
                    FLAG_PADDED | FLAG_END_HEADERS,
                    1,
                    &[200, 0x82],
                )]),
            ),
            (
                "bad HPACK index",
                with_preface(&[frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &[0xff, 0x7f])]),
            ),
            (
                "header block over the bound",
                with_preface(&{
                    let mut frames = vec![frame(FRAME_HEADERS, 0, 1, &[0; 16_000])];
                    for _ in 0..5 {
                        frames.push(frame(FRAME_CONTINUATION, 0, 1, &[0; 16_000]));
                    }
                    frames
                }),
            ),
        ];
        for (name, bytes) in cases {
            let result = shim_result(bytes).await;
            assert!(
                matches!(result, Err(AgentError::Invalid(_))),
                "{name}: {result:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_truncated_frame_is_an_io_error_not_a_hang() {
        let mut bytes = with_preface(&[]);
        bytes.extend_from_slice(&[0, 0, 10, 0, 0, 0, 0, 0, 1, 1, 2]);
        let (mut client, far) = tokio::io::duplex(PIPE_BUFFER);
        let (near, _server) = tokio::io::duplex(PIPE_BUFFER);
        let run = tokio::spawn(proxy(far, near));
        client.write_all(&bytes).await.expect("write");
        drop(client);
        let result = within(run).await.expect("no panic");
        assert!(matches!(result, Err(AgentError::Io { .. })), "{result:?}");
    }

    #[test]
    fn only_a_malformed_authority_is_replaced_and_nothing_is_indexed() {
        let mut rewriter = HeaderRewriter::new();
        let mut encoder = Encoder::new();
        let block = encode(&mut encoder, &get_info_headers(SOCKET_PATH));
        let fixed = rewriter.rewrite(&block).expect("rewrite");
        // A fresh decoder each time: the output never relies on table state.
        for _ in 0..2 {
            let fields = Decoder::new().decode(&fixed).expect("decode");
            let authority = fields.iter().find(|(n, _)| n == b":authority");
            assert_eq!(
                authority.map(|(_, v)| v.as_slice()),
                Some(FALLBACK_AUTHORITY)
            );
            assert_eq!(fields.len(), get_info_headers(SOCKET_PATH).len());
            assert!(fields.contains(&(
                b":path".to_vec(),
                b"/pluginregistration.Registration/GetInfo".to_vec()
            )));
        }
        let block = encode(&mut encoder, &get_info_headers(b"unix:x"));
        let fixed = rewriter.rewrite(&block).expect("rewrite");
        let fields = Decoder::new().decode(&fixed).expect("decode");
        assert!(fields.contains(&(b":authority".to_vec(), b"unix:x".to_vec())));
    }

    #[test]
    fn long_blocks_are_split_into_continuations() {
        let block = vec![7u8; OUT_FRAME_PAYLOAD * 2 + 1];
        let out = header_frames(5, true, &block);
        let mut frames = Vec::new();
        let mut rest = out.as_slice();
        while !rest.is_empty() {
            let head: [u8; 9] = rest[..9].try_into().expect("9 bytes");
            let h = FrameHeader::parse(&head);
            frames.push(h);
            rest = &rest[9 + h.len..];
        }
        let kinds: Vec<(u8, u8, usize)> = frames.iter().map(|h| (h.kind, h.flags, h.len)).collect();
        assert_eq!(
            kinds,
            vec![
                (FRAME_HEADERS, FLAG_END_STREAM, OUT_FRAME_PAYLOAD),
                (FRAME_CONTINUATION, 0, OUT_FRAME_PAYLOAD),
                (FRAME_CONTINUATION, FLAG_END_HEADERS, 1),
            ]
        );
        assert!(frames.iter().all(|h| h.stream == 5));
        let empty = header_frames(1, false, &[]);
        assert_eq!(empty, frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &[]));
    }
}
