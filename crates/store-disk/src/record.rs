//! The log's record format. Every record is framed as
//! `[len: u32][crc32: u32][type: u8][body]` (little endian), where `len` counts type and
//! body and the CRC covers them, so a torn or damaged record is always detected.

use bytes::Bytes;
use herald_core::{Kind, NewMessage, QueueName, QueueRecord, TopicName};

/// Bytes of the frame header (`len` and `crc`).
pub const HEADER: usize = 8;
/// Largest record accepted when reading: larger lengths are damage, not data. (Unit
/// tests use a small limit so that splitting is exercised without gigabytes.)
pub const MAX_RECORD: usize = if cfg!(test) { 1 << 20 } else { 256 << 20 };
/// Records the store writes hold at most this many bytes: a batch of many messages is
/// split into several records well under [`MAX_RECORD`], so the log never holds a
/// record its reader would refuse.
pub const SPLIT_BYTES: usize = MAX_RECORD / 4;
/// Largest payload the disk store takes: one message must fit in one record.
pub const MAX_MESSAGE_BYTES: usize = SPLIT_BYTES - 4096;

/// Bytes one topic entry adds to a record: timestamp, kind, TTL, length, payload.
fn entry_bytes(m: &NewMessage) -> usize {
    8 + 1 + 8 + 4 + m.payload.len()
}

/// Splits `entries` into runs whose encoding stays under [`SPLIT_BYTES`] (a run holds at
/// least one entry and at most `max_count`). Lazy: the common one-run case allocates
/// nothing on the publish path.
pub(crate) fn split_entries<T>(
    entries: &[T],
    size: impl Fn(&T) -> usize,
    max_count: usize,
) -> impl Iterator<Item = &[T]> {
    let mut rest = entries;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let mut end = 0;
        while end < rest.len() && end < max_count {
            let n = size(&rest[end]);
            if end > 0 && bytes + n > SPLIT_BYTES {
                break;
            }
            bytes += n;
            end += 1;
        }
        let (run, tail) = rest.split_at(end);
        rest = tail;
        Some(run)
    })
}

/// Appends framed `TopicAppend` records for `entries` at offsets `first..`, split so that
/// each stays under [`SPLIT_BYTES`]. Returns each record's framed length and message
/// count, in order.
pub(crate) fn encode_topic_appends(
    topic: &TopicName,
    generation: u64,
    first: u64,
    entries: &[(u64, NewMessage)],
    max_count: usize,
    buf: &mut Vec<u8>,
) -> Vec<(u32, u32)> {
    let mut offset = first;
    let mut parts = Vec::with_capacity(1);
    for part in split_entries(entries, |(_, m)| entry_bytes(m), max_count) {
        let start = buf.len();
        frame(buf, |o| encode_append_body(o, topic, generation, offset, part));
        parts.push(((buf.len() - start) as u32, part.len() as u32));
        offset += part.len() as u64;
    }
    parts
}

/// Bytes one queue record adds to an enqueue record.
pub(crate) fn queue_record_bytes(r: &QueueRecord) -> usize {
    8 + 1 + 8 + 8 + 8 + 4 + r.payload.len()
}

fn encode_append_body(o: &mut Out<'_>, topic: &TopicName, generation: u64, first: u64, entries: &[(u64, NewMessage)]) {
    o.u8(1);
    o.bytes(topic.as_str().as_bytes());
    o.u64(generation);
    o.u64(first);
    o.u32(entries.len() as u32);
    for (ts, m) in entries {
        o.u64(*ts);
        o.u8(kind_byte(m.kind));
        o.u64(m.ttl_ms.map_or(0, |ttl| ttl.saturating_add(1)));
        o.bytes(&m.payload);
    }
}

