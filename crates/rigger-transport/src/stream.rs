//! Reading a child process's standard output and error as lines, both at once, into an
//! [`OutputSink`].

use std::collections::VecDeque;

use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::process::Child;

use crate::{OutputSink, Stream};

/// How many of the last standard error lines [`pump`] keeps for error messages.
const KEPT_STDERR: usize = 8;

/// Passes every line of `child`'s piped stdout and stderr to `sink` until both close, then
/// waits for it. Returns its status and its last lines of standard error.
pub(crate) async fn pump(
    child: &mut Child,
    sink: &dyn OutputSink,
) -> std::io::Result<(std::process::ExitStatus, Vec<String>)> {
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let mut kept = VecDeque::with_capacity(KEPT_STDERR);
    let (out, err) = tokio::join!(
        read_lines(stdout, Stream::Stdout, sink, None),
        read_lines(stderr, Stream::Stderr, sink, Some(&mut kept)),
    );
    out?;
    err?;
    let status = child.wait().await?;
    Ok((status, kept.into()))
}

async fn read_lines(
    pipe: Option<impl AsyncRead + Unpin>,
    stream: Stream,
    sink: &dyn OutputSink,
    mut kept: Option<&mut VecDeque<String>>,
) -> std::io::Result<()> {
    let Some(pipe) = pipe else {
        return Ok(());
    };
    let mut reader = BufReader::new(pipe);
    let mut buffer = Vec::new();
    loop {
        buffer.clear();
        if reader.read_until(b'\n', &mut buffer).await? == 0 {
            return Ok(());
        }
        let line = String::from_utf8_lossy(&buffer);
        let line = line.trim_end_matches('\n').trim_end_matches('\r');
        sink.line(stream, line);
        if let Some(kept) = kept.as_deref_mut() {
            if kept.len() == KEPT_STDERR {
                kept.pop_front();
            }
            kept.push_back(line.to_owned());
        }
    }
}
