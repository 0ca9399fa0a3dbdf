//! Per-partition bookkeeping of a Kafka job consumer: which offsets are in flight, how
//! far the group may commit, and how often each in-flight record was started without
//! an outcome.
//!
//! Commit position: the first offset not yet finished, even when jobs of one partition
//! finish out of order, so a crash replays every unfinished job (at least once).
//!
//! Deliveries without an outcome: Kafka keeps no delivery count, and a record replayed
//! after a crash looks like any other. So the consumer keeps the count itself, in the
//! metadata string of the offset it commits for the partition: for each record at or
//! after the commit position that was started and has not finished, how many times it
//! was started ([`encode`]). The worker makes a start durable before it runs the handler
//! (an offset commit, see `KafkaSettle::started`); the next owner of the partition reads
//! the committed metadata when it first fetches from it ([`Ledger::load_counts`]) and
//! hands each replayed record the count of its earlier starts.
//!
//! A start is recorded in the background (a commit per start would cost fast jobs most
//! of their throughput), so the last few starts before a crash may be lost. Two rules
//! bound that, so that even a record that kills its consumer at once is counted from its
//! second start on:
//! - at most [`UNRECORDED_STARTS`] starts of a consumer may run before their commit
//!   (beyond that a start waits for it, see `KafkaSettle::started`);
//! - the metadata also carries the highest offset started (`t=`). Starts run in offset
//!   order (give or take the worker's concurrency), so the starts a crash lost lie just
//!   above it: the next owner makes every start within [`CAREFUL_SPAN`] offsets of it
//!   (or of the first offset it fetches, when no commit says) durable before the
//!   handler runs ([`Started::careful`]).
//!
//! Waiting for a commit before each start costs a slow job a commit round trip, so the
//! careful span is kept to where a crash can have lost a start, which is rarely:
//! - every owner is careful with all its starts until one of its commits has reached the
//!   broker (a claim, [`Ledger::claimed`]): a few starts wait once, and from then on
//!   the group's last commit is always one of the current owner's, whose `t=` tells
//!   where its lost starts would lie. So a partition the group never committed was
//!   never started ([`Earlier::Never`]);
//! - an owner that leaves in order (a revoke in a rebalance, or a shutdown) starts
//!   nothing after its last commit, which says so (`h`, a hand-over): the next owner
//!   is careful only where the leaving one still was ([`Earlier::Committed`]);
//! - the careful spans an owner inherited travel in its commits (`k=`) until they are
//!   behind the commit position, so that two crashes in a row forget neither.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// What an offset commit of one partition carries: the offset (the next one to
/// consume) and the counts of started records at or after it, as metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub offset: i64,
    pub metadata: String,
}

/// What the ledger says about a record just fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fetched {
    /// The ownership generation it belongs to.
    pub generation: u64,
    /// True for the first record of this ownership: the counts of earlier starts must
    /// be loaded from the group's committed offset before it is delivered.
    pub needs_counts: bool,
}

/// Most starts of one consumer whose commit may still be on its way while their jobs
/// run: a start beyond them waits for its commit.
pub const UNRECORDED_STARTS: u64 = 512;
/// How far around the highest recorded start a new owner waits for each start's commit:
/// the unrecorded starts lie above it, and (starts run in offset order only give or take
/// the worker's concurrency) a few below it.
pub const CAREFUL_SPAN: i64 = UNRECORDED_STARTS as i64;
/// Most careful spans a commit carries (`k=`): more are merged, the closest first
/// (a merged span covers both, so merging only makes a new owner more careful).
pub const MAX_CAREFUL_SPANS: usize = 4;

/// What a new owner of a partition knows of the starts before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Earlier<'a> {
    /// The group's committed offset and its metadata.
    Committed(i64, &'a str),
    /// The group never committed the partition: no owner ever ran one of its jobs
    /// (each waits for a commit of its own before its first job runs).
    Never,
    /// Not known (the committed offset could not be read): any start near where
    /// consuming begins may have been lost.
    Unknown,
}

/// What a commit's metadata says besides the counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// The highest offset started (`t=`).
    pub top: Option<i64>,
    /// Spans where a crash of an earlier owner may have lost starts (`k=`).
    pub careful: Vec<std::ops::RangeInclusive<i64>>,
    /// Written by an owner that starts nothing after this commit (`h`).
    pub handed_over: bool,
}

/// What [`Ledger::started`] says about a start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// The position to commit so that the start is durable.
    pub position: Position,
    /// How many times the job was started in all, this start included.
    pub starts: u32,
    /// The start must be durable before the handler runs: the record may be one whose
    /// earlier start a crash left unrecorded, or the ownership has no commit through yet.
    pub careful: bool,
}

