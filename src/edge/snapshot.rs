//! The files of `[persistence] dir`: what the edge saves to survive a restart (retained
//! messages, `retained`; persistent sessions, `sessions`).
//!
//! One layout for all of them: a first line naming the contents and their format version,
//! then records of a fixed number of fields, each field a 4-byte big-endian length and its
//! bytes, then [`END`], the record count and an FNV-1a digest of everything before it (8
//! bytes each, big-endian). A file is written beside the old one, synced and renamed over it,
//! so a crash leaves one whole file or the other, and it is created readable by its owner
//! only: it holds what devices publish and which topics they listen to. A file is read whole
//! and checked (digest, count, every record's shape) before any record is handed out, so a
//! damaged file yields nothing at all.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Marks the end of the records.
const END: &[u8] = b"end.";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not a file of this vigil version, or damaged: {reason}")]
    Corrupt { path: PathBuf, reason: &'static str },
}

/// A snapshot file being written; nothing replaces the old one until [`Writer::finish`].
pub struct Writer {
    out: Digest<BufWriter<File>>,
    tmp: PathBuf,
    path: PathBuf,
    count: u64,
}

impl Writer {
    /// Starts `file` in `dir` (as `file.tmp`) with its first line, `header`.
    pub fn create(dir: &Path, file: &str, header: &[u8]) -> Result<Writer, SnapshotError> {
        let tmp = dir.join(format!("{file}.tmp"));
        let created = create_private(&tmp).map_err(|source| SnapshotError::Io {
            path: tmp.clone(),
            source,
        })?;
        let mut writer = Writer {
            out: Digest::new(BufWriter::new(created)),
            tmp,
            path: dir.join(file),
            count: 0,
        };
        writer.write(header)?;
        Ok(writer)
    }

    fn write(&mut self, data: &[u8]) -> Result<(), SnapshotError> {
        self.out
            .write_all(data)
            .map_err(|source| SnapshotError::Io {
                path: self.tmp.clone(),
                source,
            })
    }

    /// Appends one record.
    pub fn record(&mut self, fields: &[&[u8]]) -> Result<(), SnapshotError> {
        for field in fields {
            self.write(&(field.len() as u32).to_be_bytes())?;
            self.write(field)?;
        }
        self.count += 1;
        Ok(())
    }

    /// Ends the file and puts it in place of the old one; returns the records written.
    pub fn finish(mut self) -> Result<u64, SnapshotError> {
        let count = self.count;
        self.write(END)?;
        self.write(&count.to_be_bytes())?;
        let io_err = |source| SnapshotError::Io {
            path: self.tmp.clone(),
            source,
        };
        let digest = self.out.digest;
        let mut buffered = self.out.inner;
        buffered.write_all(&digest.to_be_bytes()).map_err(io_err)?;
        let file = buffered.into_inner().map_err(|e| io_err(e.into_error()))?;
        file.sync_all().map_err(io_err)?;
        drop(file);
        fs::rename(&self.tmp, &self.path).map_err(|source| SnapshotError::Io {
            path: self.path.clone(),
            source,
        })?;
        Ok(count)
    }
}

