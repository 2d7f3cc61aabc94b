//! A topic's members as every instance agrees on them, and what its subscribers are shown.
//!
//! Below the listing bound ([`Members::fits`]: at most `PRESENCE_LIST_MAX` metas and
//! [`MAX_LISTED_BYTES`]) a topic's subscribers get every meta, exactly as Phoenix sends them.
//! Above it they get a **listing**: at most that many metas, kept stable (a listed meta that
//! leaves frees a slot, which the newest unlisted meta takes, at most [`MAX_FILLS`] per
//! interval), and a `presence_summary` with the exact counts. A join's presence is then bounded
//! whatever the topic's size, and a storm of N joins costs each subscriber one small summary per
//! interval instead of N metas.

use std::collections::{BTreeSet, HashMap};

use bytes::Bytes;

/// The most bytes a listing may hold (keys and metas as JSON plus the framing of each entry):
/// the `presence_state` a joiner gets stays under 64 KiB however long its members' ids are.
pub const MAX_LISTED_BYTES: usize = 60 * 1024;
/// The most bytes of a joiner's pending diff (its own instance's changes not flushed yet):
/// with a listing, a join's presence stays under 64 KiB.
pub const MAX_PENDING_BYTES: usize = 4 * 1024;
/// Free listing slots filled per interval at most: a storm of leaves moves the listing by at
/// most this many joins per subscriber per interval.
pub const MAX_FILLS: usize = 32;
/// `:{"metas":[` … `]}` and a comma around each entry of an encoded state.
const ENTRY_FRAMING: usize = 14;

/// One meta on a topic: the key and the meta, both as JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub key: Box<str>,
    pub meta: Box<str>,
}

impl Member {
    /// What the member adds to an encoded state, at most.
    pub fn cost(&self) -> usize {
        self.key.len() + self.meta.len() + ENTRY_FRAMING
    }
}

/// What the order and the counts need from a meta (any other member is ignored; an
/// `online_at` or `kind` of another shape counts as 0 or no kind, never drops the meta).
#[derive(serde::Deserialize)]
struct MetaFields {
    phx_ref: String,
    #[serde(default)]
    online_at: serde_json::Value,
    #[serde(default)]
    kind: serde_json::Value,
}

#[derive(Debug)]
struct Entry {
    member: Member,
    online_at: u64,
    kind: Box<str>,
}

/// Every meta of a topic, with the order of arrival and the counts a summary reports.
#[derive(Debug, Default)]
pub struct Members {
    by_ref: HashMap<Box<str>, Entry>,
    /// `(online_at, phx_ref)`: the newest last.
    recent: BTreeSet<(u64, Box<str>)>,
    kinds: HashMap<Box<str>, usize>,
    /// Metas per key (a key with several tabs has several metas).
    keys: HashMap<Box<str>, usize>,
    bytes: usize,
}

impl Members {
    pub fn len(&self) -> usize {
        self.by_ref.len()
    }

    pub fn contains(&self, phx_ref: &str) -> bool {
        self.by_ref.contains_key(phx_ref)
    }

    /// Adds a meta (or replaces the one with the same ref); a meta without a `phx_ref`, or
    /// whose key is not a JSON string (a foreign or corrupted stored entry), is ignored: what
    /// is encoded from the members must stay JSON (found by the `presence_diff` fuzz target).
    pub fn insert(&mut self, member: Member) {
        let Ok(fields) = serde_json::from_str::<MetaFields>(&member.meta) else {
            return;
        };
        if serde_json::from_str::<String>(&member.key).is_err() {
            return;
        }
        let phx_ref: Box<str> = fields.phx_ref.into();
        self.remove(&phx_ref);
        let online_at = fields.online_at.as_u64().unwrap_or(0);
        let kind: Box<str> = fields.kind.as_str().unwrap_or_default().into();
        *self.kinds.entry(kind.clone()).or_default() += 1;
        *self.keys.entry(member.key.clone()).or_default() += 1;
        self.bytes += member.cost();
        self.recent.insert((online_at, phx_ref.clone()));
        self.by_ref.insert(
            phx_ref,
            Entry {
                member,
                online_at,
                kind,
            },
        );
    }

    pub fn remove(&mut self, phx_ref: &str) -> Option<Member> {
        let (phx_ref, entry) = self.by_ref.remove_entry(phx_ref)?;
        self.recent.remove(&(entry.online_at, phx_ref));
        decrement(&mut self.kinds, &entry.kind);
        decrement(&mut self.keys, &entry.member.key);
        self.bytes -= entry.member.cost();
        Some(entry.member)
    }

