pub fn run(_a: &crate::cli::CapsArgs) -> i32 {
    0
}
