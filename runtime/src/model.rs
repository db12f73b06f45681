//! The model file: a safetensors file, validated completely, held in a sealed memfd.
//!
//! The zygote calls [`Model::load`] once at start. The file is copied by the kernel into a
//! memfd sized from the file's metadata, the memfd is sealed ([`crate::shm`]) and mapped
//! read-only, the header is parsed from the mapped bytes into a tensor index and checked
//! ([`parse_header`]), and only then is the content digest computed, once. Validating the copy
//! rather than the file means nothing can change between the check and the use. Every child
//! inherits the memfd, so the model is in memory once however many processes use it. An exec'd
//! child rebuilds its view with [`Model::from_memfd`]: it checks the seals and parses the header
//! again (cheap), but does not re-hash: the seals guarantee the bytes are the ones the zygote
//! hashed.
//!
//! What a valid file is, and every check, is in [`crate::safetensors`]; this module holds the
//! file, its memory and its digest.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Read;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::shm::{Mapping, SealedMemfd, ShmError};

pub use crate::safetensors::{parse_header, Dtype, HeaderError, TensorInfo, MAX_HEADER_LEN};

/// The file looked for when `--model` names a directory.
pub const MODEL_FILE_NAME: &str = "model.safetensors";

/// Name of the model's memfd, as `/proc/PID/maps` shows it (`/memfd:zygote-model`).
pub const MEMFD_NAME: &str = "zygote-model";

/// Everything that can be wrong with a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model {path}: not found")]
    NotFound { path: PathBuf },
    #[error("model {path}: not a regular file (nor a directory holding {MODEL_FILE_NAME})")]
    NotAFile { path: PathBuf },
    #[error("model {dir}: the directory holds no {MODEL_FILE_NAME}")]
    NoModelInDirectory { dir: PathBuf },
    #[error("model {path}: {action} failed: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },
    #[error("model {path}: the file is {len} bytes, more than this machine can map")]
    TooLarge { path: PathBuf, len: u64 },
    #[error("model {path}: the file changed size while being read ({expected} bytes when opened, {actual} read)")]
    ChangedWhileReading {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("model {path}: {reason}")]
    Invalid { path: PathBuf, reason: HeaderError },
    #[error("model memory: {0}")]
    Shm(#[from] ShmError),
}

/// A validated model in sealed shared memory.
#[derive(Debug)]
pub struct Model {
    path: PathBuf,
    memfd: SealedMemfd,
    map: Mapping,
    tensors: Vec<TensorInfo>,
    by_name: BTreeMap<String, usize>,
    metadata: BTreeMap<String, String>,
    digest: String,
}