    /// Applies a published diff; `false` when it does not parse.
    pub fn apply_diff(&mut self, raw: &[u8]) -> bool {
        let Some(diff) = parse_diff(raw) else {
            return false;
        };
        for phx_ref in diff.leaves {
            self.remove(&phx_ref);
        }
        for member in diff.joins {
            self.insert(member);
        }
        true
    }

    /// Parses the `state` op's flat `ref, value, …` list.
    pub fn from_stored(flat: &[String]) -> Members {
        let mut members = Members::default();
        for pair in flat.chunks_exact(2) {
            let Some((_, rest)) = pair[1].split_once('|') else {
                continue;
            };
            let Some((key, meta)) = rest.split_once('\n') else {
                continue;
            };
            members.insert(Member {
                key: key.into(),
                meta: meta.into(),
            });
        }
        members
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Member)> {
        self.by_ref.iter().map(|(r, e)| (&**r, &e.member))
    }

    /// Whether the counts, the order and the byte total agree with the metas (the fuzz target
    /// checks it after every diff).
    pub fn consistent(&self) -> bool {
        let mut kinds: HashMap<&str, usize> = HashMap::new();
        let mut keys: HashMap<&str, usize> = HashMap::new();
        let mut bytes = 0;
        for entry in self.by_ref.values() {
            *kinds.entry(&entry.kind).or_default() += 1;
            *keys.entry(&entry.member.key).or_default() += 1;
            bytes += entry.member.cost();
        }
        let same = |counts: &HashMap<Box<str>, usize>, fresh: &HashMap<&str, usize>| {
            counts.len() == fresh.len() && counts.iter().all(|(k, n)| fresh.get(&**k) == Some(n))
        };
        same(&self.kinds, &kinds)
            && same(&self.keys, &keys)
            && bytes == self.bytes
            && self.recent.len() == self.by_ref.len()
            && self
                .recent
                .iter()
                .all(|(at, r)| self.by_ref.get(r).is_some_and(|e| e.online_at == *at))
    }

    /// Whether every meta may be listed (`limit` metas and [`MAX_LISTED_BYTES`] at most).
    pub fn fits(&self, limit: usize) -> bool {
        self.len() <= limit && self.bytes <= MAX_LISTED_BYTES
    }

    /// `{"metas": m, "keys": k, "kinds": {kind: m, …}, "listed": l, "complete": bool}`: the exact
    /// counts, and how many metas the subscribers are shown.
    pub fn summary(&self, listed: usize) -> Bytes {
        let kinds: serde_json::Map<String, serde_json::Value> = self
            .kinds
            .iter()
            .filter(|(kind, _)| !kind.is_empty())
            .map(|(kind, n)| (kind.to_string(), (*n).into()))
            .collect();
        let summary = serde_json::json!({
            "metas": self.len(),
            "keys": self.keys.len(),
            "kinds": kinds,
            "listed": listed,
            "complete": listed == self.len(),
        });
        Bytes::from(summary.to_string())
    }
}

/// One fewer of `key`; a count at zero is removed.
fn decrement(counts: &mut HashMap<Box<str>, usize>, key: &str) {
    if let Some(n) = counts.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(key);
        }
    }
}

/// The metas a topic's subscribers on this instance were last shown.
#[derive(Debug, Default, Clone)]
pub struct Listing {
    members: HashMap<Box<str>, Member>,
    bytes: usize,
}

impl Listing {
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// The newest metas of `members` under the bound.
    pub fn newest(members: &Members, limit: usize) -> Listing {
        let mut listing = Listing::default();
        let _ = listing.follow(members, limit, limit);
        listing
    }

    pub fn encode(&self) -> Bytes {
        Bytes::from(encode_state(self.members.values()))
    }

    /// Moves the listing towards `members` under the bound: listed metas that left are dropped,
    /// and free slots go to the newest unlisted metas (at most `fills`). Returns the
    /// `presence_diff` that tells subscribers (`None` when nothing moved), and whether slots
    /// are left for the next call to fill.
    pub fn follow(
        &mut self,
        members: &Members,
        limit: usize,
        fills: usize,
    ) -> (Option<Bytes>, bool) {
        let gone: Vec<Box<str>> = self
            .members
            .keys()
            .filter(|r| !members.contains(r))
            .cloned()
            .collect();
        let mut leaves = Vec::with_capacity(gone.len());
        for phx_ref in gone {
            if let Some(member) = self.members.remove(&phx_ref) {
                self.bytes -= member.cost();
                leaves.push(member);
            }
        }
        let mut joins = Vec::new();
        let mut unfinished = false;
        for (_, phx_ref) in members.recent.iter().rev() {
            if self.members.len() >= limit {
                break;
            }
            if joins.len() >= fills {
                unfinished = true;
                break;
            }
            if self.members.contains_key(phx_ref) {
                continue;
            }
            let member = &members.by_ref[phx_ref].member;
            if self.bytes + member.cost() > MAX_LISTED_BYTES {
                break;
            }
            self.bytes += member.cost();
            self.members.insert(phx_ref.clone(), member.clone());
            joins.push(member.clone());
        }
        (encode_diff(&joins, &leaves), unfinished)
    }
}

