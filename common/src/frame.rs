//! Length-prefixed framing of control messages: a big-endian `u32` length, then a
//! postcard-encoded message. Decoding never touches a socket; an incomplete frame is
//! `Ok(None)`, so a driver reads more bytes and tries again.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest control message accepted; anything bigger is a protocol violation.
pub const MAX_FRAME: usize = 64 * 1024;

/// Why bytes on a control stream are not a valid frame. Either closes the connection.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge { len: usize },
    #[error("malformed message: {0}")]
    Malformed(#[from] postcard::Error),
}

/// Encodes one message as a frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = postcard::to_stdvec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge { len: body.len() });
    }
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge { len: body.len() })?;
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes the first frame of `buf`: `Ok(Some((msg, bytes_used)))`, or `Ok(None)`
/// when more bytes are needed.
pub fn decode<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, FrameError> {
    let Some(prefix) = buf.get(..4) else {
        return Ok(None);
    };
    let mut len_bytes = [0u8; 4];
    len_bytes.copy_from_slice(prefix);
    let len = u32::from_be_bytes(len_bytes) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge { len });
    }
    let Some(body) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    let msg = postcard::from_bytes(body)?;
    Ok(Some((msg, 4 + len)))
}

/// Accumulates bytes read from a stream and yields whole messages.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, if the buffer holds one.
    pub fn next_msg<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        match decode(&self.buf)? {
            Some((msg, used)) => {
                self.buf.drain(..used);
                Ok(Some(msg))
            }
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{BrokerMsg, EndReason, NodeMsg, OrderId, Slot};
    use proptest::prelude::*;

    #[test]
    fn exact_bytes_of_a_message() {
        let frame = encode(&BrokerMsg::Cancel {
            order_id: OrderId([9; 12]),
        })
        .unwrap_or_default();
        // length 13 = variant index 2 + 12 id bytes
        assert_eq!(
            frame,
            [0, 0, 0, 13, 2, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9].to_vec()
        );
    }

    #[test]
    fn exact_bytes_of_a_login() {
        let frame = encode(&NodeMsg::LoggedIn {
            order_id: OrderId([7; 12]),
            stream: 300,
        })
        .unwrap_or_default();
        // length 15 = variant index 8 + 12 id bytes + varint 300 (0xac 0x02)
        assert_eq!(
            frame,
            [
                0, 0, 0, 15, 8, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 0xac, 0x02
            ]
            .to_vec()
        );
    }

    #[test]
    fn exact_bytes_of_a_try_later() {
        let frame = encode(&BrokerMsg::TryLater {
            reason: "busy".into(),
            after_secs: 300,
        })
        .unwrap_or_default();
        // length 8 = variant index 7 + length 4 + "busy" + varint 300
        assert_eq!(
            frame,
            [0, 0, 0, 8, 7, 4, b'b', b'u', b's', b'y', 0xac, 0x02].to_vec()
        );
    }

    #[test]
    fn partial_frames_need_more_bytes() {
        let frame = encode(&NodeMsg::Ended {
            order_id: OrderId([1; 12]),
            reason: EndReason::WallClock,
        })
        .unwrap_or_default();
        for cut in 0..frame.len() {
            let got = decode::<NodeMsg>(frame.get(..cut).unwrap_or_default());
            assert!(matches!(got, Ok(None)), "cut at {cut}");
        }
        assert!(matches!(decode::<NodeMsg>(&frame), Ok(Some((_, n))) if n == frame.len()));
    }

    #[test]
    fn oversized_and_garbage_frames_are_errors() {
        let huge = [0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            decode::<NodeMsg>(&huge),
            Err(FrameError::TooLarge { .. })
        ));
        let garbage = [0, 0, 0, 2, 200, 1];
        assert!(matches!(
            decode::<NodeMsg>(&garbage),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn decoder_yields_messages_split_anywhere() {
        let a = NodeMsg::Accepted {
            order_id: OrderId([1; 12]),
            acceptance: vec![7; 33],
        };
        let b = NodeMsg::Accepted {
            order_id: OrderId([2; 12]),
            acceptance: Vec::new(),
        };
        let mut bytes = encode(&a).unwrap_or_default();
        bytes.extend(encode(&b).unwrap_or_default());
        for split in 0..bytes.len() {
            let (x, y) = bytes.split_at(split);
            let mut d = Decoder::default();
            let mut got = Vec::new();
            for part in [x, y] {
                d.push(part);
                while let Ok(Some(m)) = d.next_msg::<NodeMsg>() {
                    got.push(m);
                }
            }
            assert_eq!(got, vec![a.clone(), b.clone()], "split at {split}");
        }
    }

    proptest! {
        #[test]
        fn slots_round_trip(ids in proptest::collection::vec(any::<u64>(), 0..20), name in "[a-z0-9]{1,16}") {
            let msg = NodeMsg::SlotsReady {
                slots: ids.iter().map(|&slot_id| Slot { slot_id, username: name.clone() }).collect(),
            };
            let frame = encode(&msg).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let got = decode::<NodeMsg>(&frame).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(got, Some((msg, frame.len())));
        }

        #[test]
        fn logins_round_trip(id in any::<[u8; 12]>(), stream in any::<u64>()) {
            let msg = NodeMsg::LoggedIn { order_id: OrderId(id), stream };
            let frame = encode(&msg).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let got = decode::<NodeMsg>(&frame).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(got, Some((msg, frame.len())));
        }

        #[test]
        fn try_later_round_trips(reason in ".{0,64}", after_secs in any::<u32>()) {
            let msg = BrokerMsg::TryLater { reason, after_secs };
            let frame = encode(&msg).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let got = decode::<BrokerMsg>(&frame).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(got, Some((msg, frame.len())));
        }

        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<NodeMsg>(&bytes);
            let _ = decode::<BrokerMsg>(&bytes);
        }
    }
}
