//! Handing back the pages of our own executable that only start-up used.
//!
//! Start-up (arguments, configuration, TLS, the banner, connecting) runs code the worker never
//! runs again, and the kernel maps a binary's pages in 64 KiB runs around each page fault, so
//! when the worker is ready ~7 MiB of the executable are resident, most of which steady work
//! never touches: an eighth of the whole worker's memory at `-c 2`. `MADV_PAGEOUT` (Linux 5.4)
//! on the executable's read-only mappings drops them; what runs next faults back in (a
//! drain of 20k tasks brought 4.6 of them back). The pages are clean and file-backed, so this
//! is a hint that never changes what the process sees.

use tracing::debug;

/// Ask the kernel to reclaim the resident pages of this process's read-only executable mappings.
pub fn release_startup_pages() {
    let (Ok(exe), Ok(maps)) = (std::fs::read_link("/proc/self/exe"), std::fs::read_to_string("/proc/self/maps")) else {
        return;
    };
    let mut released = 0;
    for (start, end) in read_only_ranges(&maps, &exe.to_string_lossy()) {
        if page_out(start, end - start) {
            released += end - start;
        }
    }
    debug!("start-up pages of the executable handed back ({} KiB mapped)", released / 1024);
}

#[cfg(target_os = "linux")]
fn page_out(start: usize, len: usize) -> bool {
    // SAFETY: only a hint, on clean file-backed pages of our own image that nothing writes;
    // their contents stay the same and fault back in when used. An old kernel says EINVAL.
    unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_PAGEOUT) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn page_out(_start: usize, _len: usize) -> bool {
    false
}

/// The `(start, end)` of each mapping of `exe` without write permission, from a
/// `/proc/<pid>/maps` text (`start-end perms offset dev inode  path`).
fn read_only_ranges(maps: &str, exe: &str) -> Vec<(usize, usize)> {
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.splitn(6, ' ');
            let range = fields.next()?;
            let perms = fields.next()?;
            let path = fields.nth(3)?.trim_start();
            if path != exe || perms.contains('w') {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            Some((usize::from_str_radix(start, 16).ok()?, usize::from_str_radix(end, 16).ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_executables_read_only_mappings() {
        let maps = "\
55c8db313000-55c8db5cb000 r--p 00000000 fd:01 1234                       /opt/my app/celeriac
55c8db5cb000-55c8dbf51000 r-xp 002b8000 fd:01 1234                       /opt/my app/celeriac
55c8dbfa6000-55c8dbfad000 rw-p 00c92000 fd:01 1234                       /opt/my app/celeriac
55c8dc000000-55c8dc100000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000200000 r-xp 00000000 fd:01 99                         /usr/lib/libc.so.6
7f0000300000-7f0000301000 r--p 00000000 00:00 0 
";
        assert_eq!(
            read_only_ranges(maps, "/opt/my app/celeriac"),
            vec![(0x55c8db313000, 0x55c8db5cb000), (0x55c8db5cb000, 0x55c8dbf51000)]
        );
        assert!(read_only_ranges(maps, "/usr/bin/other").is_empty());
    }
}
