//! The body of a client API response: whole (almost every answer), or streamed, chunk
//! by chunk as a task sends them (a watch). A streamed body ends when its sender is
//! dropped; when the client goes away, the body is dropped and the sender sees its
//! channel closed, which is how a watch learns to stop. It never buffers more than the
//! channel's bound.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

pub enum ResponseBody {
    Whole(Full<Bytes>),
    Streamed(mpsc::Receiver<Bytes>),
}

impl From<Full<Bytes>> for ResponseBody {
    fn from(body: Full<Bytes>) -> ResponseBody {
        ResponseBody::Whole(body)
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            ResponseBody::Whole(body) => Pin::new(body).poll_frame(cx),
            ResponseBody::Streamed(chunks) => chunks
                .poll_recv(cx)
                .map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Whole(body) => body.is_end_stream(),
            ResponseBody::Streamed(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Whole(body) => body.size_hint(),
            ResponseBody::Streamed(_) => SizeHint::default(),
        }
    }
}
