//! What every service task shares: its counters, its `ServiceStatus`, and turning a
//! request frame into an encoded response frame.
//!
//! Not part of the wire format (nothing here changes a byte on the wire); it lives in
//! `wire` because the services may depend on `wire` alone, and the core's runtime
//! encodes its replies the same way.

use alloc::vec::Vec;

use crate::{ErrorCode, ErrorReply, Frame, Request, Response, ServiceId, ServiceState, ServiceStatus};

/// A mailbox as the runtime sees it when it delivers a message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueInfo {
    /// Messages still waiting.
    pub depth: u32,
    /// Mailbox capacity.
    pub capacity: u32,
}

/// A service's life-cycle state and request counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceCounters {
    /// Which service.
    pub service: ServiceId,
    /// Its state.
    pub state: ServiceState,
    /// Requests answered (successfully or not).
    pub handled: u64,
    /// Requests answered with an error.
    pub errors: u64,
}

impl ServiceCounters {
    /// A running service with zeroed counters.
    pub const fn new(service: ServiceId) -> Self {
        Self { service, state: ServiceState::Running, handled: 0, errors: 0 }
    }

    /// The service's status with its mailbox as `queue`.
    pub fn status(&self, queue: QueueInfo) -> ServiceStatus {
        ServiceStatus {
            service: self.service,
            state: self.state,
            handled: self.handled,
            errors: self.errors,
            queue_depth: queue.depth,
            queue_capacity: queue.capacity,
        }
    }

    /// Answer one request frame: decode it, let `handler` answer it (it sees the
    /// counters already including this request), count the outcome, and return the
    /// encoded response frame with the request's id. An undecodable request is
    /// answered with its typed error without reaching `handler`.
    pub fn answer(
        &mut self,
        frame: &Frame,
        queue: QueueInfo,
        handler: impl FnOnce(Request, ServiceStatus) -> Response,
    ) -> Vec<u8> {
        self.handled = self.handled.saturating_add(1);
        let response = match crate::decode_request(frame) {
            Ok(request) => handler(request, self.status(queue)),
            Err(reply) => Response::Error(reply),
        };
        if response.error().is_some() {
            self.errors = self.errors.saturating_add(1);
        }
        encode_reply(frame.request_id, &response)
    }

    /// The status request every service answers, and a typed refusal for the rest:
    /// the whole handler of a service that has no other work yet.
    pub fn status_only(&self, request: Request, status: ServiceStatus) -> Response {
        match request {
            Request::ServiceStatus { service } if service == self.service => Response::ServiceStatus(status),
            other => Response::Error(ErrorReply::new(
                ErrorCode::NotImplemented,
                alloc::format!("the {} service does not handle {} requests yet", self.service.name(), other.name()),
            )),
        }
    }
}

/// Encode `response` as the frame answering `request_id`. Should encoding fail (a
/// reply over `MAX_FRAME_LEN`), the peer still gets an answer: an `Internal` error.
pub fn encode_reply(request_id: u64, response: &Response) -> Vec<u8> {
    let mut out = Vec::new();
    if let Err(e) = crate::encode_response(request_id, response, &mut out) {
        out.clear();
        let fallback =
            Response::Error(ErrorReply::new(ErrorCode::Internal, alloc::format!("cannot encode the reply: {e}")));
        // An error reply with a short message always fits; if even that fails there
        // is nothing better to send than nothing.
        let _ = crate::encode_response(request_id, &fallback, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FrameDecoder;

    fn frame(id: u64, req: &Request) -> Frame {
        let mut bytes = Vec::new();
        crate::encode_request(id, req, &mut bytes).unwrap();
        let mut d = FrameDecoder::new();
        d.push(&bytes);
        d.next_frame().unwrap().unwrap()
    }

    fn reply(bytes: &[u8]) -> (u64, Response) {
        let mut d = FrameDecoder::new();
        d.push(bytes);
        let f = d.next_frame().unwrap().unwrap();
        (f.request_id, crate::decode_response(&f).unwrap())
    }

    #[test]
    fn status_counts_itself_and_refusals_count_as_errors() {
        let mut c = ServiceCounters::new(ServiceId::Monitor);
        let q = QueueInfo { depth: 2, capacity: 16 };
        let r = c.answer(&frame(5, &Request::Ping { payload: alloc::vec![] }), q, c_status_only);
        assert_eq!(reply(&r).1.error().map(|e| e.code), Some(ErrorCode::NotImplemented));
        let r = c.answer(&frame(6, &Request::ServiceStatus { service: ServiceId::Monitor }), q, c_status_only);
        match reply(&r) {
            (6, Response::ServiceStatus(s)) => {
                assert_eq!((s.handled, s.errors, s.queue_depth, s.queue_capacity), (2, 1, 2, 16));
            }
            other => panic!("{other:?}"),
        }
        let bad = Frame { kind: crate::FrameKind::Request, version: 1, request_id: 7, payload: alloc::vec![0xff] };
        let r = c.answer(&bad, q, c_status_only);
        assert!(reply(&r).1.error().is_some());
        assert_eq!((c.handled, c.errors), (3, 2));
    }

    fn c_status_only(request: Request, status: ServiceStatus) -> Response {
        ServiceCounters::new(ServiceId::Monitor).status_only(request, status)
    }
}