/// Appends one framed record whose type and body `body` writes.
fn frame(buf: &mut Vec<u8>, body: impl FnOnce(&mut Out<'_>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; HEADER]);
    body(&mut Out(buf));
    let body = &buf[start + HEADER..];
    let len = body.len() as u32;
    let crc = crc32fast::hash(body);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// One log record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Messages appended to a topic at offsets `first..`, with their timestamps.
    TopicAppend { topic: TopicName, generation: u64, first: u64, entries: Vec<(u64, NewMessage)> },
    /// A topic's history deleted; epoch `generation` starts.
    TopicDelete { topic: TopicName, generation: u64 },
    /// A topic's head as a checkpoint saw it: `first` is its oldest retained offset (0
    /// in checkpoints of the old format, whose messages followed their head).
    TopicHead { topic: TopicName, generation: u64, first: u64, next: u64, last_ts: u64 },
    /// Messages enqueued.
    QueueEnqueue { queue: QueueName, records: Vec<QueueRecord> },
    /// Messages that left a queue.
    QueueRemove { queue: QueueName, ids: Vec<u64> },
    /// A queue's next id as a checkpoint saw it.
    QueueHead { queue: QueueName, next_id: u64 },
    /// Deliveries counted so far, as (message id, attempts).
    QueueAttempts { queue: QueueName, attempts: Vec<(u64, u32)> },
    /// A checkpoint starts: the state is rebuilt from here. One that is `heads_only`
    /// holds topic heads and queues; the topics' messages stay in the segments before it.
    /// The old format (not `heads_only`) copied every retained message into it.
    CheckpointBegin { heads_only: bool },
    /// A checkpoint is complete.
    CheckpointEnd,
}

/// Why bytes did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the frame claims (a torn write at the end of the log).
    #[error("truncated record")]
    Truncated,
    /// The checksum does not match, or the content is malformed.
    #[error("damaged record: {0}")]
    Damaged(&'static str),
}

fn kind_byte(kind: Kind) -> u8 {
    match kind {
        Kind::Json => 0,
        Kind::Text => 1,
        Kind::Binary => 2,
    }
}

struct Out<'a>(&'a mut Vec<u8>);

impl Out<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
    }
}

impl Record {
    /// Appends the framed record to `buf`. The caller keeps it under [`SPLIT_BYTES`]
    /// (see [`encode_topic_appends`]).
    pub fn encode(&self, buf: &mut Vec<u8>) {
        frame(buf, |o| self.encode_body(o));
    }

    fn encode_body(&self, o: &mut Out<'_>) {
        match self {
            Record::TopicAppend { topic, generation, first, entries } => {
                encode_append_body(o, topic, *generation, *first, entries);
            }
            Record::TopicDelete { topic, generation } => {
                o.u8(2);
                o.bytes(topic.as_str().as_bytes());
                o.u64(*generation);
            }
            Record::TopicHead { topic, generation, first, next, last_ts } => {
                o.u8(10);
                o.bytes(topic.as_str().as_bytes());
                o.u64(*generation);
                o.u64(*first);
                o.u64(*next);
                o.u64(*last_ts);
            }
            Record::QueueEnqueue { queue, records } => {
                o.u8(4);
                o.bytes(queue.as_str().as_bytes());
                o.u32(records.len() as u32);
                for r in records {
                    o.u64(r.id);
                    o.u8(kind_byte(r.kind));
                    o.u64(r.ts);
                    o.u64(r.ready_at);
                    o.u64(r.expires_at.map_or(0, |at| at.saturating_add(1)));
                    o.bytes(&r.payload);
                }
            }
            Record::QueueRemove { queue, ids } => {
                o.u8(5);
                o.bytes(queue.as_str().as_bytes());
                o.u32(ids.len() as u32);
                for id in ids {
                    o.u64(*id);
                }
            }
            Record::QueueHead { queue, next_id } => {
                o.u8(6);
                o.bytes(queue.as_str().as_bytes());
                o.u64(*next_id);
            }
            Record::CheckpointBegin { heads_only: false } => o.u8(7),
            Record::CheckpointBegin { heads_only: true } => o.u8(11),
            Record::CheckpointEnd => o.u8(8),
            Record::QueueAttempts { queue, attempts } => {
                o.u8(9);
                o.bytes(queue.as_str().as_bytes());
                o.u32(attempts.len() as u32);
                for (id, n) in attempts {
                    o.u64(*id);
                    o.u32(*n);
                }
            }
        }
    }

    /// Decodes the record at the start of `buf`; returns it and its framed length.
    pub fn decode(buf: &[u8]) -> Result<(Record, usize), DecodeError> {
        Self::decode_with(buf, &mut Names::default())
    }