/// Reads `file` in `dir`, which must start with `header` and hold records of `fields` fields,
/// and hands each record to `each` once the whole file has been checked. Returns the number of
/// records (0 when there is no file).
pub fn read(
    dir: &Path,
    file: &str,
    header: &[u8],
    fields: usize,
    mut each: impl FnMut(&[&[u8]]),
) -> Result<u64, SnapshotError> {
    let path = dir.join(file);
    let opened = match File::open(&path) {
        Ok(opened) => opened,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(source) => return Err(SnapshotError::Io { path, source }),
    };
    let mut data = Vec::new();
    if let Err(source) = BufReader::new(opened).read_to_end(&mut data) {
        return Err(SnapshotError::Io { path, source });
    }
    let corrupt = |reason| SnapshotError::Corrupt {
        path: path.clone(),
        reason,
    };
    let body = data
        .strip_prefix(header)
        .ok_or_else(|| corrupt("unknown header"))?;
    if body.len() < END.len() + 16 {
        return Err(corrupt("truncated"));
    }
    let (content, digest) = data.split_at(data.len() - 8);
    if fnv1a(FNV_OFFSET, content).to_be_bytes() != digest {
        return Err(corrupt("digest mismatch"));
    }
    let (records, trailer) = body[..body.len() - 8].split_at(body.len() - 8 - END.len() - 8);
    let count = match trailer.strip_prefix(END) {
        Some(count) => u64::from_be_bytes(count.try_into().map_err(|_| corrupt("no end mark"))?),
        None => return Err(corrupt("no end mark")),
    };
    // First the shape of every record, then the records: nothing of a damaged file is used.
    let mut seen = 0u64;
    let mut rest = records;
    while !rest.is_empty() {
        for _ in 0..fields {
            let (_, after) = take_field(rest).ok_or_else(|| corrupt("truncated record"))?;
            rest = after;
        }
        seen += 1;
    }
    if seen != count {
        return Err(corrupt("record count mismatch"));
    }
    let mut parts: Vec<&[u8]> = Vec::with_capacity(fields);
    let mut rest = records;
    while !rest.is_empty() {
        parts.clear();
        for _ in 0..fields {
            let Some((field, after)) = take_field(rest) else {
                return Err(corrupt("truncated record"));
            };
            parts.push(field);
            rest = after;
        }
        each(&parts);
    }
    Ok(count)
}

/// Renames a damaged `file` in `dir` to `file.damaged`, so that it is kept for inspection
/// and the next save does not overwrite it; says whether that worked.
pub fn set_aside(dir: &Path, file: &str) -> bool {
    fs::rename(dir.join(file), dir.join(format!("{file}.damaged"))).is_ok()
}

/// What `[persistence]` keeps in a file of its directory.
pub trait Persisted: Send + Sync + 'static {
    /// What the file holds, for log lines.
    const WHAT: &'static str;
    /// A count that moves whenever what `save` would write changes.
    fn changes(&self) -> u64;
    /// Writes the file and returns the records written. Blocking.
    fn save(&self, dir: &Path) -> Result<usize, SnapshotError>;
    /// The counters of saves and of failed saves.
    fn counters(metrics: &Metrics) -> (&AtomicU64, &AtomicU64);
}

/// Saves `target` in `dir` every `every` when it changed, until `shutdown`; the last save is
/// the caller's, once every connection has ended (`crate::run`).
pub async fn autosave<T: Persisted>(
    target: Arc<T>,
    metrics: Arc<Metrics>,
    dir: PathBuf,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut saved = target.changes();
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        save_if_changed(&target, &metrics, &dir, &mut saved).await;
    }
}

/// Saves `target` if it changed since the change count `saved`, off the async threads;
/// counts and logs the outcome.
pub async fn save_if_changed<T: Persisted>(
    target: &Arc<T>,
    metrics: &Metrics,
    dir: &Path,
    saved: &mut u64,
) {
    let changes = target.changes();
    if changes == *saved {
        return;
    }
    let (ok, failed) = T::counters(metrics);
    let (task_target, task_dir) = (target.clone(), dir.to_path_buf());
    let started = std::time::Instant::now();
    match tokio::task::spawn_blocking(move || task_target.save(&task_dir)).await {
        Ok(Ok(count)) => {
            *saved = changes;
            Metrics::inc(ok);
            let ms = started.elapsed().as_millis() as u64;
            tracing::debug!(dir = %dir.display(), count, ms, "{} saved", T::WHAT);
        }
        Ok(Err(e)) => {
            Metrics::inc(failed);
            tracing::warn!(error = %e, "cannot save the {}", T::WHAT);
        }
        Err(e) => {
            Metrics::inc(failed);
            tracing::warn!(error = %e, "the task saving the {} failed", T::WHAT);
        }
    }
}

/// Saves `target` whether or not it changed (the last save, at shutdown).
pub async fn save_now<T: Persisted>(target: &Arc<T>, metrics: &Metrics, dir: &Path) {
    // No change count equals it, so the save happens.
    let mut saved = u64::MAX;
    save_if_changed(target, metrics, dir, &mut saved).await;
}

