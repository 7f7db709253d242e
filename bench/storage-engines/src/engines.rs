//! The engines under test, each behind `LogStore` (and `KvStore` where the
//! engine can hold a state machine).

/// redb 2.x: the version the workspace pins today.
pub mod redb2 {
    use redb2 as redb;

    fn set_durability(txn: &mut redb::WriteTransaction, d: redb::Durability) {
        txn.set_durability(d);
    }

    include!("redb_impl.rs");
}

/// redb 4.x: the current release line.
pub mod redb4 {
    use redb4 as redb;
    // In redb 3+, `begin_read` comes from this trait.
    use redb4::ReadableDatabase;

    fn set_durability(txn: &mut redb::WriteTransaction, d: redb::Durability) {
        txn.set_durability(d).expect("set_durability");
    }

    include!("redb_impl.rs");
}

/// fjall 3.x: one database (one journal); keyspace `log` keyed by
/// (group u32 BE, index u64 BE) shared by every Raft group, keyspace `kv`
/// keyed by (group u32 BE, key) for the state machine (the same layout as the
/// redb tables). Durable commit = write batch with
/// `PersistMode::SyncAll` (journal write + fsync before `commit` returns).
pub mod fjall_engine {
    use std::path::Path;

    use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

    use crate::common::{GroupAppend, KvStore, LogStore};

    pub struct FjallLog {
        db: Database,
        log: Keyspace,
    }

    fn log_key(group: usize, index: u64) -> [u8; 12] {
        let mut k = [0u8; 12];
        k[..4].copy_from_slice(&(group as u32).to_be_bytes());
        k[4..].copy_from_slice(&index.to_be_bytes());
        k
    }

    fn open_log(dir: &Path) -> FjallLog {
        let db = Database::builder(dir).open().expect("fjall open");
        let log = db.keyspace("log", KeyspaceCreateOptions::default).expect("keyspace");
        FjallLog { db, log }
    }

    impl LogStore for FjallLog {
        fn create(dir: &Path, _groups: usize) -> Self {
            open_log(dir)
        }

        fn open(dir: &Path, _groups: usize) -> Self {
            let s = open_log(dir);
            let _ = s.log.last_key_value();
            s
        }

        fn append(&mut self, items: &[GroupAppend<'_>]) {
            let mut b = self.db.batch().durability(Some(PersistMode::SyncAll));
            for it in items {
                for (i, p) in it.payloads.iter().enumerate() {
                    let k = log_key(it.group, it.first + i as u64);
                    b.insert(&self.log, &k[..], p.as_slice());
                }
            }
            b.commit().expect("commit");
        }

        fn read_range(&self, group: usize, from: u64, to: u64) -> usize {
            let mut n = 0;
            let mut bytes = 0;
            for g in self.log.range(log_key(group, from)..log_key(group, to)) {
                let (_k, v) = g.into_inner().expect("range item");
                bytes += v.len();
                n += 1;
            }
            std::hint::black_box(bytes);
            n
        }

        fn purge(&mut self, group: usize, first: u64, upto: u64) {
            let mut b = self.db.batch().durability(Some(PersistMode::SyncAll));
            for i in first..=upto {
                b.remove(&self.log, &log_key(group, i)[..]);
            }
            b.commit().expect("commit");
        }
    }

    pub struct FjallKv {
        db: Database,
        ks: Keyspace,
    }

    impl KvStore for FjallKv {
        fn create(dir: &Path) -> Self {
            let db = Database::builder(dir).open().expect("fjall open");
            let ks = db
                .keyspace("kv", KeyspaceCreateOptions::default)
                .expect("keyspace");
            FjallKv { db, ks }
        }

        fn apply(&mut self, kvs: &[([u8; 16], [u8; 100])]) {
            // Default batch durability: the journal is written to the OS
            // (write(2)) at commit, no fsync.
            let mut b = self.db.batch();
            for (k, v) in kvs {
                let mut key = [0u8; 20]; // group 0 (u32 BE) + key
                key[4..].copy_from_slice(k);
                b.insert(&self.ks, &key[..], &v[..]);
            }
            b.commit().expect("commit");
        }

        fn persist(&mut self) {
            self.db.persist(PersistMode::SyncAll).expect("persist");
        }

        fn get(&self, key: &[u8]) -> Option<usize> {
            let mut k = Vec::with_capacity(4 + key.len());
            k.extend_from_slice(&0u32.to_be_bytes());
            k.extend_from_slice(key);
            self.ks.get(&k).expect("get").map(|v| v.len())
        }

        fn scan(&self) -> (usize, usize) {
            let mut n = 0;
            let mut bytes = 0;
            for g in self.ks.iter() {
                let (k, v) = g.into_inner().expect("iter item");
                bytes += k.len() - 4 + v.len();
                n += 1;
            }
            (n, bytes)
        }
    }
}

/// raft-log 0.4: a Raft-log-only WAL (no general key-value state machine).
/// One `RaftLog` (one directory, one flush thread) per Raft group. Durable
/// commit = `append` + `flush(sync = true)` + wait for the callback.
/// `WAIT_US` is the flush worker's batching wait (`flush_batch_wait`); the
/// crate's default is 1 ms.
pub mod raftlog_engine {
    use std::io;
    use std::path::Path;
    use std::sync::mpsc::{sync_channel, SyncSender};
    use std::sync::Arc;
    use std::time::Duration;

