//! `write_atomically` leaves nothing behind when it fails: no temporary file beside the
//! target, whichever step failed. The failures chosen fail as root too (permissions do not).

use std::path::Path;

use vpipe_mem::write_atomically;

/// The names in `dir`.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// Set in the child process that runs the file-size-limited write, to the folder it writes in.
const LIMITED_WRITE_DIR: &str = "VPIPE_MEM_TEST_LIMITED_WRITE_DIR";

#[test]
fn a_failed_write_of_the_data_leaves_no_temporary_file() {
    // The limit binds a whole process: the write runs in a child that runs only this test, so
    // no other test, and no output of this harness to a log file, writes under it.
    if let Some(dir) = std::env::var_os(LIMITED_WRITE_DIR) {
        write_past_the_file_size_limit(Path::new(&dir));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "a_failed_write_of_the_data_leaves_no_temporary_file",
            "--exact",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(LIMITED_WRITE_DIR, dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&child.stdout);
    assert!(
        child.status.success() && stdout.contains("1 passed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&child.stderr)
    );
    assert_eq!(names_in(dir.path()), Vec::<String>::new());
}

/// Writes past RLIMIT_FSIZE into `dir`: the write fails with EFBIG once the file reaches the
/// limit, as on a full disk: part of the data is on disk, the rest is refused.
fn write_past_the_file_size_limit(dir: &Path) {
    let limit = 64 * 1024;
    // SAFETY: plain libc calls on values owned here; ignoring SIGXFSZ turns the signal the
    // kernel sends at the limit into the EFBIG error.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let mut current = std::mem::zeroed::<libc::rlimit>();
        assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut current), 0);
        let lowered = libc::rlimit {
            rlim_cur: limit,
            rlim_max: current.rlim_max,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lowered), 0);
    }
    let result = write_atomically(&dir.join("report.json"), &vec![b'x'; 4 * limit as usize]);
    assert!(result.is_err(), "a write past the file-size limit fails");
    assert_eq!(names_in(dir), Vec::<String>::new());
}

#[test]
fn a_failed_rename_leaves_no_temporary_file_and_the_target_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    // A directory cannot be replaced by a file.
    let target = dir.path().join("memory.svg");
    std::fs::create_dir(&target).unwrap();
    assert!(write_atomically(&target, b"<svg/>").is_err());
    assert_eq!(names_in(dir.path()), ["memory.svg"]);
    assert!(target.is_dir());
}

#[test]
fn a_path_through_a_regular_file_fails_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("not-a-folder"), b"").unwrap();
    let target = dir.path().join("not-a-folder/report.json");
    assert!(write_atomically(&target, b"{}").is_err());
    assert_eq!(names_in(dir.path()), ["not-a-folder"]);
}

#[test]
fn a_successful_write_leaves_only_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("report.json");
    std::fs::write(&target, b"old").unwrap();
    write_atomically(&target, b"new").unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"new");
    assert_eq!(names_in(dir.path()), ["report.json"]);
}
