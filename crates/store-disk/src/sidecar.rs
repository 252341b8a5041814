//! Sidecar files and cold reads. When the writer seals a segment `N.log`, it writes
//! `N.idx` beside it: for every run of topic messages in the segment, the run's topic,
//! generation, offsets, newest time and bytes, and a block with the position of each
//! of its records. A start-up reads only the run tables of the sidecars (not the
//! segments); a read of cold history reads one run's block, then its records.
//!
//! Layout, little endian: `HRLDIDX1`, the position blocks (24 bytes per record:
//! offset, position, length, count), the run table (per run: topic, generation, first,
//! end, newest time, bytes, block position, record count, block CRC), and a 32-byte
//! trailer (table position and length, run count, table CRC, `HRLDIDXE`). A sidecar is
//! derived data: one that is missing or fails its checks is rebuilt from its segment.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use herald_core::{Message, StoreError, TopicName};

use crate::index::{add_record, Loc, Locs, Run, SealedRun};
use crate::record::{Names, Record};

const MAGIC: &[u8; 8] = b"HRLDIDX1";
const END_MAGIC: &[u8; 8] = b"HRLDIDXE";
const LOC_BYTES: usize = 24;
const TRAILER: usize = 32;
/// Records read from the log are fetched in reads of at most this many bytes; records
/// closer than [`GAP`] are fetched in one read with what lies between.
const MAX_READ: u64 = 4 << 20;
const GAP: u64 = 64 << 10;

pub(crate) fn sidecar_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.idx"))
}

fn encode_locs(locs: &[Loc], out: &mut Vec<u8>) {
    for l in locs {
        out.extend_from_slice(&l.offset.to_le_bytes());
        out.extend_from_slice(&l.pos.to_le_bytes());
        out.extend_from_slice(&l.len.to_le_bytes());
        out.extend_from_slice(&l.count.to_le_bytes());
    }
}

fn decode_locs(buf: &[u8]) -> Vec<Loc> {
    buf.chunks_exact(LOC_BYTES)
        .map(|c| Loc {
            offset: u64::from_le_bytes(c[0..8].try_into().unwrap_or_default()),
            pos: u64::from_le_bytes(c[8..16].try_into().unwrap_or_default()),
            len: u32::from_le_bytes(c[16..20].try_into().unwrap_or_default()),
            count: u32::from_le_bytes(c[20..24].try_into().unwrap_or_default()),
        })
        .collect()
}

