//! The topic index of the disk store: for every topic, its head (epoch, next offset,
//! newest time), where its retained messages lie in the log, and a bounded cache of its
//! newest messages. History is cold: a retained message costs memory only while it is
//! in the cache; older ones are read back from the log when asked for.
//!
//! A topic's retained messages are described by *runs*: consecutive offsets of one
//! generation in one segment, at most [`RUN_MESSAGES`] of them, with the position of
//! each record in the segment. The positions of the active segment's runs are held in
//! memory; when a segment is sealed they move to its sidecar file (`sidecar.rs`) and a
//! run keeps only where they are there. So memory grows with the number of runs, not
//! with the number of messages, and a start-up reads sidecars instead of the log.
//!
//! Retention by count is exact. The cache's part of a history is trimmed by age, bytes
//! and TTL message by message, as the memory store does; the cold part a whole run at a
//! time (a run is dropped once all of it is past the age limit, or once the rest still
//! holds `max_bytes`), and reads skip any message past its age or TTL.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use herald_core::{
    Appended, Clock, Entry, Epoch, ListedTopic, Message, NewMessage, RetentionConfig, TopicHead, TopicName,
};

/// Messages one run holds at most: a run's positions are read as one block.
pub(crate) const RUN_MESSAGES: u64 = 4096;
/// Bytes the cache counts for an entry beside its payload.
const ENTRY_OVERHEAD: u64 = 64;
/// Cache appends remembered for eviction at most (older ones are evicted early).
const MAX_FIFO: usize = 1 << 16;
const SHARDS: usize = 32;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where one log record of a run is: the record holds messages `offset..offset+count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Loc {
    pub offset: u64,
    pub pos: u64,
    pub len: u32,
    pub count: u32,
}

/// Where a run's record positions are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Locs {
    /// In memory: the run is in the active segment (or not yet sealed).
    Memory(Vec<Loc>),
    /// In the segment's sidecar, `count` positions from byte `pos`, with their checksum.
    Sidecar { pos: u64, count: u32, crc: u32 },
}

/// Consecutive offsets `first..end` of one topic's generation in segment `seg`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Run {
    pub seg: u64,
    pub first: u64,
    pub end: u64,
    /// Newest timestamp of its messages.
    pub last_ts: u64,
    /// Payload bytes of its messages still retained.
    pub bytes: u64,
    pub locs: Locs,
}

/// Bytes the cache counts for a message.
fn cost(e: &Entry) -> u64 {
    e.payload_len() as u64 + ENTRY_OVERHEAD
}

/// One topic.
struct Topic {
    epoch: Epoch,
    generation: u64,
    next: u64,
    last_ts: u64,
    /// No retained message is below this offset (trimming moves it up).
    first: u64,
    runs: VecDeque<Run>,
    /// Payload bytes of `runs`.
    bytes: u64,
    /// The cache: messages `hot_first..hot_first + hot.len()`, the newest retained.
    hot: VecDeque<Entry>,
    hot_first: u64,
}

impl Topic {
    fn new(epoch: Epoch, generation: u64) -> Self {
        Self {
            epoch,
            generation,
            next: 1,
            last_ts: 0,
            first: 1,
            runs: VecDeque::new(),
            bytes: 0,
            hot: VecDeque::new(),
            hot_first: 1,
        }
    }

    /// The oldest and newest retained offsets, if any is retained.
    fn range(&self) -> Option<(u64, u64)> {
        let front = self.runs.front()?;
        let back = self.runs.back()?;
        let first = self.first.max(front.first);
        (first < back.end).then_some((first, back.end - 1))
    }

    fn head(&self) -> TopicHead {
        let (first, last) = self.range().unwrap_or((0, 0));
        let retained = if last == 0 { 0 } else { last - first + 1 };
        TopicHead { epoch: self.epoch.clone(), first, last, next: self.next, retained }
    }

    /// Empties the cache; returns the bytes it counted.
    fn drop_hot(&mut self) -> u64 {
        let freed = self.hot.iter().map(cost).sum();
        self.hot.clear();
        freed
    }

    /// Drops cached messages below `end`; returns the bytes freed.
    fn evict_below(&mut self, end: u64) -> u64 {
        let mut freed = 0;
        while self.hot_first < end {
            let Some(e) = self.hot.pop_front() else { break };
            freed += cost(&e);
            self.hot_first += 1;
        }
        // A cache that held many and holds few gives the slots back.
        if freed > 0 && self.hot.capacity() > 64 && self.hot.len() < self.hot.capacity() / 4 {
            self.hot.shrink_to(self.hot.len() * 2);
        }
        freed
    }

    /// Takes the payload bytes of the retained messages below `to` off the counts, before
    /// `first` moves there: exactly where they are cached, else by their share of their
    /// run's messages (a run's bytes are all that is known of it).
    fn discount(&mut self, to: u64) {
        let Some((first, _)) = self.range() else { return };
        let mut offset = first;
        for run in self.runs.iter_mut() {
            if offset >= to {
                break;
            }
            if run.end <= offset {
                continue;
            }
            let stop = to.min(run.end);
            let taken = if !self.hot.is_empty() && offset >= self.hot_first {
                let skip = (offset - self.hot_first) as usize;
                self.hot.iter().skip(skip).take((stop - offset) as usize).map(|e| e.payload_len() as u64).sum()
            } else {
                run.bytes * (stop - offset) / (run.end - offset)
            };
            run.bytes = run.bytes.saturating_sub(taken);
            self.bytes = self.bytes.saturating_sub(taken);
            offset = stop;
        }
    }

    /// Applies retention: exact by count, and by age, bytes and TTL message by message
    /// where the oldest retained message is cached, a run at a time where it is not.
    /// Returns the cache bytes freed.
    fn trim(&mut self, now: u64, retention: &RetentionConfig) -> u64 {
        let max_age = retention.max_age.as_millis() as u64;
        let too_old = |ts: u64| now.saturating_sub(ts) >= max_age;
        if self.next.saturating_sub(self.first) > retention.max_messages {
            let to = self.next - retention.max_messages;
            self.discount(to);
            self.first = to;
        }
        let mut freed = 0;
        loop {
            freed += self.evict_below(self.first);
            let Some((first, last)) = self.range() else { break };
            // Runs wholly trimmed go.
            if let Some(front) = self.runs.front() {
                if front.end <= first {
                    self.bytes = self.bytes.saturating_sub(front.bytes);
                    self.runs.pop_front();
                    continue;
                }
            }
            let over_bytes = retention.max_bytes > 0 && self.bytes > retention.max_bytes && first < last;
            if self.hot_first == first && !self.hot.is_empty() {
                // The oldest retained message is cached: trim exactly.
                let Some(e) = self.hot.front() else { break };
                if over_bytes || too_old(e.ts()) || e.is_expired(now) {
                    self.discount(first + 1);
                    self.first = first + 1;
                    continue;
                }
                break;
            }
            // Cold: a whole run at a time.
            let Some(front) = self.runs.front() else { break };
            let rest_holds_limit = retention.max_bytes > 0
                && self.runs.len() > 1
                && self.bytes.saturating_sub(front.bytes) >= retention.max_bytes;
            if too_old(front.last_ts) || rest_holds_limit {
                self.first = front.end;
                continue;
            }
            break;
        }
        if self.range().is_none() {
            self.bytes = 0;
            self.runs.clear();
            self.first = self.next;
            freed += self.drop_hot();
            self.hot_first = self.next;
        }
        freed
    }

    /// The next step of a read from offset `from` to `until`, for at most `limit`
    /// messages: cached messages, or a run to read from the log.
    fn step(
        &self,
        topic: &TopicName,
        now: u64,
        retention: &RetentionConfig,
        from: u64,
        until: u64,
        limit: usize,
    ) -> Step {
        if limit == 0 {
            return Step::Done;
        }
        let Some((first, last)) = self.range() else { return Step::Done };
        let from = from.max(first);
        let until = until.min(last);
        if from > until {
            return Step::Done;
        }
        if !self.hot.is_empty() && from >= self.hot_first {
            let skip = (from - self.hot_first) as usize;
            let max_age = retention.max_age.as_millis() as u64;
            let out = self
                .hot
                .iter()
                .enumerate()
                .skip(skip)
                .map(|(i, e)| (self.hot_first + i as u64, e))
                .take_while(|(offset, _)| *offset <= until)
                .filter(|(_, e)| !e.is_expired(now) && now.saturating_sub(e.ts()) < max_age)
                .take(limit)
                .map(|(offset, e)| e.message(topic, offset))
                .collect();
            return Step::Hot(out);
        }
        // The run holding `from`, or the first one after it (runs may have gaps).
        let i = self.runs.partition_point(|r| r.end <= from);
        let Some(run) = self.runs.get(i) else { return Step::Done };
        let from = from.max(run.first);
        // No more than the read may return: the rest is the next step's.
        let end = run.end.min(until + 1).min(from.saturating_add(limit as u64));
        let locs = match &run.locs {
            Locs::Memory(locs) => {
                let start = locs.partition_point(|l| l.offset + u64::from(l.count) <= from);
                let stop = locs.partition_point(|l| l.offset < end);
                Locs::Memory(locs[start..stop].to_vec())
            }
            sidecar => sidecar.clone(),
        };
        Step::Cold { seg: run.seg, locs, from, end }
    }
}

/// Adds a record's place to a topic's runs: to the newest run if it continues it in the
/// same segment with room left, else as a new run.
pub(crate) fn add_record(runs: &mut VecDeque<Run>, seg: u64, loc: Loc, last_ts: u64, bytes: u64) {
    let count = u64::from(loc.count);
    if let Some(run) = runs.back_mut() {
        if run.seg == seg && run.end == loc.offset && run.end + count - run.first <= RUN_MESSAGES {
            if let Locs::Memory(locs) = &mut run.locs {
                locs.push(loc);
                run.end += count;
                run.last_ts = run.last_ts.max(last_ts);
                run.bytes += bytes;
                return;
            }
        }
    }
    runs.push_back(Run {
        seg,
        first: loc.offset,
        end: loc.offset + count,
        last_ts,
        bytes,
        locs: Locs::Memory(vec![loc]),
    });
}

/// Where an append was written: segment `seg`, one [`Part`] per record in order.
pub(crate) struct Written<'a> {
    pub seg: u64,
    pub parts: &'a [Part],
}

/// One record appended to a topic: where it is, and its messages' offsets.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Part {
    pub pos: u64,
    pub len: u32,
    pub count: u32,
}

/// What a read must do next.
pub(crate) enum Step {
    /// Nothing more in range.
    Done,
    /// These cached messages finish the read.
    Hot(Vec<Arc<Message>>),
    /// Read `locs` (or the sidecar block) from segment `seg` for offsets `from..end`.
    Cold { seg: u64, locs: Locs, from: u64, end: u64 },
}

/// A topic's head as a checkpoint writes it.
pub(crate) struct HeadSnapshot {
    pub topic: TopicName,
    pub generation: u64,
    pub first: u64,
    pub next: u64,
    pub last_ts: u64,
}

/// A run of a sealed segment, as its sidecar lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SealedRun {
    pub topic: TopicName,
    pub generation: u64,
    pub run: Run,
}

/// The topic index; see the module docs.
pub(crate) struct Index {
    shards: Box<[Mutex<HashMap<TopicName, Topic>>]>,
    hasher: RandomState,
    identity: String,
    fresh_epoch: Epoch,
    epochs: AtomicU64,
    clock: Arc<dyn Clock>,
    pub(crate) retention: RetentionConfig,
    cache: Cache,
}

/// The cache's bound: bytes held, and the order topics were appended to, oldest first,
/// so the oldest cached messages are evicted first whatever their topic.
struct Cache {
    limit: u64,
    used: AtomicU64,
    fifo: Mutex<VecDeque<(TopicName, u64, u64)>>,
}

impl Index {
    pub(crate) fn new(retention: RetentionConfig, clock: Arc<dyn Clock>, identity: String, cache_bytes: u64) -> Self {
        let fresh_epoch: Epoch = Arc::from(format!("{identity}-0"));
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            identity,
            fresh_epoch,
            epochs: AtomicU64::new(0),
            clock,
            retention,
            cache: Cache { limit: cache_bytes, used: AtomicU64::new(0), fifo: Mutex::new(VecDeque::new()) },
        }
    }

    fn shard(&self, topic: &TopicName) -> MutexGuard<'_, HashMap<TopicName, Topic>> {
        let i = self.hasher.hash_one(topic) as usize % self.shards.len();
        lock(&self.shards[i])
    }

    fn epoch_of(&self, generation: u64) -> Epoch {
        if generation == 0 {
            self.fresh_epoch.clone()
        } else {
            Arc::from(format!("{}-{generation}", self.identity))
        }
    }

    fn freed(&self, bytes: u64) {
        if bytes > 0 {
            self.cache.used.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    /// The time reads filter by.
    pub(crate) fn now(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Slots the topics' caches have allocated.
    #[cfg(test)]
    pub(crate) fn cache_slots(&self) -> usize {
        self.shards.iter().map(|s| lock(s).values().map(|t| t.hot.capacity()).sum::<usize>()).sum()
    }

    /// Bytes the cache holds now: as counted, and as found in every topic's cache.
    #[cfg(test)]
    pub(crate) fn cached_bytes(&self) -> (u64, u64) {
        let found =
            self.shards.iter().map(|s| lock(s).values().flat_map(|t| t.hot.iter()).map(cost).sum::<u64>()).sum();
        (self.cache.used.load(Ordering::Relaxed), found)
    }

    /// Records committed messages at offsets `first..`, written where `at` says.
    /// Messages at offsets the index already holds (a checkpoint of the old format
    /// repeats them) are skipped. Returns them as stored messages when
    /// `build` (the writer answers appends with them), else an empty list.
    pub(crate) fn append(
        &self,
        topic: &TopicName,
        generation: u64,
        first: u64,
        entries: Vec<(u64, NewMessage)>,
        at: Written<'_>,
        build: bool,
    ) -> Appended {
        let Written { seg, parts } = at;
        let now = self.clock.now_ms();
        let mut messages = Vec::with_capacity(if build { entries.len() } else { 0 });
        let (epoch, end, freed, added) = {
            let mut shard = self.shard(topic);
            let t = shard.entry(topic.clone()).or_insert_with(|| Topic::new(self.epoch_of(generation), generation));
            let mut freed = 0;
            if t.generation != generation {
                freed += t.drop_hot();
                *t = Topic::new(self.epoch_of(generation), generation);
            }
            let held_end = t.runs.back().map_or(0, |r| r.end);
            let mut added = 0;
            let mut entries = entries.into_iter();
            let mut offset = first;
            for part in parts {
                let count = u64::from(part.count);
                let record = entries.by_ref().take(part.count as usize);
                if offset + count <= held_end {
                    record.for_each(drop);
                    offset += count;
                    continue;
                }
                if t.hot.is_empty() || t.hot_first + t.hot.len() as u64 != offset {
                    freed += t.drop_hot();
                    t.hot_first = offset;
                }
                let (mut bytes, mut last_ts) = (0, 0);
                for (i, (ts, new)) in record.enumerate() {
                    bytes += new.payload.len() as u64;
                    last_ts = last_ts.max(ts);
                    // The entry copies the payload into an allocation of its own (a
                    // slice of a larger buffer would keep all of it alive); the message
                    // returned keeps the original only while it is fanned out.
                    let msg = Message::new(topic.clone(), offset + i as u64, ts, new);
                    let entry = Entry::of(&msg);
                    added += cost(&entry);
                    if build {
                        messages.push(Arc::new(msg));
                    }
                    t.hot.push_back(entry);
                }
                let loc = Loc { offset, pos: part.pos, len: part.len, count: part.count };
                add_record(&mut t.runs, seg, loc, last_ts, bytes);
                t.bytes += bytes;
                t.next = t.next.max(offset + count);
                t.last_ts = t.last_ts.max(last_ts);
                offset += count;
            }
            freed += t.trim(now, &self.retention);
            (t.epoch.clone(), offset, freed, added)
        };
        self.cache.used.fetch_add(added, Ordering::Relaxed);
        self.freed(freed);
        if added > 0 {
            self.remember(topic, end, added);
        }
        Appended { epoch, messages }
    }

    /// Notes that `topic` was cached up to `end` (`added` bytes more), then evicts the
    /// oldest cached messages while the cache is over its bound. Appends to one topic in
    /// a row share a note until it covers a 64th of the cache, so eviction frees the
    /// oldest part of a busy topic's cache, not all of it.
    fn remember(&self, topic: &TopicName, end: u64, added: u64) {
        let chunk = (self.cache.limit / 64).max(64 << 10);
        {
            let mut fifo = lock(&self.cache.fifo);
            match fifo.back_mut() {
                Some((t, e, bytes)) if t == topic && *bytes < chunk => {
                    *e = end;
                    *bytes += added;
                }
                _ => fifo.push_back((topic.clone(), end, added)),
            }
        }
        loop {
            let oldest = {
                let mut fifo = lock(&self.cache.fifo);
                if self.cache.used.load(Ordering::Relaxed) <= self.cache.limit && fifo.len() <= MAX_FIFO {
                    break;
                }
                match fifo.pop_front() {
                    Some(oldest) => oldest,
                    None => break,
                }
            };
            let (topic, end, _) = oldest;
            let freed = self.shard(&topic).get_mut(&topic).map_or(0, |t| t.evict_below(end));
            self.freed(freed);
        }
    }

    /// Starts epoch `generation` for `topic`: its history is gone, offsets restart at 1.
    pub(crate) fn delete(&self, topic: &TopicName, generation: u64) -> Epoch {
        self.epochs.fetch_max(generation, Ordering::Relaxed);
        let epoch = self.epoch_of(generation);
        self.put(topic.clone(), Topic::new(epoch.clone(), generation));
        epoch
    }

    /// Makes `t` the state of `topic`, freeing what the one it replaces had cached.
    fn put(&self, topic: TopicName, t: Topic) {
        let old = self.shard(&topic).insert(topic, t);
        if let Some(mut old) = old {
            self.freed(old.drop_hot());
        }
    }

    /// Sets a topic's head as a checkpoint recorded it; its runs follow (from older
    /// segments' sidecars, or in an old-format checkpoint, as appends after the head).
    pub(crate) fn restore_head(&self, h: HeadSnapshot) {
        self.epochs.fetch_max(h.generation, Ordering::Relaxed);
        let mut t = Topic::new(self.epoch_of(h.generation), h.generation);
        t.next = h.next;
        t.last_ts = h.last_ts;
        t.first = h.first.max(1);
        self.put(h.topic, t);
    }

    /// Adds a sealed segment's runs at recovery, after the checkpoint's heads and before
    /// the newer segments are replayed: runs of a topic's current generation not wholly
    /// trimmed are kept. Returns how many were kept.
    pub(crate) fn restore_runs(&self, runs: Vec<SealedRun>) -> usize {
        let mut kept = 0;
        for SealedRun { topic, generation, run } in runs {
            let mut shard = self.shard(&topic);
            let Some(t) = shard.get_mut(&topic) else { continue };
            let follows = t.runs.back().is_none_or(|r| r.end <= run.first);
            if t.generation != generation || run.end <= t.first || !follows {
                continue;
            }
            t.bytes += run.bytes;
            t.runs.push_back(run);
            kept += 1;
        }
        kept
    }

    /// The highest generation given out so far.
    pub(crate) fn generation(&self) -> u64 {
        self.epochs.load(Ordering::Relaxed)
    }

    /// The generation, next offset and newest timestamp of a topic.
    pub(crate) fn assignment(&self, topic: &TopicName) -> (u64, u64, u64) {
        self.shard(topic).get(topic).map_or((0, 1, 0), |t| (t.generation, t.next, t.last_ts))
    }

    /// Applies retention to every topic (`only`: those whose name it accepts), then
    /// hands each to `f`.
    fn each_trimmed(&self, only: impl Fn(&str) -> bool, mut f: impl FnMut(&TopicName, &Topic)) {
        let now = self.clock.now_ms();
        for shard in self.shards.iter() {
            let mut freed = 0;
            let mut shard = lock(shard);
            for (topic, t) in shard.iter_mut().filter(|(topic, _)| only(topic.as_str())) {
                freed += t.trim(now, &self.retention);
                f(topic, t);
            }
            drop(shard);
            self.freed(freed);
        }
    }

    /// Every topic's head, for a checkpoint.
    pub(crate) fn heads(&self) -> Vec<HeadSnapshot> {
        let mut out = Vec::new();
        self.each_trimmed(
            |_| true,
            |topic, t| {
                out.push(HeadSnapshot {
                    topic: topic.clone(),
                    generation: t.generation,
                    first: t.range().map_or(t.next, |r| r.0),
                    next: t.next,
                    last_ts: t.last_ts,
                })
            },
        );
        out
    }

    /// The runs of segment `seg` whose positions are still in memory, to seal it.
    pub(crate) fn unsealed(&self, seg: u64) -> Vec<SealedRun> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            for (topic, t) in lock(shard).iter() {
                for run in t.runs.iter().filter(|r| r.seg == seg && matches!(r.locs, Locs::Memory(_))) {
                    out.push(SealedRun { topic: topic.clone(), generation: t.generation, run: run.clone() });
                }
            }
        }
        out
    }

    /// Points the runs of a sealed segment at their positions in its sidecar, freeing
    /// the memory they held. `blocks` pairs each run (topic, generation, first offset)
    /// with its block.
    pub(crate) fn sealed(&self, seg: u64, blocks: &[(TopicName, u64, u64, Locs)]) {
        for (topic, generation, first, locs) in blocks {
            let mut shard = self.shard(topic);
            let Some(t) = shard.get_mut(topic) else { continue };
            if t.generation != *generation {
                continue;
            }
            if let Some(run) = t.runs.iter_mut().find(|r| r.seg == seg && r.first == *first) {
                run.locs = locs.clone();
            }
        }
    }

    /// Segments some retained message is in.
    pub(crate) fn live_segments(&self) -> std::collections::BTreeSet<u64> {
        let mut out = std::collections::BTreeSet::new();
        self.each_trimmed(|_| true, |_, t| out.extend(t.runs.iter().map(|r| r.seg)));
        out
    }

    /// Applies retention to `topic`, then hands it to `f` (`None` if it has never been
    /// published or deleted).
    fn with_trimmed<T>(&self, topic: &TopicName, f: impl FnOnce(Option<&Topic>) -> T) -> T {
        let now = self.clock.now_ms();
        let mut shard = self.shard(topic);
        let mut t = shard.get_mut(topic);
        let freed = t.as_mut().map_or(0, |t| t.trim(now, &self.retention));
        let out = f(t.as_deref());
        drop(shard);
        self.freed(freed);
        out
    }

    /// The topic's head.
    pub(crate) fn head(&self, topic: &TopicName) -> TopicHead {
        self.with_trimmed(topic, |t| t.map_or_else(|| Topic::new(self.fresh_epoch.clone(), 0).head(), Topic::head))
    }

    /// Topics with retained messages, as [`herald_core::Store::list`] lists them.
    pub(crate) fn list(&self, prefix: &str, after: Option<&str>, limit: usize) -> Vec<ListedTopic> {
        let mut out = Vec::new();
        let wanted = |s: &str| s.starts_with(prefix) && after.is_none_or(|a| s > a);
        self.each_trimmed(wanted, |topic, t| {
            if let Some((_, last)) = t.range() {
                out.push(ListedTopic { topic: topic.clone(), last });
            }
        });
        out.sort_unstable_by(|a, b| a.topic.cmp(&b.topic));
        out.truncate(limit);
        out
    }

    /// Applies retention everywhere.
    pub(crate) fn sweep(&self) {
        self.each_trimmed(|_| true, |_, _| {});
    }

    /// The first step of a read of `topic` (see [`Index::step`]), with the epoch and
    /// generation the read is of.
    pub(crate) fn begin(&self, topic: &TopicName, from: u64, until: u64, limit: usize) -> (Epoch, u64, Step) {
        let now = self.clock.now_ms();
        self.with_trimmed(topic, |t| match t {
            Some(t) => (t.epoch.clone(), t.generation, t.step(topic, now, &self.retention, from, until, limit)),
            None => (self.fresh_epoch.clone(), 0, Step::Done),
        })
    }

    /// The next step of a read of `topic` in `generation` from offset `from` to `until`,
    /// for at most `limit` messages: cached messages, or a run to read from the log.
    pub(crate) fn step(&self, topic: &TopicName, generation: u64, from: u64, until: u64, limit: usize) -> Step {
        let now = self.clock.now_ms();
        self.with_trimmed(topic, |t| match t {
            Some(t) if t.generation == generation => t.step(topic, now, &self.retention, from, until, limit),
            _ => Step::Done,
        })
    }
}