    /// [`Record::decode`], reusing the names of earlier records from `names`: replaying
    /// a log of many small records to one topic then allocates no name per record.
    pub fn decode_with(buf: &[u8], names: &mut Names) -> Result<(Record, usize), DecodeError> {
        if buf.len() < HEADER {
            return Err(DecodeError::Truncated);
        }
        let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
        if len == 0 || len > MAX_RECORD {
            return Err(DecodeError::Damaged("impossible length"));
        }
        let Some(body) = buf.get(HEADER..HEADER + len) else {
            return Err(DecodeError::Truncated);
        };
        if crc32fast::hash(body) != crc {
            return Err(DecodeError::Damaged("checksum mismatch"));
        }
        let mut i = In { buf: body, pos: 1, names };
        let record = match body[0] {
            1 => {
                let topic = i.topic()?;
                let (generation, first, n) = (i.u64()?, i.u64()?, i.u32()?);
                let mut entries = Vec::with_capacity(n.min(65_536) as usize);
                for _ in 0..n {
                    let ts = i.u64()?;
                    let kind = i.kind()?;
                    let ttl = i.u64()?;
                    let payload = i.bytes()?;
                    entries.push((ts, NewMessage { kind, payload, ttl_ms: ttl.checked_sub(1) }));
                }
                Record::TopicAppend { topic, generation, first, entries }
            }
            2 => Record::TopicDelete { topic: i.topic()?, generation: i.u64()? },
            3 => {
                let (topic, generation) = (i.topic()?, i.u64()?);
                Record::TopicHead { topic, generation, first: 0, next: i.u64()?, last_ts: i.u64()? }
            }
            10 => {
                let (topic, generation, first) = (i.topic()?, i.u64()?, i.u64()?);
                Record::TopicHead { topic, generation, first, next: i.u64()?, last_ts: i.u64()? }
            }
            4 => {
                let queue = i.queue()?;
                let n = i.u32()?;
                let mut records = Vec::with_capacity(n.min(65_536) as usize);
                for _ in 0..n {
                    let (id, kind, ts, ready_at, expires) = (i.u64()?, i.kind()?, i.u64()?, i.u64()?, i.u64()?);
                    let payload = i.bytes()?;
                    records.push(QueueRecord { id, kind, payload, ts, ready_at, expires_at: expires.checked_sub(1) });
                }
                Record::QueueEnqueue { queue, records }
            }
            5 => {
                let queue = i.queue()?;
                let n = i.u32()?;
                let ids = (0..n).map(|_| i.u64()).collect::<Result<_, _>>()?;
                Record::QueueRemove { queue, ids }
            }
            6 => Record::QueueHead { queue: i.queue()?, next_id: i.u64()? },
            7 => Record::CheckpointBegin { heads_only: false },
            11 => Record::CheckpointBegin { heads_only: true },
            8 => Record::CheckpointEnd,
            9 => {
                let queue = i.queue()?;
                let n = i.u32()?;
                let attempts = (0..n).map(|_| Ok((i.u64()?, i.u32()?))).collect::<Result<_, DecodeError>>()?;
                Record::QueueAttempts { queue, attempts }
            }
            _ => return Err(DecodeError::Damaged("unknown record type")),
        };
        if i.pos != body.len() {
            return Err(DecodeError::Damaged("trailing bytes in record"));
        }
        Ok((record, HEADER + len))
    }
}

/// The last topic and queue names decoded, shared by the records that follow.
#[derive(Debug, Default)]
pub struct Names {
    topic: Option<TopicName>,
    queue: Option<QueueName>,
}

struct In<'a, 'n> {
    buf: &'a [u8],
    pos: usize,
    names: &'n mut Names,
}

impl<'a> In<'a, '_> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Damaged("length overflow"))?;
        let s = self.buf.get(self.pos..end).ok_or(DecodeError::Damaged("field past record end"))?;
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self) -> Result<Bytes, DecodeError> {
        let n = self.u32()? as usize;
        Ok(Bytes::copy_from_slice(self.take(n)?))
    }
    fn kind(&mut self) -> Result<Kind, DecodeError> {
        match self.take(1)?[0] {
            0 => Ok(Kind::Json),
            1 => Ok(Kind::Text),
            2 => Ok(Kind::Binary),
            _ => Err(DecodeError::Damaged("unknown kind")),
        }
    }
    fn str(&mut self) -> Result<&'a str, DecodeError> {
        let n = self.u32()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| DecodeError::Damaged("name is not UTF-8"))
    }
    fn topic(&mut self) -> Result<TopicName, DecodeError> {
        let s = self.str()?;
        cached(&mut self.names.topic, s, TopicName::as_str, || {
            TopicName::parse(s).map_err(|_| DecodeError::Damaged("invalid topic name"))
        })
    }
    fn queue(&mut self) -> Result<QueueName, DecodeError> {
        let s = self.str()?;
        cached(&mut self.names.queue, s, QueueName::as_str, || {
            QueueName::parse(s).map_err(|_| DecodeError::Damaged("invalid queue name"))
        })
    }
}

