//! Reading a finished sandbox's filesystem from outside, safely.

use std::ffi::CString;
use std::fs::{File, Metadata};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::sys::{self, RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS};

/// The sandbox's root directory as the command saw it (overlay merged, Kiln's
/// mounts included), valid until the sandbox is released.
///
/// Every lookup is confined with `openat2(RESOLVE_IN_ROOT |
/// RESOLVE_NO_MAGICLINKS)`: an absolute symlink resolves against this root
/// and `..` stops at it, so nothing an action left behind can point a
/// collector at a host file.
#[derive(Debug)]
pub struct RootDir {
    fd: OwnedFd,
}

fn c(path: &Path) -> io::Result<CString> {
    let b = path.as_os_str().as_bytes();
    let b = if b.is_empty() { b"." } else { b };
    CString::new(b).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

impl RootDir {
    pub(crate) fn new(fd: OwnedFd) -> RootDir {
        RootDir { fd }
    }

    /// The root's fd (`O_PATH`), for the caller's own `openat2` calls.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// `openat2(root, path, flags | O_CLOEXEC, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`.
    /// Add `O_NOFOLLOW` to refuse a final symlink, `O_NONBLOCK` before opening
    /// something that might be a FIFO.
    pub fn open_raw(&self, path: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
        sys::openat2(
            self.fd.as_fd(),
            &c(path)?,
            flags,
            0,
            RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
        )
        .map_err(io::Error::from)
    }

    /// Opens a regular file for reading; symlinks (also the last component)
    /// are followed, but only inside the root.
    pub fn open(&self, path: &Path) -> io::Result<File> {
        let f = File::from(self.open_raw(path, libc::O_RDONLY | libc::O_NONBLOCK)?);
        if !f.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", path.display()),
            ));
        }
        Ok(f)
    }

    /// `lstat`: the entry itself, not what a symlink points to.
    pub fn symlink_metadata(&self, path: &Path) -> io::Result<Metadata> {
        let fd = self.open_raw(path, libc::O_PATH | libc::O_NOFOLLOW)?;
        File::from(fd).metadata()
    }

    /// The target of a symlink, exactly as stored.
    pub fn read_link(&self, path: &Path) -> io::Result<PathBuf> {
        let fd = self.open_raw(path, libc::O_PATH | libc::O_NOFOLLOW)?;
        let mut buf = vec![0u8; libc::PATH_MAX as usize];
        // SAFETY: valid buffer; empty path with an O_PATH fd reads that link.
        let n = unsafe {
            libc::readlinkat(
                fd.as_raw_fd(),
                c"".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(PathBuf::from(std::ffi::OsString::from_vec(buf)))
    }

    /// Names in a directory (without `.` and `..`).
    pub fn read_dir(&self, path: &Path) -> io::Result<Vec<std::ffi::OsString>> {
        let fd = self.open_raw(path, libc::O_RDONLY | libc::O_DIRECTORY)?;
        let mut dir = nix::dir::Dir::from_fd(std::os::fd::IntoRawFd::into_raw_fd(fd))
            .map_err(io::Error::from)?;
        let mut out = Vec::new();
        for e in dir.iter() {
            let e = e.map_err(io::Error::from)?;
            let name = e.file_name().to_bytes();
            if name != b"." && name != b".." {
                out.push(std::ffi::OsStr::from_bytes(name).to_os_string());
            }
        }
        Ok(out)
    }
}

use std::os::unix::ffi::OsStringExt;