fn encode_diff(joins: &[Member], leaves: &[Member]) -> Option<Bytes> {
    if joins.is_empty() && leaves.is_empty() {
        return None;
    }
    Some(Bytes::from(format!(
        "{{\"joins\":{},\"leaves\":{}}}",
        encode_state(joins.iter()),
        encode_state(leaves.iter())
    )))
}

#[derive(serde::Deserialize)]
struct Diff<'a> {
    #[serde(borrow)]
    joins: HashMap<String, Metas<'a>>,
    #[serde(borrow)]
    leaves: HashMap<String, Metas<'a>>,
}

#[derive(serde::Deserialize)]
struct Metas<'a> {
    #[serde(borrow)]
    metas: Vec<&'a serde_json::value::RawValue>,
}

#[derive(serde::Deserialize)]
struct MetaRef {
    phx_ref: String,
}

/// A diff's joins (as members) and leaves (as refs).
struct ParsedDiff {
    joins: Vec<Member>,
    leaves: Vec<String>,
}

fn parse_diff(raw: &[u8]) -> Option<ParsedDiff> {
    let diff = serde_json::from_slice::<Diff>(raw).ok()?;
    let leaves = diff
        .leaves
        .values()
        .flat_map(|metas| &metas.metas)
        .filter_map(|meta| serde_json::from_str::<MetaRef>(meta.get()).ok())
        .map(|meta| meta.phx_ref)
        .collect();
    let mut joins = Vec::new();
    for (key, metas) in &diff.joins {
        let key: Box<str> = serde_json::to_string(key)
            .expect("a string serializes")
            .into();
        for meta in &metas.metas {
            joins.push(Member {
                key: key.clone(),
                meta: meta.get().into(),
            });
        }
    }
    Some(ParsedDiff { joins, leaves })
}