/// Marks metadata written by this scheme (other tools commit other metadata, or none).
const METADATA_PREFIX: &str = "jobgate-starts-v1:";
/// Longest metadata written: below Kafka's default `offset.metadata.max.bytes` (4096),
/// over which the broker refuses the commit. Counts that do not fit (the highest
/// offsets, with thousands of jobs of one partition in flight) are left out.
pub const MAX_METADATA_BYTES: usize = 3800;

/// The metadata of a commit at `offset` with `summary` and `counts` (offset -> starts):
/// offsets relative to `offset`, so that it stays short
/// (`jobgate-starts-v1:h,t=3,k=0-512,0=1,3=2`). Readers skip entries they do not know
/// (older ones skip `h` and `k=`, the oldest also `t=`).
pub fn encode(offset: i64, summary: &Summary, counts: &BTreeMap<i64, u32>) -> String {
    let mut entries = Vec::new();
    if summary.handed_over {
        entries.push("h".to_owned());
    }
    if let Some(top) = summary.top.and_then(|top| top.checked_sub(offset)) {
        entries.push(format!("t={top}"));
    }
    for span in &summary.careful {
        let end = span.end().saturating_sub(offset);
        if end >= 0 {
            let start = span.start().saturating_sub(offset).max(0);
            entries.push(format!("k={start}-{end}"));
        }
    }
    let mut metadata = METADATA_PREFIX.to_owned() + &entries.join(",");
    let mut first = entries.is_empty();
    for (at, starts) in counts.range(offset..) {
        let entry = format!("{}{}={starts}", if first { "" } else { "," }, at - offset);
        if metadata.len() + entry.len() > MAX_METADATA_BYTES {
            break;
        }
        metadata.push_str(&entry);
        first = false;
    }
    metadata
}

/// The entries of metadata written by this scheme (none for anything else).
fn entries(metadata: &str) -> impl Iterator<Item = &str> {
    metadata
        .strip_prefix(METADATA_PREFIX)
        .into_iter()
        .flat_map(|entries| entries.split(','))
}

/// What a commit at `offset` with `metadata` says besides the counts; junk says nothing.
pub fn decode_summary(offset: i64, metadata: &str) -> Summary {
    let mut summary = Summary::default();
    for entry in entries(metadata) {
        if entry == "h" {
            summary.handed_over = true;
        } else if let Some(span) = entry.strip_prefix("k=") {
            let span = span.split_once('-').and_then(|(start, end)| {
                let start: i64 = start.parse().ok().filter(|s| *s >= 0)?;
                let end: i64 = end.parse().ok().filter(|e| *e >= start)?;
                Some(offset.checked_add(start)?..=offset.checked_add(end)?)
            });
            summary.careful.extend(span);
        }
    }
    summary.top = decode_top(offset, metadata);
    summary.careful = bounded_spans(summary.careful);
    summary
}

/// `spans` sorted, overlapping ones merged, and at most [`MAX_CAREFUL_SPANS`] of them
/// (the two closest merged first).
fn bounded_spans(
    mut spans: Vec<std::ops::RangeInclusive<i64>>,
) -> Vec<std::ops::RangeInclusive<i64>> {
    spans.sort_by_key(|span| *span.start());
    let mut merged: Vec<std::ops::RangeInclusive<i64>> = Vec::with_capacity(spans.len());
    for span in spans {
        match merged.last_mut() {
            Some(last) if *span.start() <= last.end().saturating_add(1) => {
                *last = *last.start()..=*last.end().max(span.end());
            }
            _ => merged.push(span),
        }
    }
    while merged.len() > MAX_CAREFUL_SPANS {
        let closest = (1..merged.len())
            .min_by_key(|&i| merged[i].start().saturating_sub(*merged[i - 1].end()))
            .unwrap_or(1);
        let next = merged.remove(closest);
        let before = &mut merged[closest - 1];
        *before = *before.start()..=*next.end();
    }
    merged
}

/// The highest offset started that a commit at `offset` with `metadata` records, if it
/// records one.
pub fn decode_top(offset: i64, metadata: &str) -> Option<i64> {
    let delta: i64 = entries(metadata)
        .find_map(|e| e.strip_prefix("t="))?
        .parse()
        .ok()?;
    offset.checked_add(delta)
}