impl Model {
    /// Resolves `path`: a regular file, or a directory holding [`MODEL_FILE_NAME`]. Symbolic
    /// links are followed.
    pub fn resolve_path(path: &Path) -> Result<PathBuf, ModelError> {
        let meta = stat(path)?;
        if meta.is_file() {
            return Ok(path.to_path_buf());
        }
        if !meta.is_dir() {
            return Err(ModelError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        let inner = path.join(MODEL_FILE_NAME);
        match stat(&inner) {
            Ok(m) if m.is_file() => Ok(inner),
            Ok(_) => Err(ModelError::NotAFile { path: inner }),
            Err(ModelError::NotFound { .. }) => Err(ModelError::NoModelInDirectory {
                dir: path.to_path_buf(),
            }),
            Err(e) => Err(e),
        }
    }

    /// Loads a model file into a sealed memfd, validates it completely, and computes its digest.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let file_path = Self::resolve_path(path)?;
        let memfd = copy_into_sealed_memfd(&file_path)?;
        Self::validate(file_path, memfd)
    }

    /// Copies the model file at `path` (resolved as [`Model::resolve_path`] does) into a new
    /// sealed memfd, without mapping or validating it: the supervisor holds this memfd for the
    /// service's life and hands it to every zygote it starts ([`Model::adopt`]), so a restarted
    /// zygote serves the very pages the running owner and workers map instead of a second copy.
    pub fn seal_file(path: &Path) -> Result<SealedMemfd, ModelError> {
        copy_into_sealed_memfd(&Self::resolve_path(path)?)
    }

    /// Builds the model from a sealed memfd made by [`Model::seal_file`] (inherited from the
    /// supervisor): checks its seals, validates the header completely and computes the digest,
    /// exactly as [`Model::load`] does after its copy. `path` is the file it was copied from
    /// (for messages and for the files beside it).
    pub fn adopt(fd: OwnedFd, path: &Path) -> Result<Self, ModelError> {
        let memfd = SealedMemfd::from_fd(fd, None)?;
        Self::validate(
            Self::resolve_path(path).unwrap_or_else(|_| path.to_path_buf()),
            memfd,
        )
    }

    /// Maps the sealed memfd, validates the header from the mapped bytes, then hashes them.
    fn validate(file_path: PathBuf, memfd: SealedMemfd) -> Result<Self, ModelError> {
        let map = memfd.map()?;
        let (tensors, metadata) = parse_header(&map).map_err(|reason| ModelError::Invalid {
            path: file_path.clone(),
            reason,
        })?;
        // Hashing reads every byte: only a file that passed validation is worth it.
        let digest = crate::backend::digest_bytes(&[&map]);
        Ok(Self::assemble(
            file_path, memfd, map, tensors, metadata, digest,
        ))
    }

    /// Rebuilds a model view in a child from the inherited memfd: checks its seals and parses
    /// the header again, but trusts `digest` (the seals guarantee the bytes it was computed
    /// from).
    pub fn from_memfd(fd: OwnedFd, path: &Path, digest: &str) -> Result<Self, ModelError> {
        let memfd = SealedMemfd::from_fd(fd, None)?;
        let map = memfd.map()?;
        let (tensors, metadata) = parse_header(&map).map_err(|reason| ModelError::Invalid {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(Self::assemble(
            path.to_path_buf(),
            memfd,
            map,
            tensors,
            metadata,
            digest.to_string(),
        ))
    }

    fn assemble(
        path: PathBuf,
        memfd: SealedMemfd,
        map: Mapping,
        tensors: Vec<TensorInfo>,
        metadata: BTreeMap<String, String>,
        digest: String,
    ) -> Self {
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Self {
            path,
            memfd,
            map,
            tensors,
            by_name,
            metadata,
            digest,
        }
    }

    /// The model file (after [`Model::resolve_path`]).
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The sealed memfd holding the whole file.
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.memfd.fd()
    }
    /// The whole file, mapped read-only.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
    /// Size of the whole file in bytes.
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    /// The tensor index, sorted by offset.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }
    /// The bytes of a tensor of this model's index.
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        &self.map[t.offset..t.offset + t.len]
    }
    /// The `__metadata__` map (empty when the file has none).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }
    /// `xxh3-128:` and 32 hex digits, over the whole file.
    pub fn digest(&self) -> &str {
        &self.digest
    }
}

/// `stat(2)` with the model's error types.
fn stat(path: &Path) -> Result<std::fs::Metadata, ModelError> {
    std::fs::metadata(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => ModelError::NotFound {
            path: path.to_path_buf(),
        },
        _ => ModelError::Io {
            path: path.to_path_buf(),
            action: "inspecting",
            source,
        },
    })
}