/// `{key: {"metas": [meta, …]}, …}` from members whose keys and metas are already JSON.
pub fn encode_state<'a>(members: impl Iterator<Item = &'a Member>) -> String {
    let mut by_key: Vec<(&str, Vec<&str>)> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut count = 0;
    for member in members {
        count += 1;
        match index.get(&*member.key) {
            Some(&i) => by_key[i].1.push(&member.meta),
            None => {
                index.insert(&member.key, by_key.len());
                by_key.push((&member.key, vec![&member.meta]));
            }
        }
    }
    let mut out = String::with_capacity(2 + count * 96);
    out.push('{');
    for (i, (key, metas)) in by_key.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(key);
        out.push_str(":{\"metas\":[");
        out.push_str(&metas.join(","));
        out.push_str("]}");
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(key: &str, phx_ref: &str, online_at: u64, kind: &str) -> Member {
        Member {
            key: serde_json::to_string(key).unwrap().into(),
            meta: serde_json::json!({"phx_ref": phx_ref, "online_at": online_at, "kind": kind})
                .to_string()
                .into(),
        }
    }

    fn refs(state: &[u8]) -> Vec<String> {
        let state: serde_json::Value = serde_json::from_slice(state).unwrap();
        let mut refs: Vec<String> = state
            .as_object()
            .unwrap()
            .values()
            .flat_map(|entry| entry["metas"].as_array().unwrap().clone())
            .map(|meta| meta["phx_ref"].as_str().unwrap().to_string())
            .collect();
        refs.sort();
        refs
    }

    #[test]
    fn state_groups_metas_by_key() {
        let entries = [
            member("user:1", "a-1", 1, "user"),
            member("player:2", "b-1", 2, "player"),
            member("user:1", "a-2", 3, "user"),
        ];
        let state: serde_json::Value = serde_json::from_str(&encode_state(entries.iter())).unwrap();
        assert_eq!(state["user:1"]["metas"].as_array().unwrap().len(), 2);
        assert_eq!(state["player:2"]["metas"][0]["phx_ref"], "b-1");
        assert_eq!(encode_state(std::iter::empty()), "{}");
    }

    #[test]
    fn diffs_apply_idempotently_by_ref_and_keep_the_counts() {
        let mut members = Members::default();
        let join =
            br#"{"joins":{"user:1":{"metas":[{"phx_ref":"a-1","kind":"user"}]}},"leaves":{}}"#;
        assert!(members.apply_diff(join));
        assert!(members.apply_diff(join), "seen twice");
        assert_eq!(members.len(), 1);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&members.summary(1)).unwrap(),
            serde_json::json!({"metas": 1, "keys": 1, "kinds": {"user": 1}, "listed": 1, "complete": true})
        );
        let leave = br#"{"joins":{},"leaves":{"user:1":{"metas":[{"phx_ref":"a-1"}]}}}"#;
        assert!(members.apply_diff(leave));
        assert!(members.apply_diff(leave), "a leave of nothing");
        assert_eq!(members.len(), 0);
        assert_eq!(
            (members.bytes, members.keys.len(), members.kinds.len()),
            (0, 0, 0)
        );
        assert!(!members.apply_diff(b"not json"));
    }

    #[test]
    fn a_meta_of_another_shape_is_kept_and_counted() {
        let mut members = Members::default();
        let diff = br#"{"joins":{"user:1":{"metas":[{"phx_ref":"a-1","online_at":-3.5,"kind":7}]}},"leaves":{}}"#;
        assert!(members.apply_diff(diff));
        assert_eq!(members.len(), 1);
        assert!(members.consistent());
    }

    #[test]
    fn stored_values_parse_back() {
        let flat = vec![
            "a-1".to_string(),
            "1700000000000|\"user:1\"\n{\"phx_ref\":\"a-1\"}".to_string(),
            "bad".to_string(),
            "no separator".to_string(),
        ];
        let members = Members::from_stored(&flat);
        assert_eq!(members.len(), 1);
        let (phx_ref, stored) = members.iter().next().unwrap();
        assert_eq!((phx_ref, &*stored.key), ("a-1", "\"user:1\""));
    }

    /// 20,000 metas whose ids are as long as the id rule allows and escape to twice their
    /// length: what a joiner is shown stays under 64 KiB, and the summary counts everyone.
    #[test]
    fn a_listing_stays_under_64_kib_however_big_the_topic() {
        let mut members = Members::default();
        for i in 0..20_000u64 {
            let id = format!("{i:0>8}{}", "\"".repeat(120));
            members.insert(member(
                &format!("player:{id}"),
                &format!("h-{i}"),
                i,
                "player",
            ));
        }
        assert!(!members.fits(256));
        let listing = Listing::newest(&members, 256);
        let state = listing.encode();
        assert!(state.len() <= 64 * 1024, "{} bytes", state.len());
        assert!(
            listing.len() > 100,
            "the byte bound still lists {}",
            listing.len()
        );
        // The newest metas are listed.
        assert!(refs(&state).contains(&"h-19999".to_string()));
        let summary: serde_json::Value =
            serde_json::from_slice(&members.summary(listing.len())).unwrap();
        assert_eq!(summary["metas"], 20_000);
        assert_eq!(summary["keys"], 20_000);
        assert_eq!(summary["kinds"]["player"], 20_000);
        assert_eq!(summary["complete"], false);
    }

    #[test]
    fn a_listing_is_stable_under_joins_and_refills_freed_slots_newest_first() {
        let mut members = Members::default();
        for i in 0..10u64 {
            members.insert(member(&format!("user:{i}"), &format!("r-{i}"), i, "user"));
        }
        let mut listing = Listing::newest(&members, 4);
        assert_eq!(refs(&listing.encode()), ["r-6", "r-7", "r-8", "r-9"]);
        // A storm of joins moves nothing.
        for i in 10..100u64 {
            members.insert(member(&format!("user:{i}"), &format!("r-{i}"), i, "user"));
        }
        assert_eq!(listing.follow(&members, 4, MAX_FILLS), (None, false));
        // A listed meta leaves: the newest unlisted one takes its slot, in one diff.
        members.remove("r-7");
        let diff: serde_json::Value =
            serde_json::from_slice(&listing.follow(&members, 4, MAX_FILLS).0.unwrap()).unwrap();
        assert_eq!(diff["leaves"]["user:7"]["metas"][0]["phx_ref"], "r-7");
        assert_eq!(diff["joins"]["user:99"]["metas"][0]["phx_ref"], "r-99");
        // Refills are capped per interval.
        for i in [6, 8, 9, 99] {
            members.remove(&format!("r-{i}"));
        }
        assert!(listing.follow(&members, 4, 2).1, "slots left to fill");
        assert_eq!(listing.len(), 2);
        assert!(!listing.follow(&members, 4, 2).1);
        assert_eq!(listing.len(), 4);
    }
}