/// Writes the sidecar of segment `seq` for `runs` (their positions in memory), through
/// a temporary file synced and renamed into place. Returns each run's block, to point the index at.
pub(crate) fn write(dir: &Path, seq: u64, runs: &[SealedRun]) -> std::io::Result<Vec<(TopicName, u64, u64, Locs)>> {
    let mut buf = Vec::with_capacity(MAGIC.len());
    buf.extend_from_slice(MAGIC);
    let mut blocks = Vec::with_capacity(runs.len());
    for r in runs {
        let Locs::Memory(locs) = &r.run.locs else { continue };
        let pos = buf.len() as u64;
        encode_locs(locs, &mut buf);
        let crc = crc32fast::hash(&buf[pos as usize..]);
        blocks.push((r, pos, locs.len() as u32, crc));
    }
    let table_pos = buf.len() as u64;
    for &(r, pos, count, crc) in &blocks {
        let name = r.topic.as_str().as_bytes();
        buf.extend_from_slice(&(name.len() as u32).to_le_bytes());
        buf.extend_from_slice(name);
        for v in [r.generation, r.run.first, r.run.end, r.run.last_ts, r.run.bytes, pos] {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        buf.extend_from_slice(&count.to_le_bytes());
        buf.extend_from_slice(&crc.to_le_bytes());
    }
    let table_len = buf.len() as u64 - table_pos;
    let table_crc = crc32fast::hash(&buf[table_pos as usize..]);
    buf.extend_from_slice(&table_pos.to_le_bytes());
    buf.extend_from_slice(&table_len.to_le_bytes());
    buf.extend_from_slice(&(blocks.len() as u32).to_le_bytes());
    buf.extend_from_slice(&table_crc.to_le_bytes());
    buf.extend_from_slice(END_MAGIC);
    let path = sidecar_path(dir, seq);
    let tmp = path.with_extension("idx.tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(&buf)?;
    // Synced before it takes its name: a sidecar that exists is whole (one that a crash
    // left missing is rebuilt from its segment).
    f.sync_data()?;
    drop(f);
    std::fs::rename(&tmp, &path)?;
    Ok(blocks
        .into_iter()
        .map(|(r, pos, count, crc)| (r.topic.clone(), r.generation, r.run.first, Locs::Sidecar { pos, count, crc }))
        .collect())
}

/// The runs listed by segment `seq`'s sidecar, or `None` if it is missing or fails a
/// check (then the segment is scanned instead). Reads the run table only.
pub(crate) fn load(dir: &Path, seq: u64) -> Option<Vec<SealedRun>> {
    let f = File::open(sidecar_path(dir, seq)).ok()?;
    let len = f.metadata().ok()?.len();
    if len < (MAGIC.len() + TRAILER) as u64 {
        return None;
    }
    let mut trailer = [0u8; TRAILER];
    f.read_exact_at(&mut trailer, len - TRAILER as u64).ok()?;
    if &trailer[24..32] != END_MAGIC {
        return None;
    }
    let u64_at = |b: &[u8], i: usize| b.get(i..i + 8).and_then(|s| s.try_into().ok()).map(u64::from_le_bytes);
    let u32_at = |b: &[u8], i: usize| b.get(i..i + 4).and_then(|s| s.try_into().ok()).map(u32::from_le_bytes);
    let (table_pos, table_len) = (u64_at(&trailer, 0)?, u64_at(&trailer, 8)?);
    let (runs, table_crc) = (u32_at(&trailer, 16)?, u32_at(&trailer, 20)?);
    if table_pos.checked_add(table_len)? != len - TRAILER as u64 {
        return None;
    }
    let mut table = vec![0u8; usize::try_from(table_len).ok()?];
    f.read_exact_at(&mut table, table_pos).ok()?;
    if crc32fast::hash(&table) != table_crc {
        return None;
    }
    let mut out = Vec::with_capacity(runs as usize);
    let mut i = 0;
    let mut names: HashMap<&[u8], TopicName> = HashMap::new();
    for _ in 0..runs {
        let n = u32_at(&table, i)? as usize;
        let name = table.get(i + 4..i + 4 + n)?;
        i += 4 + n;
        let topic = match names.get(name) {
            Some(t) => t.clone(),
            None => {
                let t = TopicName::parse(std::str::from_utf8(name).ok()?).ok()?;
                names.insert(name, t.clone());
                t
            }
        };
        let v: Vec<u64> = (0..6).map(|k| u64_at(&table, i + 8 * k)).collect::<Option<_>>()?;
        let (count, crc) = (u32_at(&table, i + 48)?, u32_at(&table, i + 52)?);
        i += 56;
        let locs = Locs::Sidecar { pos: v[5], count, crc };
        let run = Run { seg: seq, first: v[1], end: v[2], last_ts: v[3], bytes: v[4], locs };
        out.push(SealedRun { topic, generation: v[0], run });
    }
    (i == table.len()).then_some(out)
}

/// The runs of segment `seq` found by reading it whole (its sidecar was missing or
/// damaged), positions in memory; and where its valid records end, with the damage
/// found there, if any.
pub(crate) fn scan_runs(path: &Path, seq: u64) -> std::io::Result<(Vec<SealedRun>, u64, Option<String>)> {
    let data = std::fs::read(path)?;
    let mut names = Names::default();
    let mut runs: HashMap<(TopicName, u64), VecDeque<Run>> = HashMap::new();
    let mut order = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        match Record::decode_with(&data[pos..], &mut names) {
            Ok((record, len)) => {
                if let Record::TopicAppend { topic, generation, first, entries } = record {
                    let loc = Loc { offset: first, pos: pos as u64, len: len as u32, count: entries.len() as u32 };
                    let last_ts = entries.iter().map(|(ts, _)| *ts).max().unwrap_or(0);
                    let bytes = entries.iter().map(|(_, m)| m.payload.len() as u64).sum();
                    let key = (topic, generation);
                    if !runs.contains_key(&key) {
                        order.push(key.clone());
                    }
                    add_record(runs.entry(key).or_default(), seq, loc, last_ts, bytes);
                }
                pos += len;
            }
            Err(e) => return Ok((flatten(runs, order), pos as u64, Some(e.to_string()))),
        }
    }
    Ok((flatten(runs, order), pos as u64, None))
}

fn flatten(mut runs: HashMap<(TopicName, u64), VecDeque<Run>>, order: Vec<(TopicName, u64)>) -> Vec<SealedRun> {
    let mut out = Vec::new();
    for key in order {
        if let Some(list) = runs.remove(&key) {
            let (topic, generation) = key;
            out.extend(list.into_iter().map(|run| SealedRun { topic: topic.clone(), generation, run }));
        }
    }
    out
}

/// A position block: its segment and its place in the sidecar.
type BlockKey = (u64, u64);

/// The position blocks read last from sidecars, so a replay reading a run in chunks
/// reads its block once.
#[derive(Default)]
pub(crate) struct BlockCache {
    recent: Mutex<VecDeque<(BlockKey, Arc<[Loc]>)>>,
}

impl BlockCache {
    /// Blocks kept (each at most 4096 positions, 96 KiB).
    const BLOCKS: usize = 32;

    fn get(&self, key: BlockKey) -> Option<Arc<[Loc]>> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.iter().find(|(k, _)| *k == key).map(|(_, locs)| locs.clone())
    }

    fn put(&self, key: BlockKey, locs: Arc<[Loc]>) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() >= Self::BLOCKS {
            recent.pop_front();
        }
        recent.push_back((key, locs));
    }
}

