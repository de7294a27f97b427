//! Writing secrets to disk: keys, certificates, tokens and the hub's secret are written through a
//! temporary file and renamed into place (so a crash or a full disk never leaves a half-written
//! file behind the real name), with mode 0600 inside directories of mode 0700.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A failed write or read of a private file, naming the path.
#[derive(Debug, thiserror::Error)]
pub enum PrivateFileError {
    #[error("cannot create private directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state directory {path} is a symbolic link; give its real path (Petrel tightens the directory's mode and will not do that to whatever a link points at)")]
    Symlink { path: PathBuf },
}

/// Creates `dir` (and parents) with mode 0700, and tightens it to 0700 if it already exists.
pub fn ensure_private_dir(dir: &Path) -> Result<(), PrivateFileError> {
    let err = |source| PrivateFileError::CreateDir {
        path: dir.to_path_buf(),
        source,
    };
    if fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(PrivateFileError::Symlink {
            path: dir.to_path_buf(),
        });
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(err)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(err)
}

/// Atomically replaces `path` with `contents`, mode 0600. The parent directory must exist.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), PrivateFileError> {
    let err = |source| PrivateFileError::Write {
        path: path.to_path_buf(),
        source,
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(parent) = path.parent() {
            // Make the rename durable too; failure here is not worth failing the write for.
            let _ = fs::File::open(parent).and_then(|d| d.sync_all());
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err)
}

/// Reads a file, `Ok(None)` when it does not exist.
pub fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, PrivateFileError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PrivateFileError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_symlinked_state_directory_is_refused_and_its_target_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("elsewhere");
        fs::create_dir(&target).unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).unwrap();
        let link = tmp.path().join("state");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(
            ensure_private_dir(&link),
            Err(PrivateFileError::Symlink { .. })
        ));
        let mode = fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755);
    }

    #[test]
    fn writes_with_private_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        ensure_private_dir(&dir).unwrap();
        let f = dir.join("key.pem");
        write_private(&f, b"secret").unwrap();
        write_private(&f, b"secret2").unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"secret2");
        assert_eq!(
            fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(read_optional(&dir.join("none")).unwrap(), None);
        // no temp files left behind
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
    }
}
