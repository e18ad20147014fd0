//! Terminal output that never panics. `println!` panics when stdout is a closed pipe (a
//! parent that went away, `troupe local | head`); a coordinator must keep running — and keep
//! handling signals — whatever happens to its terminal.

use std::io::Write;

#[doc(hidden)]
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_fmt(args);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

#[doc(hidden)]
pub fn write_stderr(args: std::fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(args);
    let _ = err.write_all(b"\n");
}

/// `println!` that ignores a closed stdout.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => { $crate::console::write_stdout(format_args!($($arg)*)) };
}

/// `eprintln!` that ignores a closed stderr.
#[macro_export]
macro_rules! say_err {
    ($($arg:tt)*) => { $crate::console::write_stderr(format_args!($($arg)*)) };
}