    use raft_log::api::raft_log_writer::RaftLogWriter;
    use raft_log::{Config, RaftLog, Types};

    use crate::common::{GroupAppend, LogStore};

    #[derive(Debug, Clone, PartialEq, Eq, Default)]
    pub struct T;

    impl Types for T {
        type LogId = (u64, u64); // (term, index)
        type LogPayload = Vec<u8>;
        type Vote = (u64, u64);
        type UserData = String;
        type Callback = SyncSender<io::Result<()>>;

        fn log_index(log_id: &Self::LogId) -> u64 {
            log_id.1
        }

        fn payload_size(payload: &Self::LogPayload) -> u64 {
            payload.len() as u64
        }
    }

    pub struct RaftLogStore<const WAIT_US: u64> {
        logs: Vec<RaftLog<T>>,
    }

    fn open_group<const WAIT_US: u64>(dir: &Path, g: usize) -> RaftLog<T> {
        let d = dir.join(format!("g{g}"));
        std::fs::create_dir_all(&d).expect("mkdir");
        let mut config = Config::new(d.to_str().expect("utf8 path"));
        config.wal.flush_batch_wait = Some(Duration::from_micros(WAIT_US));
        RaftLog::open(Arc::new(config)).expect("raft-log open")
    }

    impl<const WAIT_US: u64> LogStore for RaftLogStore<WAIT_US> {
        fn create(dir: &Path, groups: usize) -> Self {
            Self::open(dir, groups)
        }

        fn open(dir: &Path, groups: usize) -> Self {
            RaftLogStore {
                logs: (0..groups).map(|g| open_group::<WAIT_US>(dir, g)).collect(),
            }
        }

        fn append(&mut self, items: &[GroupAppend<'_>]) {
            // One log per group: append to each, start every group's flush,
            // then wait for all of them (the fsyncs run in parallel on the
            // groups' flush threads).
            let (tx, rx) = sync_channel(items.len());
            for it in items {
                let log = &mut self.logs[it.group];
                let entries = it
                    .payloads
                    .iter()
                    .enumerate()
                    .map(|(i, p)| ((1u64, it.first + i as u64), p.clone()));
                log.append(entries).expect("append");
                log.flush(true, Some(tx.clone())).expect("flush");
            }
            for _ in items {
                rx.recv().expect("flush callback").expect("flush result");
            }
        }

        fn read_range(&self, group: usize, from: u64, to: u64) -> usize {
            let mut n = 0;
            let mut bytes = 0;
            for r in self.logs[group].read(from, to) {
                let (_id, p) = r.expect("read");
                bytes += p.len();
                n += 1;
            }
            std::hint::black_box(bytes);
            n
        }

        fn purge(&mut self, group: usize, _first: u64, upto: u64) {
            let log = &mut self.logs[group];
            log.purge((1, upto)).expect("purge");
            let (tx, rx) = sync_channel(1);
            log.flush(true, Some(tx)).expect("flush");
            rx.recv().expect("flush callback").expect("flush result");
        }
    }
}

/// Not an engine: appends the entries (group, index, length, payload) to
/// one plain file shared by all groups, then one fdatasync: the floor that
/// any log engine pays for a durable commit on this disk. Appends only.
pub mod raw_file {
    use std::fs::{File, OpenOptions};
    use std::io::Write;
    use std::path::Path;

    use crate::common::{GroupAppend, LogStore};

    pub struct RawFile {
        file: File,
        buf: Vec<u8>,
    }

    impl LogStore for RawFile {
        fn create(dir: &Path, _groups: usize) -> Self {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("raw.log"))
                .expect("open");
            RawFile { file, buf: Vec::new() }
        }

        fn open(dir: &Path, groups: usize) -> Self {
            Self::create(dir, groups)
        }

        fn append(&mut self, items: &[GroupAppend<'_>]) {
            self.buf.clear();
            for it in items {
                for (i, p) in it.payloads.iter().enumerate() {
                    self.buf.extend_from_slice(&(it.group as u32).to_le_bytes());
                    self.buf.extend_from_slice(&(it.first + i as u64).to_le_bytes());
                    self.buf.extend_from_slice(&(p.len() as u32).to_le_bytes());
                    self.buf.extend_from_slice(p);
                }
            }
            self.file.write_all(&self.buf).expect("write");
            self.file.sync_data().expect("fdatasync");
        }

        fn read_range(&self, _group: usize, _from: u64, _to: u64) -> usize {
            unimplemented!("raw file is only an append floor")
        }

        fn purge(&mut self, _group: usize, _first: u64, _upto: u64) {
            unimplemented!("raw file is only an append floor")
        }
    }
}
