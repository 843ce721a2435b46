//! The bytes of a peer message stream: a sequence of frames, each one raft message
//! addressed to one raft group. `group id (u64 LE) | length (u32 LE) | protobuf-encoded
//! raft message`. Decoding never panics and never buffers a frame longer than the
//! limit it is given: a frame it cannot read is an error for the whole stream.

use protobuf::Message as _;
use raft::eraftpb::Message;

/// One message addressed to one raft group.
pub type GroupMessage = (u64, Message);

/// Appends one frame to `buf`: `group id (u64 LE) | length (u32 LE) | protobuf-encoded
/// raft message`. A stream is a sequence of frames.
pub fn encode_frame(buf: &mut Vec<u8>, group_id: u64, msg: &Message) {
    buf.extend_from_slice(&group_id.to_le_bytes());
    let length_at = buf.len();
    buf.extend_from_slice(&[0; 4]);
    // Encoded in place (a message carries a round's entries; no second copy of them).
    msg.write_to_vec(buf).expect("raft messages always encode");
    let length = (buf.len() - length_at - 4) as u32;
    buf[length_at..length_at + 4].copy_from_slice(&length.to_le_bytes());
}

/// Removes the complete frames at the front of `buf` and decodes them; an incomplete
/// frame stays for the next chunk. A frame longer than `max_bytes` is an error as soon
/// as its length is read, before it is buffered.
pub fn take_frames(buf: &mut Vec<u8>, max_bytes: usize) -> Result<Vec<GroupMessage>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while buf.len() - at >= 12 {
        let group_id = u64::from_le_bytes(buf[at..at + 8].try_into().unwrap());
        let len = u32::from_le_bytes(buf[at + 8..at + 12].try_into().unwrap()) as usize;
        if len > max_bytes {
            return Err(format!(
                "a frame of {len} bytes is over --max-peer-frame-bytes ({max_bytes})"
            ));
        }
        if buf.len() - at - 12 < len {
            break;
        }
        let msg = Message::parse_from_bytes(&buf[at + 12..at + 12 + len])
            .map_err(|e| format!("bad raft message: {e}"))?;
        out.push((group_id, msg));
        at += 12 + len;
    }
    buf.drain(..at);
    Ok(out)
}

/// The fuzzers' oracle (`fuzz/fuzz_targets/peer_frames.rs`, and the corpus replay in
/// the tests): decoding arbitrary bytes never panics, and a stream decodes to the same
/// messages however it is split into chunks (the first byte picks the split).
#[cfg(any(test, fuzzing))]
pub fn check_decoding(data: &[u8]) {
    const LIMIT: usize = 1 << 16;
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    let whole = take_frames(&mut stream.to_vec(), LIMIT);
    let split = (split as usize).min(stream.len());
    let mut buf = stream[..split].to_vec();
    let pieces = take_frames(&mut buf, LIMIT).and_then(|mut first| {
        buf.extend_from_slice(&stream[split..]);
        first.extend(take_frames(&mut buf, LIMIT)?);
        Ok(first)
    });
    if let (Ok(whole), Ok(pieces)) = (&whole, &pieces) {
        assert_eq!(whole, pieces, "the split changed the messages");
    }
    assert_eq!(
        whole.is_ok(),
        pieces.is_ok(),
        "the split changed the verdict"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every input the fuzzer kept (`fuzz/corpus/peer_frames`) still passes its oracle.
    #[test]
    fn replays_the_fuzz_corpus() {
        crate::fuzz_corpus::replay("peer_frames", check_decoding);
    }
    use raft::eraftpb::MessageType;

    #[test]
    fn frames_round_trip_across_any_split_and_garbage_is_rejected() {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgHeartbeat);
        m.from = 1;
        m.to = 2;
        m.term = 5;
        let batch = vec![(1, m.clone()), (7, m)];
        let mut bytes = Vec::new();
        for (group_id, msg) in &batch {
            encode_frame(&mut bytes, *group_id, msg);
        }
        for split in 0..=bytes.len() {
            let mut buf = bytes[..split].to_vec();
            let mut got = take_frames(&mut buf, 1 << 20).unwrap();
            buf.extend_from_slice(&bytes[split..]);
            got.extend(take_frames(&mut buf, 1 << 20).unwrap());
            assert_eq!(got, batch, "split at {split}");
            assert!(buf.is_empty());
        }
        let mut garbage = vec![1, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0xff, 0xff, 0xff];
        assert!(take_frames(&mut garbage, 1 << 20).is_err());
        let mut huge = vec![1, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f];
        assert!(take_frames(&mut huge, 1 << 20)
            .unwrap_err()
            .contains("over"));
    }
}
