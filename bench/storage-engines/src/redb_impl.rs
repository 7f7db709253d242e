// Included by the `redb2` and `redb4` modules in engines.rs, each of which
// brings its own `redb` crate version into scope as `redb` and defines
// `set_durability`. The code is the same for both versions.
//
// Layout, as in replikv-storage: one file; table `log` keyed by
// (group u32, index u64) -> entry bytes, shared by every Raft group; table
// `kv` keyed by (group u32, key bytes) -> value bytes for the state machine.

use std::path::Path;

use redb::{Database, Durability, ReadableTable, TableDefinition};

use crate::common::{GroupAppend, KvStore, LogStore};

const LOG: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("log");
const KV: TableDefinition<(u32, &[u8]), &[u8]> = TableDefinition::new("kv");

/// `QR`: commit log writes with redb's quick-repair (allocator state saved in
/// every commit, 2-phase commit), so that opening after a crash needs no full
/// repair.
pub struct RedbLog<const QR: bool> {
    db: Database,
}

impl<const QR: bool> LogStore for RedbLog<QR> {
    fn create(dir: &Path, _groups: usize) -> Self {
        let db = Database::create(dir.join("db.redb")).expect("redb create");
        let mut txn = db.begin_write().expect("begin_write");
        set_durability(&mut txn, Durability::Immediate);
        txn.set_quick_repair(QR);
        txn.open_table(LOG).expect("open_table");
        txn.commit().expect("commit");
        RedbLog { db }
    }

    fn open(dir: &Path, _groups: usize) -> Self {
        let db = Database::open(dir.join("db.redb")).expect("redb open");
        {
            // Ready to serve: the log table is readable.
            let txn = db.begin_read().expect("begin_read");
            let t = txn.open_table(LOG).expect("open_table");
            let _ = t.last().expect("last");
        }
        RedbLog { db }
    }

    fn append(&mut self, items: &[GroupAppend<'_>]) {
        let mut txn = self.db.begin_write().expect("begin_write");
        set_durability(&mut txn, Durability::Immediate);
        txn.set_quick_repair(QR);
        {
            let mut t = txn.open_table(LOG).expect("open_table");
            for it in items {
                let g = it.group as u32;
                for (i, p) in it.payloads.iter().enumerate() {
                    t.insert((g, it.first + i as u64), p.as_slice()).expect("insert");
                }
            }
        }
        txn.commit().expect("commit");
    }

    fn read_range(&self, group: usize, from: u64, to: u64) -> usize {
        let txn = self.db.begin_read().expect("begin_read");
        let t = txn.open_table(LOG).expect("open_table");
        let g = group as u32;
        let mut n = 0;
        let mut bytes = 0;
        for r in t.range((g, from)..(g, to)).expect("range") {
            let (_k, v) = r.expect("range item");
            bytes += v.value().len();
            n += 1;
        }
        std::hint::black_box(bytes);
        n
    }

    fn purge(&mut self, group: usize, first: u64, upto: u64) {
        let mut txn = self.db.begin_write().expect("begin_write");
        set_durability(&mut txn, Durability::Immediate);
        txn.set_quick_repair(QR);
        {
            let mut t = txn.open_table(LOG).expect("open_table");
            let g = group as u32;
            t.retain_in((g, first)..=(g, upto), |_, _| false).expect("retain_in");
        }
        txn.commit().expect("commit");
    }
}

pub struct RedbKv {
    db: Database,
}

impl KvStore for RedbKv {
    fn create(dir: &Path) -> Self {
        let db = Database::create(dir.join("sm.redb")).expect("redb create");
        let mut txn = db.begin_write().expect("begin_write");
        set_durability(&mut txn, Durability::Immediate);
        txn.open_table(KV).expect("open_table");
        txn.commit().expect("commit");
        RedbKv { db }
    }

    fn apply(&mut self, kvs: &[([u8; 16], [u8; 100])]) {
        let mut txn = self.db.begin_write().expect("begin_write");
        set_durability(&mut txn, Durability::None);
        {
            let mut t = txn.open_table(KV).expect("open_table");
            for (k, v) in kvs {
                t.insert((0u32, k.as_slice()), v.as_slice()).expect("insert");
            }
        }
        txn.commit().expect("commit");
    }

    fn persist(&mut self) {
        let mut txn = self.db.begin_write().expect("begin_write");
        set_durability(&mut txn, Durability::Immediate);
        txn.commit().expect("commit");
    }

    fn get(&self, key: &[u8]) -> Option<usize> {
        let txn = self.db.begin_read().expect("begin_read");
        let t = txn.open_table(KV).expect("open_table");
        t.get((0u32, key)).expect("get").map(|v| v.value().len())
    }

    fn scan(&self) -> (usize, usize) {
        let txn = self.db.begin_read().expect("begin_read");
        let t = txn.open_table(KV).expect("open_table");
        let mut n = 0;
        let mut bytes = 0;
        for r in t.iter().expect("iter") {
            let (k, v) = r.expect("iter item");
            let (_group, key) = k.value();
            bytes += key.len() + v.value().len();
            n += 1;
        }
        (n, bytes)
    }
}
