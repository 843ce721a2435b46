//! Background threads: work that must not compete with the raft loop for the CPU, such
//! as writing a snapshot file or deleting obsolete log files. They run at a lower
//! scheduling priority (nice 10), so on a busy machine the raft loop, and with it every
//! client write, goes first. Nothing here may be used for work a client waits on.

use std::io;
use std::thread::{self, JoinHandle};

/// How much lower than normal a background thread's CPU priority is (Linux nice value).
const NICE: libc::c_int = 10;

/// Spawns `work` on a named thread at background priority.
pub fn spawn<F>(name: &str, work: F) -> io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    thread::Builder::new().name(name.into()).spawn(move || {
        lower_own_priority();
        work();
    })
}

/// Lowers the calling thread's priority. On Linux a thread's nice value is its own, set
/// through its thread id. Failure is harmless (the work just runs at normal priority).
fn lower_own_priority() {
    // SAFETY: gettid and setpriority take plain integers, touch no memory of ours, and
    // only change this thread's scheduling priority.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, NICE);
    }
}