/// The name in `slot` if it reads `s`, else `parse`d and kept there for the next record.
fn cached<N: Clone>(
    slot: &mut Option<N>,
    s: &str,
    as_str: fn(&N) -> &str,
    parse: impl FnOnce() -> Result<N, DecodeError>,
) -> Result<N, DecodeError> {
    if let Some(name) = slot.as_ref().filter(|name| as_str(name) == s) {
        return Ok(name.clone());
    }
    let name = parse()?;
    *slot = Some(name.clone());
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Record> {
        let topic = TopicName::parse("a.b").expect("name");
        let queue = QueueName::parse("jobs").expect("name");
        vec![
            Record::TopicAppend {
                topic: topic.clone(),
                generation: 2,
                first: 7,
                entries: vec![
                    (100, NewMessage { kind: Kind::Json, payload: Bytes::from_static(b"{}"), ttl_ms: Some(0) }),
                    (101, NewMessage { kind: Kind::Binary, payload: Bytes::new(), ttl_ms: None }),
                ],
            },
            Record::TopicDelete { topic: topic.clone(), generation: 3 },
            Record::TopicHead { topic: topic.clone(), generation: 3, first: 4, next: 9, last_ts: 101 },
            Record::QueueEnqueue {
                queue: queue.clone(),
                records: vec![QueueRecord {
                    id: 5,
                    kind: Kind::Text,
                    payload: Bytes::from_static(b"job"),
                    ts: 1,
                    ready_at: 2,
                    expires_at: Some(3),
                }],
            },
            Record::QueueRemove { queue: queue.clone(), ids: vec![5, 6] },
            Record::QueueHead { queue: queue.clone(), next_id: 7 },
            Record::QueueAttempts { queue, attempts: vec![(5, 2), (6, 1)] },
            Record::CheckpointBegin { heads_only: false },
            Record::CheckpointBegin { heads_only: true },
            Record::CheckpointEnd,
        ]
    }

    #[test]
    fn records_round_trip() -> Result<(), DecodeError> {
        let mut buf = Vec::new();
        for r in samples() {
            r.encode(&mut buf);
        }
        let mut pos = 0;
        for want in samples() {
            let (got, len) = Record::decode(&buf[pos..])?;
            assert_eq!(got, want);
            pos += len;
        }
        assert_eq!(pos, buf.len());
        Ok(())
    }

    /// Fuzz harness (proptest, stable Rust): a frame whose header is valid (length and
    /// CRC match) around any type byte and body decodes or is refused as damaged, never
    /// panics and never claims more bytes than the frame holds. Bodies cut from the
    /// sample records (every prefix, with each type byte) are replayed on every run.
    fn framed(body: &[u8]) -> Vec<u8> {
        let mut buf = Vec::with_capacity(HEADER + body.len());
        buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
        buf.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
        buf.extend_from_slice(body);
        buf
    }

    fn decodes_within(buf: &[u8]) {
        if let Ok((_, len)) = Record::decode(buf) {
            assert!(len <= buf.len());
        }
    }

    #[test]
    fn valid_frames_around_cut_bodies_decode_or_are_refused() {
        for r in samples() {
            let mut buf = Vec::new();
            r.encode(&mut buf);
            let body = &buf[HEADER..];
            for cut in 0..=body.len() {
                for kind in 0..=10u8 {
                    let mut b = body[..cut].to_vec();
                    if let Some(first) = b.first_mut() {
                        *first = kind;
                    }
                    decodes_within(&framed(&b));
                }
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn any_framed_body_decodes_or_is_refused(kind in 0u8..13, body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let mut b = vec![kind];
            b.extend_from_slice(&body);
            decodes_within(&framed(&b));
        }
    }

    #[test]
    fn torn_and_flipped_records_are_detected() {
        let mut buf = Vec::new();
        samples()[0].encode(&mut buf);
        for cut in 0..buf.len() {
            assert!(Record::decode(&buf[..cut]).is_err(), "cut at {cut}");
        }
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert!(Record::decode(&bad).is_err(), "flip at {i}");
        }
    }
}
