fn main() -> std::process::ExitCode {
    rulehook::cli::main()
}