/// The counts a commit at `offset` with `metadata` carries; anything that is not ours,
/// or not well formed, counts nothing.
pub fn decode(offset: i64, metadata: &str) -> BTreeMap<i64, u32> {
    entries(metadata)
        .filter_map(|entry| {
            let (delta, starts) = entry.split_once('=')?;
            let delta: i64 = delta.parse().ok().filter(|d| *d >= 0)?;
            let starts: u32 = starts.parse().ok().filter(|s| *s >= 1)?;
            Some((offset.checked_add(delta)?, starts))
        })
        .collect()
}

/// Bookkeeping of one owned partition.
#[derive(Debug)]
struct PartitionLedger {
    /// Bumped at each assignment, so completions from an earlier ownership are ignored.
    generation: u64,
    /// Offsets fetched and not yet finished.
    pending: BTreeSet<i64>,
    /// One past the highest offset fetched.
    next: i64,
    /// The last offset stored for commit (the next offset to consume).
    stored: Option<i64>,
    /// Starts without an outcome so far, by offset: loaded from the committed metadata,
    /// one more at each start, dropped when the record finishes.
    counts: BTreeMap<i64, u32>,
    /// Whether `counts` were loaded from the group's committed offset.
    loaded: bool,
    /// The highest offset started in this ownership (an earlier owner's is in its
    /// careful span, `careful`).
    top: Option<i64>,
    /// Whether a commit of this ownership has reached the broker: until then every start
    /// waits for one (see the module doc).
    claimed: bool,
    /// Offsets whose starts must be durable before their handler runs: where a crash of
    /// an earlier owner may have left starts unrecorded (see the module doc). Empty
    /// until the committed position is loaded.
    careful: Vec<std::ops::RangeInclusive<i64>>,
}

impl PartitionLedger {
    /// The first unfinished offset, or one past the highest fetched.
    fn commit_offset(&self) -> i64 {
        self.pending.first().copied().unwrap_or(self.next)
    }

    /// The position to commit; `handed_over` when this owner starts nothing after it.
    fn position(&self, handed_over: bool) -> Position {
        let offset = self.commit_offset();
        let summary = Summary {
            top: self.top,
            careful: self.careful.clone(),
            handed_over,
        };
        Position {
            offset,
            metadata: encode(offset, &summary, &self.counts),
        }
    }

    /// Whether a commit would tell the group something: a job finished (the offset
    /// moved) or started (its count must survive).
    fn has_news(&self) -> bool {
        self.stored.is_some() || !self.counts.is_empty()
    }
}

/// Tracks, for every owned partition, which offsets are in flight, and computes the
/// highest offset that may be committed: never past an unfinished job.
#[derive(Debug, Default)]
pub struct Ledger {
    partitions: Mutex<HashMap<(String, i32), PartitionLedger>>,
    generations: AtomicU64,
}