/// What a cold read returns messages for.
pub(crate) struct ColdRead<'a> {
    pub dir: &'a Path,
    pub blocks: &'a BlockCache,
    pub topic: &'a TopicName,
    pub generation: u64,
    pub now: u64,
    pub max_age_ms: u64,
}

impl ColdRead<'_> {
    fn damaged(&self, path: &Path, at: u64, what: &str) -> StoreError {
        StoreError::Unavailable(format!("damaged log: {} at byte {at}: {what}", path.display()))
    }

    /// Reads the messages `from..end` of one run (in segment `seg`, positions `locs`)
    /// into `out`, up to `limit` in all, skipping those past their TTL or age. A segment
    /// deleted meanwhile (its messages trimmed) reads as nothing.
    pub(crate) fn run(
        &self,
        seg: u64,
        locs: Locs,
        from: u64,
        end: u64,
        limit: usize,
        out: &mut Vec<Arc<Message>>,
    ) -> Result<(), StoreError> {
        let locs = match locs {
            Locs::Memory(locs) => locs,
            Locs::Sidecar { pos, count, crc } => {
                let locs = match self.blocks.get((seg, pos)) {
                    Some(locs) => locs,
                    None => {
                        let path = sidecar_path(self.dir, seg);
                        let mut buf = vec![0u8; count as usize * LOC_BYTES];
                        match File::open(&path).and_then(|f| f.read_exact_at(&mut buf, pos)) {
                            Ok(()) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                            Err(e) => return Err(StoreError::Unavailable(format!("{}: {e}", path.display()))),
                        }
                        if crc32fast::hash(&buf) != crc {
                            return Err(self.damaged(&path, pos, "checksum mismatch in a position block"));
                        }
                        let locs: Arc<[Loc]> = decode_locs(&buf).into();
                        self.blocks.put((seg, pos), locs.clone());
                        locs
                    }
                };
                let start = locs.partition_point(|l| l.offset + u64::from(l.count) <= from);
                let stop = locs.partition_point(|l| l.offset < end);
                locs[start..stop.max(start)].to_vec()
            }
        };
        let path = crate::wal::segment_path(self.dir, seg);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StoreError::Unavailable(format!("{}: {e}", path.display()))),
        };
        let mut names = Names::default();
        let mut i = 0;
        while i < locs.len() && out.len() < limit {
            // One read for the records from `i` on that lie close together.
            let start = locs[i].pos;
            let mut stop = start + u64::from(locs[i].len);
            let mut j = i + 1;
            while j < locs.len() && locs[j].pos >= stop && locs[j].pos - stop <= GAP {
                let next_stop = locs[j].pos + u64::from(locs[j].len);
                if next_stop - start > MAX_READ {
                    break;
                }
                stop = next_stop;
                j += 1;
            }
            let mut buf = vec![0u8; (stop - start) as usize];
            file.read_exact_at(&mut buf, start)
                .map_err(|e| StoreError::Unavailable(format!("{} at byte {start}: {e}", path.display())))?;
            for loc in &locs[i..j] {
                let at = (loc.pos - start) as usize;
                let bytes = &buf[at..at + loc.len as usize];
                let record =
                    Record::decode_with(bytes, &mut names).map_err(|e| self.damaged(&path, loc.pos, &e.to_string()))?;
                let Record::TopicAppend { topic, generation, first, entries } = record.0 else {
                    return Err(self.damaged(&path, loc.pos, "not the topic record the index names"));
                };
                if &topic != self.topic || generation != self.generation || first != loc.offset {
                    return Err(self.damaged(&path, loc.pos, "not the topic record the index names"));
                }
                for (k, (ts, new)) in entries.into_iter().enumerate() {
                    let offset = first + k as u64;
                    if offset < from || offset >= end || out.len() >= limit {
                        continue;
                    }
                    let m = Message::new(topic.clone(), offset, ts, new);
                    if !m.is_expired(self.now) && self.now.saturating_sub(m.ts) < self.max_age_ms {
                        out.push(Arc::new(m));
                    }
                }
            }
            i = j;
        }
        Ok(())
    }
}