/// Creates (or truncates) a file only its owner may read.
fn create_private(path: &Path) -> io::Result<File> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// A length-prefixed field (4 bytes, big-endian) and what follows it.
fn take_field(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let field = data.get(4..4usize.checked_add(len)?)?;
    Some((field, &data[4 + len..]))
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a(mut hash: u64, data: &[u8]) -> u64 {
    for &b in data {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// A writer that keeps the FNV-1a digest of what went through it.
struct Digest<W> {
    inner: W,
    digest: u64,
}

impl<W: Write> Digest<W> {
    fn new(inner: W) -> Digest<W> {
        Digest {
            inner,
            digest: FNV_OFFSET,
        }
    }

    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.digest = fnv1a(self.digest, data);
        self.inner.write_all(data)
    }
}

/// An empty directory of its own for a unit test of a persisted file, removed with its
/// contents on drop: also when an assertion fails.
#[cfg(test)]
pub struct TestDir(pub PathBuf);

#[cfg(test)]
impl TestDir {
    pub fn new(name: &str) -> TestDir {
        let dir = std::env::temp_dir().join(format!("vigil-unit-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("a test directory");
        TestDir(dir)
    }
}

#[cfg(test)]
impl std::ops::Deref for TestDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

#[cfg(test)]
impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &[u8] = b"vigil test records 1\n";

    fn read_all(dir: &Path) -> Result<Vec<Vec<Vec<u8>>>, SnapshotError> {
        let mut out = Vec::new();
        read(dir, "t.bin", HEADER, 2, |r| {
            out.push(r.iter().map(|f| f.to_vec()).collect())
        })?;
        Ok(out)
    }

    #[test]
    fn records_read_back_as_written_and_only_the_owner_may_read_them() {
        let dir = TestDir::new("snapshot-round-trip");
        assert!(read_all(&dir).unwrap().is_empty(), "no file, no records");
        let mut w = Writer::create(&dir, "t.bin", HEADER).unwrap();
        w.record(&[b"a", b""]).unwrap();
        w.record(&[b"\x00\xff", b"xyz"]).unwrap();
        assert_eq!(w.finish().unwrap(), 2);
        assert!(!dir.join("t.bin.tmp").exists());
        assert_eq!(
            read_all(&dir).unwrap(),
            vec![
                vec![b"a".to_vec(), vec![]],
                vec![b"\x00\xff".to_vec(), b"xyz".to_vec()]
            ]
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.join("t.bin"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_damaged_file_yields_no_record() {
        let dir = TestDir::new("snapshot-damaged");
        let mut w = Writer::create(&dir, "t.bin", HEADER).unwrap();
        w.record(&[b"a", b"1"]).unwrap();
        w.record(&[b"b", b"2"]).unwrap();
        w.finish().unwrap();
        let good = fs::read(dir.join("t.bin")).unwrap();
        let flipped = |at: usize| {
            let mut g = good.clone();
            g[at] ^= 1;
            g
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (good[..good.len() - 1].to_vec(), "digest mismatch"),
            (good[..HEADER.len() + 3].to_vec(), "truncated"),
            (b"something else\n".to_vec(), "unknown header"),
            (flipped(HEADER.len() + 5), "digest mismatch"),
        ];
        for (bytes, why) in cases {
            fs::write(dir.join("t.bin"), &bytes).unwrap();
            match read_all(&dir) {
                Err(SnapshotError::Corrupt { reason, .. }) => assert_eq!(reason, why),
                other => panic!("{why}: {other:?}"),
            }
        }
        // Records of another shape (three fields read as two) are refused whole.
        let mut w = Writer::create(&dir, "t.bin", HEADER).unwrap();
        w.record(&[b"a", b"1", b"x"]).unwrap();
        w.record(&[b"b", b"2", b"y"]).unwrap();
        w.finish().unwrap();
        assert!(matches!(read_all(&dir), Err(SnapshotError::Corrupt { .. })));
    }
}
