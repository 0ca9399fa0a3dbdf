//! Which RabbitMQ node a connection tries first, and which next when its node dies.
//!
//! `JOBGATE_AMQP_URL` may list the nodes of a cluster. Were every connection to start
//! with the first, that node would carry every client and every failover would move them
//! all at once; so each connection starts at its own place in the list:
//!
//! - spread: a connection's first node is `(seed + index) mod nodes`, where the seed is a
//!   hash of the host name and the process id (in a container every replica is process
//!   1, and the pod's host name tells them apart) and the index counts the connections
//!   this process opened before (the publishing path of each queue, the consumer's
//!   source, its outcome publisher). The connections of one process land on different
//!   nodes; those of different processes start at scattered places.
//! - failover: an attempt round tries each node once, from the cursor on, and stops at
//!   the first that answers; after a connection to node `i` the cursor moves past it,
//!   so when that connection is lost the next round starts with node `i + 1` (the dead
//!   node is tried last). A round in which no node answers leaves the cursor where it
//!   is; the caller waits out its reconnect backoff between rounds.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Connections (cursors) this process made so far: the next one's index.
static CONNECTIONS: AtomicUsize = AtomicUsize::new(0);

/// Where one connection's next attempt round starts. A supervisor keeps one for the
/// life of its connection, across reconnects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCursor {
    /// Index of the node tried first, before `mod nodes`.
    next: usize,
}

impl NodeCursor {
    /// The cursor of a new connection of this process: the process's seed plus the
    /// number of connections it made before.
    pub fn next_in_process() -> Self {
        let host = std::env::var("HOSTNAME").unwrap_or_default();
        let index = CONNECTIONS.fetch_add(1, Ordering::Relaxed);
        Self::starting_at(first_node(&host, std::process::id(), index))
    }

    /// A cursor whose first round starts at node `start` (taken `mod nodes`).
    pub fn starting_at(start: usize) -> Self {
        Self { next: start }
    }

    /// The node indexes of one attempt round over `nodes` nodes: each once, from the
    /// cursor on, wrapping around.
    pub fn round(&self, nodes: usize) -> impl Iterator<Item = usize> {
        let first = self.next.checked_rem(nodes).unwrap_or(0);
        (0..nodes).map(move |k| (first + k) % nodes)
    }

    /// A connection to `node` was made: the next round (after it is lost) starts with
    /// the node after it.
    pub fn connected_to(&mut self, node: usize) {
        self.next = node.wrapping_add(1);
    }
}

/// The first node of connection number `index` of the process `pid` on `host`, before
/// `mod nodes`: consecutive indexes of one process are consecutive nodes.
fn first_node(host: &str, pid: u32, index: usize) -> usize {
    let mut hasher = DefaultHasher::new();
    (host, pid).hash(&mut hasher);
    // Truncating the hash on 32-bit targets is fine: only its spread matters.
    (hasher.finish() as usize).wrapping_add(index)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn first(host: &str, pid: u32, index: usize, nodes: usize) -> usize {
        NodeCursor::starting_at(first_node(host, pid, index))
            .round(nodes)
            .next()
            .unwrap()
    }

    #[test]
    fn the_connections_of_one_process_start_at_different_nodes() {
        for nodes in 1..=5 {
            let firsts: BTreeSet<usize> = (0..nodes)
                .map(|index| first("producer-7d9f", 4242, index, nodes))
                .collect();
            assert_eq!(firsts.len(), nodes, "{nodes} nodes: {firsts:?}");
        }
    }

    #[test]
    fn processes_start_at_scattered_nodes_covering_all_of_them() {
        // Different process ids on one host, and (containers) process 1 on many hosts.
        let by_pid: Vec<usize> = (1000..1030).map(|pid| first("host", pid, 0, 3)).collect();
        let by_host: Vec<usize> = (0..30)
            .map(|i| first(&format!("producer-{i}"), 1, 0, 3))
            .collect();
        for firsts in [by_pid, by_host] {
            let covered: BTreeSet<usize> = firsts.iter().copied().collect();
            assert_eq!(covered.len(), 3, "{firsts:?}");
            // Not all on the first node: no node gets more than two thirds.
            for node in 0..3 {
                let on_it = firsts.iter().filter(|&&n| n == node).count();
                assert!(
                    on_it <= 20,
                    "node {node} first for {on_it} of 30: {firsts:?}"
                );
            }
        }
    }

    #[test]
    fn a_round_tries_every_node_once_starting_at_the_cursor() {
        let round: Vec<usize> = NodeCursor::starting_at(4).round(3).collect();
        assert_eq!(round, [1, 2, 0]);
        assert_eq!(
            NodeCursor::starting_at(usize::MAX)
                .round(1)
                .collect::<Vec<_>>(),
            [0]
        );
        assert_eq!(NodeCursor::starting_at(7).round(0).count(), 0);
    }

    #[test]
    fn after_its_node_is_lost_a_connection_fails_over_to_the_next_and_wraps_around() {
        let mut cursor = NodeCursor::starting_at(1);
        cursor.connected_to(1);
        assert_eq!(cursor.round(3).collect::<Vec<_>>(), [2, 0, 1]);
        cursor.connected_to(2);
        assert_eq!(cursor.round(3).collect::<Vec<_>>(), [0, 1, 2]);
        cursor.connected_to(usize::MAX);
        assert_eq!(cursor.round(3).next(), Some(0));
    }

    #[test]
    fn each_new_cursor_of_the_process_takes_the_next_index() {
        let a = NodeCursor::next_in_process();
        let b = NodeCursor::next_in_process();
        // Other tests may take indexes in between: b is past a, by at least one.
        assert_ne!(a, b);
    }
}
