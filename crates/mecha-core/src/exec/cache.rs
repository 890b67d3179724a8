//! The per-node method cache: values a method computes once per (node, key) — SVD factors,
//! eigenbases — kept across merges of the same recipe, up to a size limit.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use crate::methods::seam::{NodeCache, NodeRef};

type Entry = (Arc<dyn Any + Send + Sync>, u64);
/// (node's cache identity, key, name).
type Id = (u64, String, String);

/// The entries, their insertion order, and their total size.
#[derive(Default)]
struct Entries {
    map: HashMap<Id, Entry>,
    order: VecDeque<Id>,
    bytes: u64,
}

/// Entries are keyed by the node's cache identity (the same across merges of the same recipe,
/// different for another computation), the key and a name; the oldest go first when the limit
/// is passed.
pub struct MethodCache {
    limit: u64,
    inner: Mutex<Entries>,
}

impl MethodCache {
    pub fn new(limit_bytes: u64) -> MethodCache {
        MethodCache { limit: limit_bytes, inner: Mutex::new(Entries::default()) }
    }

    pub fn bytes(&self) -> u64 {
        self.inner.lock().expect("cache lock").bytes
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn len(&self) -> usize {
        self.inner.lock().expect("cache lock").map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&self) {
        *self.inner.lock().expect("cache lock") = Entries::default();
    }
}

impl std::fmt::Debug for MethodCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MethodCache({} of {} bytes)", self.bytes(), self.limit)
    }
}

impl NodeCache for MethodCache {
    fn get(&self, node: NodeRef, key: &str, name: &str) -> Option<Arc<dyn Any + Send + Sync>> {
        let inner = self.inner.lock().expect("cache lock");
        inner.map.get(&(node.identity, key.to_string(), name.to_string())).map(|(v, _)| v.clone())
    }

    fn put(&self, node: NodeRef, key: &str, name: &str, value: Arc<dyn Any + Send + Sync>, bytes: u64) {
        if bytes > self.limit {
            return;
        }
        let mut inner = self.inner.lock().expect("cache lock");
        let id = (node.identity, key.to_string(), name.to_string());
        if let Some((_, old)) = inner.map.insert(id.clone(), (value, bytes)) {
            inner.bytes -= old;
        } else {
            inner.order.push_back(id);
        }
        inner.bytes += bytes;
        while inner.bytes > self.limit {
            let Some(oldest) = inner.order.pop_front() else { break };
            if let Some((_, b)) = inner.map.remove(&oldest) {
                inner.bytes -= b;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_within_its_limit_dropping_the_oldest() {
        let cache = MethodCache::new(100);
        let node = NodeRef { index: 0, source: Some(3), identity: 3 };
        cache.put(node, "a", "u", Arc::new(1u8), 60);
        cache.put(node, "b", "u", Arc::new(2u8), 60);
        assert!(cache.get(node, "a", "u").is_none());
        assert_eq!(*cache.get(node, "b", "u").unwrap().downcast_ref::<u8>().unwrap(), 2);
        assert_eq!(cache.bytes(), 60);
        cache.put(node, "c", "u", Arc::new(3u8), 1000); // larger than the whole cache: not kept
        assert!(cache.get(node, "c", "u").is_none());
    }
}
