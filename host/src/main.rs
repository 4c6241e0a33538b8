// mimalloc: the server allocates and frees many small buffers per event
// (JSON records, headers); glibc malloc took about a fifth of its CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    rulehook::cli::main()
}