/// Copies the file at `path` into a new memfd and seals it.
///
/// The memfd is sized from the file's metadata and filled with `std::io::copy`, which lets the
/// kernel copy (copy_file_range(2), falling back to sendfile(2)): the bytes never pass through a
/// buffer of ours, and there is no writable mapping to fault in page by page. A file whose size
/// is not the one `fstat` gave at open (it was truncated or appended to meanwhile) is refused.
fn copy_into_sealed_memfd(path: &Path) -> Result<SealedMemfd, ModelError> {
    let io_err = |action| {
        move |source| ModelError::Io {
            path: path.to_path_buf(),
            action,
            source,
        }
    };
    // O_NONBLOCK: if the path was swapped for a FIFO since `resolve_path` looked, open must not
    // wait for a writer; the fstat below then refuses it. It does nothing to a regular file.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io_err("opening"))?;
    let meta = file.metadata().map_err(io_err("inspecting"))?;
    if !meta.is_file() {
        return Err(ModelError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let expected = meta.len();
    let Ok(len) = usize::try_from(expected) else {
        return Err(ModelError::TooLarge {
            path: path.to_path_buf(),
            len: expected,
        });
    };

    let mut out = crate::shm::create_sized(MEMFD_NAME, len)?;
    // One byte more than expected: enough to notice a file that grew, without following a file
    // that keeps growing.
    let actual =
        std::io::copy(&mut (&file).take(expected + 1), &mut out).map_err(io_err("reading"))?;
    let after = file.metadata().map_err(io_err("inspecting"))?.len();
    if actual != expected || after != expected {
        return Err(ModelError::ChangedWhileReading {
            path: path.to_path_buf(),
            expected,
            actual,
        });
    }
    Ok(SealedMemfd::seal(OwnedFd::from(out), Some(expected))?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::synth::{write_raw, write_safetensors};
    use nix::fcntl::{fcntl, FcntlArg};
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    use std::collections::HashSet;
    use std::fs::File;
    use std::os::fd::AsRawFd;

    /// A directory under the system temp dir, removed on drop (a `tempfile::TempDir` named
    /// for the test that made it).
    #[derive(Debug)]
    pub(crate) struct TempDir(tempfile::TempDir);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> Self {
            Self(
                tempfile::Builder::new()
                    .prefix(&format!("zygote-test-{tag}-"))
                    .tempdir()
                    .unwrap(),
            )
        }
        pub(crate) fn path(&self) -> &Path {
            self.0.path()
        }
    }

    // Whole files.

    fn good_model(dir: &Path) -> (PathBuf, Vec<u8>, Vec<u8>) {
        let path = dir.join("good.safetensors");
        let a: Vec<u8> = (0..24u8).collect(); // F32 [2, 3]
        let b: Vec<u8> = (100..104u8).collect(); // F16 [2]
        let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors(
            &path,
            &[
                ("embed.weight", Dtype::F32, &[2, 3], &a),
                ("embed.bias", Dtype::F16, &[2], &b),
            ],
            Some(&metadata),
        )
        .unwrap();
        (path, a, b)
    }

    #[test]
    fn a_good_file_loads_into_a_sealed_memfd_with_its_index_and_digest() {
        let dir = TempDir::new("model");
        let (path, a, b) = good_model(dir.path());
        let model = Model::load(&path).unwrap();
        let on_disk = std::fs::read(&path).unwrap();

        assert_eq!(model.path(), path);
        assert_eq!(model.bytes(), on_disk);
        assert_eq!(model.len(), on_disk.len() as u64);
        let header_len = u64::from_le_bytes(on_disk[..8].try_into().unwrap()) as usize;
        assert_eq!(header_len % 8, 0, "the writer pads the header");
        let names: Vec<&str> = model.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["embed.weight", "embed.bias"], "sorted by offset");
        let wt = model.tensor("embed.weight").unwrap();
        assert_eq!(
            (wt.dtype, wt.shape.as_slice(), wt.offset, wt.len),
            (Dtype::F32, &[2, 3][..], 8 + header_len, 24)
        );
        assert_eq!(model.data(wt), a);
        assert_eq!(model.data(model.tensor("embed.bias").unwrap()), b);
        assert!(model.tensor("nope").is_none());
        assert_eq!(model.metadata()["format"], "pt");

        assert_eq!(model.digest(), crate::backend::digest_bytes(&[&on_disk]));
        assert!(model.digest().starts_with("xxh3-128:") && model.digest().len() == 9 + 32);
        assert_eq!(
            Model::load(&path).unwrap().digest(),
            model.digest(),
            "stable across loads"
        );

        let seals = fcntl(model.memfd().as_raw_fd(), FcntlArg::F_GET_SEALS).unwrap();
        let need = crate::shm::required_seals().bits();
        assert_eq!(seals & need, need, "seals {seals:#x}");
        let link =
            std::fs::read_link(format!("/proc/self/fd/{}", model.memfd().as_raw_fd())).unwrap();
        assert!(
            link.to_string_lossy()
                .starts_with(&format!("/memfd:{MEMFD_NAME}")),
            "{link:?}"
        );
    }

    #[test]
    fn a_sealed_file_adopted_is_the_same_memfd_validated_and_hashed_like_a_load() {
        use std::os::unix::fs::MetadataExt;
        let dir = TempDir::new("model");
        let (path, a, _) = good_model(dir.path());
        let sealed = Model::seal_file(&path).unwrap();
        let inode = |fd: BorrowedFd<'_>| {
            std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .unwrap()
                .ino()
        };
        let held = inode(sealed.fd());
        let model = Model::adopt(sealed.try_clone_fd().unwrap(), &path).unwrap();
        assert_eq!(
            inode(model.memfd()),
            held,
            "the adopted model is that memfd"
        );
        assert_eq!(model.digest(), Model::load(&path).unwrap().digest());
        assert_eq!(model.data(model.tensor("embed.weight").unwrap()), a);
        assert_eq!(model.path(), path);
    }

    #[test]
    fn an_unsealed_or_invalid_memfd_is_refused_by_adopt() {
        let dir = TempDir::new("model");
        let (path, _, _) = good_model(dir.path());
        let bytes = std::fs::read(&path).unwrap();
        let mut open = crate::shm::create_sized(MEMFD_NAME, bytes.len()).unwrap();
        std::io::Write::write_all(&mut open, &bytes).unwrap();
        let err = Model::adopt(OwnedFd::from(open), &path).unwrap_err();
        assert!(
            matches!(err, ModelError::Shm(ShmError::NotSealed { .. })),
            "{err}"
        );
        let junk = crate::shm::MemfdWriter::create(MEMFD_NAME, 64)
            .unwrap()
            .seal()
            .unwrap();
        let fd = junk.try_clone_fd().unwrap();
        let err = Model::adopt(fd, &path).unwrap_err();
        assert!(matches!(err, ModelError::Invalid { .. }), "{err}");
    }

    #[test]
    fn a_different_file_has_a_different_digest() {
        let dir = TempDir::new("model");
        let (path, _, _) = good_model(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        let other = dir.path().join("other.safetensors");
        std::fs::write(&other, bytes).unwrap();
        assert_ne!(
            Model::load(&path).unwrap().digest(),
            Model::load(&other).unwrap().digest()
        );
    }

    #[test]
    fn a_directory_holding_model_safetensors_loads() {
        let dir = TempDir::new("model");
        let (path, _, _) = good_model(dir.path());
        std::fs::rename(&path, dir.path().join(MODEL_FILE_NAME)).unwrap();
        let model = Model::load(dir.path()).unwrap();
        assert_eq!(model.path(), dir.path().join(MODEL_FILE_NAME));
        assert_eq!(model.tensors().len(), 2);
    }

    #[test]
    fn a_child_rebuilds_the_model_from_the_sealed_memfd() {
        let dir = TempDir::new("model");
        let (path, _, _) = good_model(dir.path());
        let model = Model::load(&path).unwrap();
        let fd = model.memfd().try_clone_to_owned().unwrap();
        let child = Model::from_memfd(fd, model.path(), model.digest()).unwrap();
        assert_eq!(child.tensors(), model.tensors());
        assert_eq!(child.metadata(), model.metadata());
        assert_eq!(child.digest(), model.digest());
        assert_eq!(child.bytes(), model.bytes());
    }

    #[test]
    fn an_unsealed_memfd_is_refused_by_a_child() {
        let dir = TempDir::new("model");
        let (path, _, _) = good_model(dir.path());
        let fd = memfd_create(
            c"unsealed-model",
            MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
        )
        .unwrap();
        let mut f = File::from(fd);
        std::io::Write::write_all(&mut f, &std::fs::read(&path).unwrap()).unwrap();
        let e = Model::from_memfd(OwnedFd::from(f), &path, "xxh3-128:0").unwrap_err();
        assert!(
            matches!(e, ModelError::Shm(ShmError::NotSealed { .. })),
            "{e}"
        );
    }

    #[test]
    fn a_missing_path_is_refused() {
        let dir = TempDir::new("model");
        let path = dir.path().join("missing.safetensors");
        let e = Model::load(&path).unwrap_err();
        assert!(
            matches!(&e, ModelError::NotFound { path: p } if *p == path),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            format!("model {}: not found", path.display())
        );
    }

    #[test]
    fn a_directory_without_model_safetensors_is_refused() {
        let dir = TempDir::new("model");
        good_model(dir.path()); // some other file is there: it is not picked
        let e = Model::load(dir.path()).unwrap_err();
        assert!(
            matches!(&e, ModelError::NoModelInDirectory { dir: d } if d == dir.path()),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            format!(
                "model {}: the directory holds no model.safetensors",
                dir.path().display()
            )
        );
    }

    #[test]
    fn a_path_that_is_neither_a_file_nor_a_directory_is_refused() {
        let dir = TempDir::new("model");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(matches!(Model::load(&fifo), Err(ModelError::NotAFile { path }) if path == fifo));
        assert!(matches!(
            Model::load(Path::new("/dev/null")),
            Err(ModelError::NotAFile { .. })
        ));
        let inner = dir.path().join("d").join(MODEL_FILE_NAME);
        std::fs::create_dir_all(&inner).unwrap();
        assert!(
            matches!(Model::load(&dir.path().join("d")), Err(ModelError::NotAFile { path }) if path == inner)
        );
    }

    #[test]
    fn a_file_whose_size_changes_while_read_is_refused() {
        // procfs reports size 0 for files that read as more: the same as a file that grew.
        let e = Model::load(Path::new("/proc/self/status")).unwrap_err();
        assert!(
            matches!(
                e,
                ModelError::ChangedWhileReading {
                    expected: 0,
                    actual: 1,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn a_bad_file_names_its_path_and_the_problem() {
        let dir = TempDir::new("model");
        let path = dir.path().join("m.safetensors");
        let header = r#"{"bert.pooler.dense.weight":{"dtype":"F32","shape":[384,384],"data_offsets":[0,589820]}}"#;
        write_raw(&path, header.as_bytes(), &vec![0; 589820]).unwrap();
        let e = Model::load(&path).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "model {}: tensor bert.pooler.dense.weight: shape [384, 384] × F32 needs 589824 bytes, data_offsets give 589820",
                path.display()
            )
        );
    }

    #[test]
    fn every_corrupt_case_is_refused_with_its_own_message() {
        let dir = TempDir::new("corrupt");
        let cases = crate::synth::corrupt_case_files(dir.path()).unwrap();
        let mut names = HashSet::new();
        for case in &cases {
            assert!(names.insert(case.name), "case {} listed twice", case.name);
            let e = Model::load(&case.path).expect_err(case.name);
            let message = e.to_string();
            assert!(
                message.contains(case.expect),
                "case {}: {message:?} lacks {:?}",
                case.name,
                case.expect
            );
            assert!(
                message.starts_with("model /"),
                "case {}: {message:?} names no path",
                case.name
            );
            assert!(
                message.contains(&*dir.path().to_string_lossy()),
                "case {}: {message:?}",
                case.name
            );
        }
        // Every check of the validator has a case, so every variant shows up.
        let variants: HashSet<String> = cases
            .iter()
            .map(|c| match Model::load(&c.path).unwrap_err() {
                ModelError::Invalid { reason, .. } => format!("{reason:?}")
                    .split([' ', '{'])
                    .next()
                    .unwrap()
                    .to_string(),
                other => format!("{other:?}")
                    .split([' ', '{'])
                    .next()
                    .unwrap()
                    .to_string(),
            })
            .collect();
        assert_eq!(variants.len(), 28, "{variants:?}");
        assert_eq!(
            crate::synth::corrupt_cases(dir.path()).len(),
            cases.len(),
            "rewriting into the same dir works"
        );
    }
}