impl Ledger {
    fn lock(&self) -> MutexGuard<'_, HashMap<(String, i32), PartitionLedger>> {
        self.partitions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The partition's ledger when it is still the ownership `generation`.
    fn owned<'a>(
        parts: &'a mut HashMap<(String, i32), PartitionLedger>,
        topic: &str,
        partition: i32,
        generation: u64,
    ) -> Option<&'a mut PartitionLedger> {
        parts
            .get_mut(&(topic.to_owned(), partition))
            .filter(|entry| entry.generation == generation)
    }

    /// Records a fetched offset.
    pub fn fetched(&self, topic: &str, partition: i32, offset: i64) -> Fetched {
        let mut parts = self.lock();
        let entry = parts
            .entry((topic.to_owned(), partition))
            .or_insert_with(|| PartitionLedger {
                generation: self.generations.fetch_add(1, Ordering::SeqCst),
                pending: BTreeSet::new(),
                next: offset,
                stored: None,
                counts: BTreeMap::new(),
                loaded: false,
                top: None,
                claimed: false,
                careful: Vec::new(),
            });
        entry.pending.insert(offset);
        entry.next = entry.next.max(offset + 1);
        Fetched {
            generation: entry.generation,
            needs_counts: !entry.loaded,
        }
    }

    /// Takes the counts of earlier starts, and where some may have been lost, from what
    /// the new owner knows of the partition's past ([`Earlier`]).
    pub fn load_counts(&self, topic: &str, partition: i32, generation: u64, earlier: Earlier<'_>) {
        let mut parts = self.lock();
        let Some(entry) = Self::owned(&mut parts, topic, partition, generation) else {
            return;
        };
        let first = entry.pending.first().copied().unwrap_or(entry.next);
        // Lost starts lie just above where consuming starts when nothing says more.
        let near_first = first..=first.saturating_add(2 * CAREFUL_SPAN);
        let mut careful = Vec::new();
        match earlier {
            Earlier::Never => {}
            Earlier::Unknown => careful.push(near_first),
            Earlier::Committed(offset, metadata) => {
                for (at, starts) in decode(offset, metadata) {
                    let count = entry.counts.entry(at).or_insert(0);
                    *count = (*count).max(starts);
                }
                let summary = decode_summary(offset, metadata);
                careful = summary.careful;
                if !summary.handed_over {
                    // The last owner may have crashed: its lost starts lie around the
                    // highest recorded one (a commit from before `t=`: near the start).
                    careful.push(match summary.top {
                        Some(top) => {
                            top.saturating_sub(CAREFUL_SPAN).max(first)
                                ..=top.saturating_add(CAREFUL_SPAN)
                        }
                        None => near_first,
                    });
                }
            }
        }
        careful.retain(|span| *span.end() >= first);
        entry.careful = bounded_spans(careful);
        entry.loaded = true;
    }

    /// How many times `offset` was started before without an outcome.
    pub fn earlier_starts(&self, topic: &str, partition: i32, offset: i64, generation: u64) -> u32 {
        let mut parts = self.lock();
        Self::owned(&mut parts, topic, partition, generation)
            .and_then(|entry| entry.counts.get(&offset).copied())
            .unwrap_or(0)
    }

    /// Records that the job at `offset` starts ([`Started`]), or `None` when the
    /// partition was revoked since the fetch.
    pub fn started(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        generation: u64,
    ) -> Option<Started> {
        let mut parts = self.lock();
        let entry = Self::owned(&mut parts, topic, partition, generation)?;
        let starts = entry.counts.entry(offset).or_insert(0);
        *starts = starts.saturating_add(1);
        let starts = *starts;
        entry.top = entry.top.max(Some(offset));
        Some(Started {
            position: entry.position(false),
            starts,
            careful: !entry.claimed || entry.careful.iter().any(|span| span.contains(&offset)),
        })
    }

    /// Notes that a commit of this ownership of the partition reached the broker (one
    /// that carried a start of it): from now on only its careful spans wait.
    pub fn claimed(&self, topic: &str, partition: i32, generation: u64) {
        let mut parts = self.lock();
        if let Some(entry) = Self::owned(&mut parts, topic, partition, generation) {
            entry.claimed = true;
        }
    }

    /// Records a finished offset. Returns the position to store for commit, or `None`
    /// when the partition was revoked since the job was fetched or the commit offset
    /// did not move (the next move carries the counts as they are then).
    pub fn finished(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        generation: u64,
    ) -> Option<Position> {
        let mut parts = self.lock();
        let entry = Self::owned(&mut parts, topic, partition, generation)?;
        entry.pending.remove(&offset);
        entry.counts.remove(&offset);
        let position = entry.position(false);
        if entry.stored.is_some_and(|s| s >= position.offset) {
            return None;
        }
        entry.stored = Some(position.offset);
        Some(position)
    }

    /// Whether `topic`/`partition` is still owned in ownership `generation`: false once
    /// the partition was revoked since (a record fetched then belongs to its next owner,
    /// which replays it from the committed offset).
    pub fn is_current(&self, topic: &str, partition: i32, generation: u64) -> bool {
        let mut parts = self.lock();
        Self::owned(&mut parts, topic, partition, generation).is_some()
    }

    /// Gives up `partitions` (all of them: `None`), for a revoke or a shutdown: forgets
    /// them, so that nothing of theirs starts here any more, and returns the hand-over
    /// position of each to commit: the first unfinished offset, never past it, with
    /// the counts of started jobs, the careful spans still open, and `h`, which tells
    /// the next owner that no start went unrecorded here. A partition whose committed
    /// position was not loaded yet has nothing to hand over (the commit stays as it is).
    pub fn hand_over(&self, partitions: Option<&[(String, i32)]>) -> Vec<(String, i32, Position)> {
        let mut parts = self.lock();
        let given_up: Vec<((String, i32), PartitionLedger)> = match partitions {
            None => parts.drain().collect(),
            Some(partitions) => partitions
                .iter()
                .filter_map(|key| parts.remove_entry(key))
                .collect(),
        };
        given_up
            .into_iter()
            .filter(|(_, entry)| entry.loaded)
            .map(|((topic, partition), entry)| (topic, partition, entry.position(true)))
            .collect()
    }

    /// The position of every owned partition of `topic` (every topic: `None`) from
    /// which something was fetched, to commit: what finished moves the offset, what
    /// started and did not finish stays counted in the metadata.
    pub fn positions(&self, topic: Option<&str>) -> Vec<(String, i32, Position)> {
        self.lock()
            .iter()
            .filter(|((t, _), _)| topic.is_none_or(|topic| t == topic))
            .filter(|(_, entry)| entry.has_news())
            .map(|((topic, partition), entry)| (topic.clone(), *partition, entry.position(false)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offset(p: Option<Position>) -> Option<i64> {
        p.map(|p| p.offset)
    }

    #[test]
    fn commit_never_passes_an_unfinished_offset() {
        let ledger = Ledger::default();
        let g = (0..5)
            .map(|o| ledger.fetched("t", 0, o).generation)
            .last()
            .unwrap();
        // Finish out of order: 3, 1, 4 -> nothing past 0 may be committed.
        assert_eq!(offset(ledger.finished("t", 0, 3, g)), Some(0));
        assert_eq!(offset(ledger.finished("t", 0, 1, g)), None);
        assert_eq!(offset(ledger.finished("t", 0, 4, g)), None);
        // 0 finishes: 0 and 1 are done, 2 is not -> commit 2.
        assert_eq!(offset(ledger.finished("t", 0, 0, g)), Some(2));
        // 2 finishes: everything up to 4 is done -> commit 5.
        assert_eq!(offset(ledger.finished("t", 0, 2, g)), Some(5));
    }

    #[test]
    fn partitions_are_tracked_separately() {
        let ledger = Ledger::default();
        let a = ledger.fetched("t", 0, 10).generation;
        let b = ledger.fetched("t", 1, 7).generation;
        ledger.fetched("t", 1, 8);
        assert_eq!(offset(ledger.finished("t", 0, 10, a)), Some(11));
        assert_eq!(offset(ledger.finished("t", 1, 8, b)), Some(7));
        assert_eq!(offset(ledger.finished("t", 1, 7, b)), Some(9));
    }

    #[test]
    fn completions_from_before_a_revoke_are_ignored() {
        let ledger = Ledger::default();
        let old = ledger.fetched("t", 0, 0).generation;
        ledger.hand_over(Some(&[("t".into(), 0)]));
        assert_eq!(ledger.finished("t", 0, 0, old), None);
        assert_eq!(ledger.started("t", 0, 0, old), None);
        // Re-assigned later: a new generation starts from what is fetched then.
        let new = ledger.fetched("t", 0, 0);
        assert_ne!(old, new.generation);
        assert!(
            new.needs_counts,
            "a new ownership reads the committed counts"
        );
        assert_eq!(ledger.finished("t", 0, 0, old), None);
        assert_eq!(offset(ledger.finished("t", 0, 0, new.generation)), Some(1));
    }

    #[test]
    fn a_revoke_commits_what_finished_on_the_revoked_partitions_and_no_further() {
        let ledger = Ledger::default();
        let g = (0..5)
            .map(|o| ledger.fetched("t", 0, o).generation)
            .last()
            .unwrap();
        let h = ledger.fetched("t", 1, 10).generation;
        ledger.fetched("t", 2, 20);
        ledger.started("t", 0, 2, g);
        for done in [0, 1, 3] {
            ledger.finished("t", 0, done, g);
        }
        ledger.finished("t", 1, 10, h);
        ledger.load_counts("t", 0, g, Earlier::Never);
        // Partition 0 moves: 2 runs (counted), 3 finished above it, 4 never started.
        let moved = [("t".to_owned(), 0), ("t".to_owned(), 2)];
        assert_eq!(
            ledger.hand_over(Some(&moved)),
            vec![(
                "t".to_owned(),
                0,
                Position {
                    offset: 2,
                    metadata: "jobgate-starts-v1:h,t=0,0=1".into()
                }
            )],
            "the commit stops at the running job; partition 2 has not loaded what it could hand over"
        );
        assert!(!ledger.is_current("t", 0, g));
        assert_eq!(
            ledger.finished("t", 0, 2, g),
            None,
            "late completions are ignored"
        );
        // An incremental revoke leaves the partitions that stay as they were.
        assert!(ledger.is_current("t", 1, h));
        ledger.fetched("t", 1, 11);
        assert_eq!(offset(ledger.finished("t", 1, 11, h)), Some(12));
        assert_eq!(ledger.positions(None).len(), 1, "only partition 1 is left");
    }

    #[test]
    fn a_partition_assigned_again_is_a_new_ownership() {
        let ledger = Ledger::default();
        let old = ledger.fetched("t", 0, 7).generation;
        let kept = ledger.fetched("t", 1, 3).generation;
        ledger.load_counts("t", 1, kept, Earlier::Unknown);
        ledger.hand_over(Some(&[("t".into(), 0)]));
        let again = ledger.fetched("t", 0, 5);
        assert!(
            again.needs_counts,
            "the counts are read again from the commit"
        );
        assert!(!ledger.is_current("t", 0, old));
        assert!(ledger.is_current("t", 0, again.generation));
        // The partition that stayed keeps its ownership and what it loaded.
        let next = ledger.fetched("t", 1, 4);
        assert_eq!(next.generation, kept);
        assert!(!next.needs_counts);
    }

    #[test]
    fn the_final_commit_lists_finished_and_started_partitions_only() {
        let ledger = Ledger::default();
        let g = ledger.fetched("t", 0, 4).generation;
        ledger.fetched("t", 1, 9);
        let h = ledger.fetched("t", 2, 20).generation;
        ledger.finished("t", 0, 4, g);
        ledger.started("t", 2, 20, h);
        ledger.fetched("u", 0, 1);
        ledger.started("u", 0, 1, ledger.fetched("u", 0, 2).generation);
        assert_eq!(ledger.positions(None).len(), 3);
        let mut positions = ledger.positions(Some("t"));
        positions.sort_by_key(|(_, p, _)| *p);
        assert_eq!(
            positions,
            vec![
                (
                    "t".into(),
                    0,
                    Position {
                        offset: 5,
                        metadata: encode(5, &Summary::default(), &BTreeMap::new())
                    }
                ),
                (
                    "t".into(),
                    2,
                    Position {
                        offset: 20,
                        metadata: "jobgate-starts-v1:t=0,0=1".into()
                    }
                ),
            ]
        );
    }

    #[test]
    fn starts_are_counted_in_the_commit_metadata_until_the_job_finishes() {
        let ledger = Ledger::default();
        let f = ledger.fetched("t", 0, 100);
        ledger.fetched("t", 0, 101);
        ledger.fetched("t", 0, 102);
        ledger.load_counts("t", 0, f.generation, Earlier::Never);
        let g = f.generation;
        let at = |p: Option<Started>| p.expect("owned").position;
        assert_eq!(
            at(ledger.started("t", 0, 100, g)).metadata,
            "jobgate-starts-v1:t=0,0=1"
        );
        assert_eq!(
            at(ledger.started("t", 0, 102, g)).metadata,
            "jobgate-starts-v1:t=2,0=1,2=1"
        );
        // 100 finishes: the commit moves to 101 and 102 stays counted (relative to 101).
        let moved = ledger.finished("t", 0, 100, g).expect("owned");
        assert_eq!(
            moved,
            Position {
                offset: 101,
                metadata: "jobgate-starts-v1:t=1,1=1".into()
            }
        );
    }

    #[test]
    fn the_next_owner_reads_the_earlier_starts_and_counts_on() {
        // The first owner started 7 twice (it crashed once before) and 9 once, then died.
        let committed = Position {
            offset: 7,
            metadata: encode(7, &Summary::default(), &BTreeMap::from([(7, 2), (9, 1)])),
        };
        let ledger = Ledger::default();
        let f = ledger.fetched("t", 3, 7);
        assert!(f.needs_counts);
        ledger.load_counts(
            "t",
            3,
            f.generation,
            Earlier::Committed(7, &committed.metadata),
        );
        assert!(!ledger.fetched("t", 3, 8).needs_counts, "loaded once");
        ledger.fetched("t", 3, 9);
        let g = f.generation;
        assert_eq!(ledger.earlier_starts("t", 3, 7, g), 2);
        assert_eq!(ledger.earlier_starts("t", 3, 8, g), 0);
        assert_eq!(ledger.earlier_starts("t", 3, 9, g), 1);
        // Not yet started again here, still counted: a crash now loses no count.
        let s = ledger.started("t", 3, 8, g).unwrap();
        assert_eq!(
            (s.position.metadata.as_str(), s.starts),
            ("jobgate-starts-v1:t=1,k=0-1024,0=2,1=1,2=1", 1)
        );
        let s = ledger.started("t", 3, 7, g).unwrap();
        assert_eq!(
            (s.position.metadata.as_str(), s.starts),
            ("jobgate-starts-v1:t=1,k=0-1024,0=3,1=1,2=1", 3)
        );
    }

    #[test]
    fn metadata_of_others_and_junk_count_nothing() {
        for junk in [
            "",
            "some other tool",
            "jobgate-starts-v1:",
            "jobgate-starts-v1:x=1,-1=2,3=0,4=,=5,9999999999999999999=1",
        ] {
            assert!(decode(10, junk).is_empty(), "{junk:?}");
        }
        assert!(
            decode(i64::MAX, "jobgate-starts-v1:1=1").is_empty(),
            "overflow"
        );
        assert_eq!(
            decode(10, "jobgate-starts-v1:0=1,junk,2=3"),
            BTreeMap::from([(10, 1), (12, 3)])
        );
    }

    #[test]
    fn metadata_stays_below_what_the_broker_takes() {
        let counts: BTreeMap<i64, u32> = (0..5000).map(|o| (o, 1_000)).collect();
        let summary = Summary {
            top: Some(4_999),
            careful: vec![0..=1024; MAX_CAREFUL_SPANS],
            handed_over: true,
        };
        let metadata = encode(0, &summary, &counts);
        assert!(metadata.len() <= MAX_METADATA_BYTES, "{}", metadata.len());
        let kept = decode(0, &metadata);
        assert!(
            kept.len() > 300,
            "the lowest offsets are kept: {}",
            kept.len()
        );
        assert_eq!(kept.keys().next(), Some(&0));
    }

    /// A record that killed its consumer right after its first start may have no count:
    /// that start never reached a commit. It lies just above the highest recorded start
    /// (starts run in offset order), so there the next owner waits for each start's
    /// commit, and the record is counted from its second start on.
    #[test]
    fn starts_just_above_the_highest_recorded_one_are_careful() {
        let crashed = Summary {
            top: Some(60),
            ..Summary::default()
        };
        let committed = encode(50, &crashed, &BTreeMap::from([(55, 1)]));
        assert_eq!(decode_top(50, &committed), Some(60));
        let ledger = Ledger::default();
        let f = ledger.fetched("t", 0, 50);
        ledger.load_counts("t", 0, f.generation, Earlier::Committed(50, &committed));
        let g = f.generation;
        ledger.claimed("t", 0, g);
        let careful = |offset: i64| {
            ledger.fetched("t", 0, offset);
            ledger.started("t", 0, offset, g).unwrap().careful
        };
        assert!(careful(59), "just below: may have started out of order");
        assert!(careful(61));
        assert!(careful(60 + CAREFUL_SPAN));
        assert!(!careful(61 + CAREFUL_SPAN), "far above: a first delivery");
        // The top moves with the starts here, and is committed with them.
        let s = ledger.started("t", 0, 61 + CAREFUL_SPAN, g).unwrap();
        assert_eq!(
            decode_top(s.position.offset, &s.position.metadata),
            Some(61 + CAREFUL_SPAN)
        );
    }

    #[test]
    fn without_a_recorded_top_the_first_records_consumed_are_careful() {
        for committed in [
            Earlier::Unknown,
            Earlier::Committed(50, "jobgate-starts-v1:0=1"),
        ] {
            let ledger = Ledger::default();
            let f = ledger.fetched("t", 0, 50);
            ledger.load_counts("t", 0, f.generation, committed);
            let g = f.generation;
            ledger.claimed("t", 0, g);
            assert!(
                ledger.started("t", 0, 50, g).unwrap().careful,
                "{committed:?}"
            );
            ledger.fetched("t", 0, 50 + 2 * CAREFUL_SPAN);
            let s = ledger.started("t", 0, 50 + 2 * CAREFUL_SPAN, g).unwrap();
            assert!(s.careful);
            ledger.fetched("t", 0, 51 + 2 * CAREFUL_SPAN);
            let s = ledger.started("t", 0, 51 + 2 * CAREFUL_SPAN, g).unwrap();
            assert!(!s.careful);
        }
    }

    #[test]
    fn readers_without_the_top_skip_it_and_junk_tops_are_none() {
        assert_eq!(
            decode(10, "jobgate-starts-v1:t=3,0=1"),
            BTreeMap::from([(10, 1)])
        );
        assert_eq!(decode_top(10, "jobgate-starts-v1:t=-1"), Some(9));
        for junk in ["jobgate-starts-v1:0=1", "jobgate-starts-v1:t=x", "t=3", ""] {
            assert_eq!(decode_top(10, junk), None, "{junk:?}");
        }
        assert_eq!(decode_top(i64::MAX, "jobgate-starts-v1:t=1"), None);
    }

    /// An owner with every slot busy on a slow downstream must not wait for a commit
    /// before each start: on a partition nobody ever started, or after an orderly
    /// hand-over, nothing was lost. Only its first starts wait, until a commit of its
    /// own got through (so that its own crash is seen by the next owner).
    #[test]
    fn after_a_claim_nothing_is_careful_on_a_new_partition_or_after_a_hand_over() {
        let first = Ledger::default();
        let f = first.fetched("t", 0, 0);
        first.load_counts("t", 0, f.generation, Earlier::Never);
        let started = first.started("t", 0, 0, f.generation).unwrap();
        assert!(started.careful, "not claimed yet");
        first.claimed("t", 0, f.generation);
        for offset in 1..4 {
            first.fetched("t", 0, offset);
            let started = first.started("t", 0, offset, f.generation).unwrap();
            assert!(!started.careful, "claimed, never committed: {offset}");
        }
        first.finished("t", 0, 0, f.generation);
        let [(_, _, handed)] = first.hand_over(None).try_into().unwrap();
        assert_eq!(handed.offset, 1);
        assert_eq!(handed.metadata, "jobgate-starts-v1:h,t=2,0=1,1=1,2=1");
        assert!(
            !first.is_current("t", 0, f.generation),
            "nothing starts here any more"
        );

        let next = Ledger::default();
        let g = next.fetched("t", 0, 1).generation;
        next.load_counts(
            "t",
            0,
            g,
            Earlier::Committed(handed.offset, &handed.metadata),
        );
        next.fetched("t", 0, 2);
        assert_eq!(
            next.earlier_starts("t", 0, 2, g),
            1,
            "the counts still travel"
        );
        assert!(
            next.started("t", 0, 1, g).unwrap().careful,
            "not claimed yet"
        );
        next.claimed("t", 0, g);
        for offset in 2..600 {
            next.fetched("t", 0, offset);
            let started = next.started("t", 0, offset, g).unwrap();
            assert!(!started.careful, "handed over: {offset}");
        }
    }

    /// A careful span inherited from a crashed owner outlives the next owner's crash:
    /// its commits carry it (`k=`) until the commit position passes it.
    #[test]
    fn careful_spans_travel_in_commits_until_behind_the_commit_position() {
        let crashed = Summary {
            top: Some(60),
            ..Summary::default()
        };
        let committed = encode(50, &crashed, &BTreeMap::new());
        let second = Ledger::default();
        let g = second.fetched("t", 0, 50).generation;
        second.load_counts("t", 0, g, Earlier::Committed(50, &committed));
        second.fetched("t", 0, 3_000);
        // The second owner runs ahead and dies with 50 unfinished.
        let last = second.started("t", 0, 3_000, g).unwrap().position;
        assert_eq!(last.offset, 50);
        assert_eq!(
            decode_summary(50, &last.metadata).careful,
            vec![50..=60 + CAREFUL_SPAN]
        );

        let third = Ledger::default();
        let h = third.fetched("t", 0, 50).generation;
        third.load_counts("t", 0, h, Earlier::Committed(last.offset, &last.metadata));
        third.claimed("t", 0, h);
        let careful = |offset: i64| {
            third.fetched("t", 0, offset);
            third.started("t", 0, offset, h).unwrap().careful
        };
        assert!(careful(100), "the first crash's span");
        assert!(!careful(1_500), "between the two");
        assert!(careful(3_000 + CAREFUL_SPAN), "the second crash's span");
        // Everything up to 2 000 finishes: the first span is behind, and not carried.
        for offset in [50, 100, 1_500] {
            third.finished("t", 0, offset, h);
        }
        let handed = third.hand_over(None).pop().unwrap().2;
        let summary = decode_summary(handed.offset, &handed.metadata);
        assert_eq!(summary.careful.len(), 1, "{summary:?}");
        assert!(summary.handed_over);
    }

    #[test]
    fn junk_spans_are_ignored_and_many_are_merged_not_dropped() {
        let summary = decode_summary(
            100,
            "jobgate-starts-v1:h=1,k=5-3,k=-1-4,k=x,k=1-,k=9223372036854775807-9223372036854775807",
        );
        assert_eq!(summary, Summary::default());
        let many = "jobgate-starts-v1:k=0-1,k=10-11,k=20-21,k=30-31,k=100-101,k=200-201";
        let careful = decode_summary(0, many).careful;
        assert_eq!(careful.len(), MAX_CAREFUL_SPANS);
        for offset in [0, 1, 10, 11, 20, 21, 30, 31, 100, 101, 200, 201] {
            assert!(careful.iter().any(|s| s.contains(&offset)), "{offset}");
        }
        assert_eq!(
            decode(10, "jobgate-starts-v1:h,t=3,k=0-512,0=1"),
            BTreeMap::from([(10, 1)]),
            "readers of the counts skip the summary"
        );
    }
}
