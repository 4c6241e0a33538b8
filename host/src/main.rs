// mimalloc: the server allocates and frees many small buffers per event
// (JSON records, headers); glibc malloc took about a fifth of its CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc 3's `mimalloc.h`. The crate does not
/// export option constants; the test below checks this is the right one.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> std::process::ExitCode {
    // mimalloc returns freed memory to the OS a second after it is freed,
    // and only when the thread that freed it allocates again, which a
    // server gone quiet after a burst (a backlog building while a receiver
    // is down) may not do for a long time: it kept about 60 MiB it no longer
    // used (207 MiB RSS with 1,000,000 pending deliveries, 149 MiB with
    // 10 ms). 0 ms costs about a fifth more CPU per delivery in madvise
    // calls. 10 ms is not free either, and is kept for the memory target
    // (RSS ≤ 200 MB with 1,000,000 pending): measured with `--bench
    // pipeline -- backlog`, 10 / 100 / 1,000 ms gave 184–187 / 243–268 /
    // 364 MiB and ingested the backlog at 48,000 / 54,000 / 61,000 events/s,
    // and at 500 events/s the writer faults pages back in (0.3 faults per
    // delivery against 0.03 at 1,000 ms; 71–73 against 64–67 µs of the
    // writer's CPU per delivery).
    // Safety: set before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 10) };
    rulehook::cli::main()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_purge_delay_option_index_names_purge_delay() {
        // Its default in mimalloc 3 is 1,000 ms (options.c); no other
        // option has that default.
        let value = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(value, 1000, "option 15 is not mimalloc's purge_delay");
    }
}
